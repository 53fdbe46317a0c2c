"""Tile schedules against a brute-force classification of every (q tile, kv tile) pair.

A kernel that trusts the schedule runs, around its full run, exactly n_head and n_tail
tiles that its per-tile test calls visible, and drops the mask where the schedule calls
full. So: every visible tile lies in [lo, hi), the counts match the tiles the per-tile
test accepts before and after the run, and every tile in the full run is really fully
visible and in bounds.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from longvila_jax.kernels.tiles import schedule, tile_lists


def truth(q_pos, kv_pos, q_seg, kv_seg, causal, bm, bn):
    sq, skv = q_pos.shape[1], kv_pos.shape[1]
    nq, nk = -(-sq // bm), -(-skv // bn)
    visible, full = np.zeros((nq, nk), bool), np.zeros((nq, nk), bool)
    for i in range(nq):
        for j in range(nk):
            rows, cols = slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn)
            seen = q_seg[0, rows, None] == kv_seg[0, None, cols]
            if causal:
                seen &= kv_pos[0, None, cols] <= q_pos[0, rows, None]
            visible[i, j] = seen.any()
            full[i, j] = seen.all() and (i + 1) * bm <= sq and (j + 1) * bn <= skv
    return visible, full


def kernel_test(q_stats, kv_stats, causal):
    """[nq, nk]: what the kernels' per-tile `_hidden` test lets through (its negation)."""
    q_pmax, q_smin, q_smax = (q_stats[r][:, None] for r in (1, 2, 3))
    k_pmin, k_smin, k_smax = (kv_stats[r][None, :] for r in (0, 2, 3))
    hidden = (k_smax < q_smin) | (k_smin > q_smax)
    if causal:
        hidden |= k_pmin > q_pmax
    return ~hidden


def random_case(rng):
    """Offset queries against keys from 0, 1-4 sorted documents, odd lengths and tiles:
    `((q_pos, kv_pos, q_seg, kv_seg), block_m, block_n, documents)`."""
    sq, skv = (int(n) for n in rng.integers(1, 200, 2))
    bm, bn = int(rng.choice([16, 32])), int(rng.choice([8, 16]))
    q_pos = (rng.integers(0, 100) + np.arange(sq))[None].astype(np.int32)
    kv_pos = np.arange(skv, dtype=np.int32)[None]
    docs = int(rng.integers(1, 5))
    q_seg = np.sort(rng.integers(0, docs, sq))[None].astype(np.int32)
    kv_seg = np.sort(rng.integers(0, docs, skv))[None].astype(np.int32)
    return (q_pos, kv_pos, q_seg, kv_seg), bm, bn, docs


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("over_q", [False, True])
def test_schedule_covers_visible_tiles_and_full_ranges_are_full(rng, causal, over_q):
    for _ in range(8):
        (q_pos, kv_pos, q_seg, kv_seg), bm, bn, docs = random_case(rng)
        q_stats, kv_stats, ranges = schedule(
            *map(jnp.asarray, (q_pos, kv_pos, q_seg, kv_seg)), causal, bm, bn, over_q=over_q)
        visible, full = truth(q_pos, kv_pos, q_seg, kv_seg, causal, bm, bn)
        accepted = kernel_test(np.asarray(q_stats)[:, 0], np.asarray(kv_stats)[:, 0], causal)
        if over_q:
            visible, full, accepted = visible.T, full.T, accepted.T
        for row, (lo, full_lo, full_hi, hi, n_head, n_tail) in enumerate(
                np.asarray(ranges)[:, 0].T):
            assert lo <= full_lo <= full_hi <= hi
            assert all(lo <= j < hi for j in np.flatnonzero(visible[row]))
            assert full[row, full_lo:full_hi].all()
            assert n_head == accepted[row, lo:full_lo].sum()
            assert n_tail == accepted[row, full_hi:hi].sum()
            # Causal, sorted segments: the full tiles form one run, and the schedule finds it.
            if full[row].any() and causal and docs == 1:
                assert full_hi - full_lo == full[row].sum()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("over_q", [False, True])
def test_tile_lists_walk_visible_tiles_in_order_head_full_tail(rng, causal, over_q):
    """The Mosaic kernels' lists: every tile the schedule may see, ascending, nothing else;
    the counts split it into the same masked head, full run and masked tail. `over_q`: per
    kv tile over q tiles (the backward's)."""
    for _ in range(8):
        (q_pos, kv_pos, q_seg, kv_seg), bm, bn, _ = random_case(rng)
        arrays = [jnp.asarray(x) for x in (q_pos, kv_pos, q_seg, kv_seg)]
        order, counts = tile_lists(*arrays, causal, bm, bn, over_q=over_q)
        q_stats, kv_stats, ranges = schedule(*arrays, causal, bm, bn, over_q=over_q)
        visible, full = truth(q_pos, kv_pos, q_seg, kv_seg, causal, bm, bn)
        accepted = kernel_test(np.asarray(q_stats)[:, 0], np.asarray(kv_stats)[:, 0], causal)
        if over_q:
            visible, full, accepted = visible.T, full.T, accepted.T
        for row, (n_head, n_full, n_tail) in enumerate(np.asarray(counts)[:, 0].T):
            walked = np.asarray(order)[0, row, :n_head + n_full + n_tail]
            assert (walked == np.flatnonzero(accepted[row])).all()
            assert set(np.flatnonzero(visible[row])) <= set(walked)
            assert full[row, walked[n_head:n_head + n_full]].all()
            _, full_lo, full_hi, _, head, tail = np.asarray(ranges)[:, 0, row]
            assert (n_head, n_full, n_tail) == (head, full_hi - full_lo, tail)
