"""Tile schedules for block-sparse attention kernels, computed in plain JAX.

Per-tile min/max of positions and segment ids classify every (q tile, kv tile) pair as
hidden, fully visible or partial (conservatively: a pair called full is full). Each kernel
program then runs a masked loop over the visible tiles before its first run of fully
visible tiles, a branch-free loop over that run, and a masked loop over the visible tiles
after it. The masked loops run a known COUNT of tiles and find each next visible tile with
a scalar search, so no `if` wraps the matrix products: that made ptxas serialise every
wgmma of the kernel (its warning C7515; bench/NOTES.md, v6).
"""

from __future__ import annotations

import jax.numpy as jnp


def _tile_stats(positions, segments, block):
    """`[4, b, n_tiles]` int32: min/max position, min/max segment (edge-padded tiles)."""
    b, s = positions.shape
    n = -(-s // block)
    pad = [(0, 0), (0, n * block - s)]
    pos = jnp.pad(positions, pad, mode="edge").reshape(b, n, block)
    seg = jnp.pad(segments, pad, mode="edge").reshape(b, n, block)
    return jnp.stack([pos.min(-1), pos.max(-1), seg.min(-1), seg.max(-1)]).astype(jnp.int32)


def _classify(q_stats, kv_stats, causal, sq, skv, block_m, block_n):
    """`[b, nq, nk]` (visible: may hold a visible entry, full: every entry visible and in
    bounds, so the tile needs no mask at all)."""
    q_pmin, q_pmax, q_smin, q_smax = (x[:, :, None] for x in q_stats)
    k_pmin, k_pmax, k_smin, k_smax = (x[:, None, :] for x in kv_stats)
    visible = (k_smax >= q_smin) & (k_smin <= q_smax)
    full = (q_smin == q_smax) & (k_smin == k_smax) & (q_smin == k_smin)
    if causal:
        visible &= k_pmin <= q_pmax
        full &= k_pmax <= q_pmin
    q_in = ((jnp.arange(q_stats.shape[-1]) + 1) * block_m <= sq)[:, None]
    kv_in = (jnp.arange(kv_stats.shape[-1]) + 1) * block_n <= skv
    return visible, full & visible & q_in & kv_in


def _ranges(visible, full):
    """Per row of the last axis: int32 `[6, b, n]` = (lo, full_lo, full_hi, hi, n_head,
    n_tail).

    [lo, hi) covers every visible tile; [full_lo, full_hi) is the first run of fully
    visible tiles inside it (empty, at hi, when there is none); n_head and n_tail count the
    visible tiles in [lo, full_lo) and [full_hi, hi).
    """
    n = visible.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    any_ = visible.any(-1)
    lo = jnp.where(any_, jnp.min(jnp.where(visible, idx, n), -1), 0)
    hi = jnp.where(any_, jnp.max(jnp.where(visible, idx, -1), -1) + 1, 0)
    full_lo = jnp.min(jnp.where(full, idx, n), -1)
    after = jnp.min(jnp.where((idx >= full_lo[..., None]) & ~full, idx, n), -1)
    full_hi = jnp.where(full_lo < n, jnp.minimum(after, hi), hi)
    full_lo = jnp.minimum(full_lo, hi)
    n_head = (visible & (idx < full_lo[..., None])).sum(-1)
    n_tail = (visible & (idx >= full_hi[..., None])).sum(-1)
    return jnp.stack([lo, full_lo, full_hi, hi, n_head, n_tail]).astype(jnp.int32)


def _classified(q_pos, kv_pos, q_seg, kv_seg, causal, block_m, block_n, over_q):
    """`(q_stats, kv_stats, visible, full)`, the last two per kv tile when `over_q`."""
    q_stats = _tile_stats(q_pos, q_seg, block_m)
    kv_stats = _tile_stats(kv_pos, kv_seg, block_n)
    visible, full = _classify(q_stats, kv_stats, causal, q_pos.shape[1], kv_pos.shape[1],
                              block_m, block_n)
    if over_q:
        visible, full = jnp.swapaxes(visible, 1, 2), jnp.swapaxes(full, 1, 2)
    return q_stats, kv_stats, visible, full


def tile_lists(q_pos, kv_pos, q_seg, kv_seg, causal, block_m, block_n, over_q=False):
    """`(order, counts)` for kernels whose loader walks a list instead of searching.

    order int32 `[b, nq, nk]`: per q tile, the kv tiles it may see in ascending order, the
    hidden ones after them; counts int32 `[3, b, nq]`: how many of those come before the
    first run of fully visible tiles, in it, and after it (so the list is masked head, full
    run, masked tail, as in `schedule`). `over_q` gives the transposed lists, per kv tile
    over q tiles (`[b, nk, nq]`, `[3, b, nk]`), for backward kernels that hold K/V.
    """
    *_, visible, full = _classified(q_pos, kv_pos, q_seg, kv_seg, causal, block_m, block_n,
                                    over_q)
    _, full_lo, full_hi, _, n_head, n_tail = _ranges(visible, full)
    order = jnp.argsort(~visible, axis=-1, stable=True).astype(jnp.int32)
    return order, jnp.stack([n_head, full_hi - full_lo, n_tail]).astype(jnp.int32)


def schedule(q_pos, kv_pos, q_seg, kv_seg, causal, block_m, block_n, over_q: bool):
    """`(q_stats, kv_stats, ranges)`; `over_q` gives ranges per kv tile (over q tiles)."""
    q_stats, kv_stats, visible, full = _classified(q_pos, kv_pos, q_seg, kv_seg, causal,
                                                   block_m, block_n, over_q)
    return q_stats, kv_stats, _ranges(visible, full)
