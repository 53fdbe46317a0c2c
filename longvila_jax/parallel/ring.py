"""Ring attention over a mesh axis (`node`): K/V blocks travel, queries stay.

Call inside `jax.shard_map` with q/k/v sharded along the sequence on `axis_name`. Each of
the n steps sends the visiting K/V block (with its positions and segment ids) to the next
rank BEFORE attending to it, so the transfer can overlap the compute, and folds the block's
(out, lse) into the running result with the one LSE merge (`merge`). The backward is a
second ring that carries K, V and their dK/dV accumulators and calls `flash_attention_bwd`
with the ring-merged out/lse, so memory stays O(local block).

Work skipping: each local shard is cut into `chunks` pieces (2 for the zigzag layout) and a
(query piece, key piece) pair runs only if its position/segment ranges can see each other.
With the zigzag layout (`zigzag_permutation`) every rank then does the same causal work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from longvila_jax.kernels import flash_attention, flash_attention_bwd
from longvila_jax.kernels.attention import name_for_remat, skips_hidden_tiles
from longvila_jax.kernels.manual_axes import varying_like


def zigzag_permutation(seq_len: int, ring: int) -> np.ndarray:
    """Token order that gives rank i the chunks i and 2*ring-1-i of the sequence.

    `x[:, perm]` followed by an even split over `ring` ranks is the zigzag layout; pass
    `positions = perm` so masks see global positions. `np.argsort(perm)` undoes it.
    """
    if seq_len % (2 * ring):
        raise ValueError(f"zigzag: sequence length {seq_len} is not a multiple of "
                         f"2 x ring size = {2 * ring}; pad it (padding gets its own segment id)")
    chunks = np.arange(seq_len).reshape(2 * ring, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * ring - 1 - i]])
                           for i in range(ring)])


def merge(out_a, lse_a, out_b, lse_b):
    """Combine two partial attentions over disjoint keys: out `[b, s, h, d]`, lse `[b, h, s]`.

    Rows that saw nothing on either side keep out = 0 and lse = -inf (no NaN).
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    finite = jnp.isfinite(lse)
    safe = jnp.where(finite, lse, 0.0)

    def weight(part):
        w = jnp.where(finite & jnp.isfinite(part), jnp.exp(part - safe), 0.0)
        return jnp.swapaxes(w, 1, 2)[..., None]  # [b, s, h, 1]

    out = out_a.astype(jnp.float32) * weight(lse_a) + out_b.astype(jnp.float32) * weight(lse_b)
    return out, lse


def merge_over(out, lse, axis_name):
    """`merge` of the partial attentions of every device on `axis_name` (keys sharded over
    them), the same on each device: a decode step's query against a sequence-sharded cache.

    The weights are `merge`'s, exp(lse_i - lse), taken relative to the largest lse so that
    two all-reduces (max, then sums) give a result that is replicated by construction.
    """
    top = jax.lax.pmax(lse, axis_name)
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    weight = jnp.where(jnp.isfinite(lse), jnp.exp(lse - safe), 0.0)  # [b, h, s]
    total = jax.lax.psum(weight, axis_name)
    summed = jax.lax.psum(out.astype(jnp.float32) * jnp.swapaxes(weight, 1, 2)[..., None],
                          axis_name)
    seen = total > 0
    out = summed / jnp.swapaxes(jnp.where(seen, total, 1.0), 1, 2)[..., None]
    return out, jnp.where(seen, safe + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)


def _pieces(x, chunks):
    return jnp.split(x, chunks, axis=1)


def _may_see(q_pos, q_seg, kv_pos, kv_seg, causal):
    """Scalar: can any query of this piece see any key of that piece (in any batch row)?"""
    overlap = (kv_seg.max(1) >= q_seg.min(1)) & (kv_seg.min(1) <= q_seg.max(1))
    if causal:
        overlap &= kv_pos.min(1) <= q_pos.max(1)
    return overlap.any()


def _unstack(block):
    """The travelling block `(stack([k, v]), stack([positions, segments]))` -> 4 arrays.

    K and V travel stacked so that each hop is one collective-permute: XLA's scheduler
    keeps one permute in flight, and a separate V permute waited exposed (bench/NOTES.md).
    """
    kv, ids = block
    return kv[0], kv[1], ids[0], ids[1]


def _maybe(visible, compute, nothing, backend, q):
    """`compute()` if the piece pair may see anything, else `nothing()`.

    Our Triton kernel skips hidden tiles itself, so a hidden pair costs it only a launch,
    while `lax.cond` makes the GPU wait for the host to read the predicate (twice per step
    and direction); there the call is made unconditionally. The XLA path computes every
    tile, so it keeps the cond.
    """
    if skips_hidden_tiles(backend, q):
        return compute()
    return jax.lax.cond(visible, compute, nothing)


def _step_forward(q_parts, kv, *, causal, scale, backend, chunks):
    """(out f32, lse) of local queries against one visiting K/V block, skipping hidden pairs.

    `q_parts`: the query-side pieces `(q, positions, segments)`, cut once per ring.
    """
    outs, lses = [], []
    kv_parts = list(zip(*(_pieces(x, chunks) for x in _unstack(kv)), strict=True))
    for qc, qp, qs in q_parts:
        b, s, h, d = qc.shape
        out = jnp.zeros((b, s, h, d), jnp.float32)
        lse = jnp.full((b, h, s), -jnp.inf, jnp.float32)
        for kc, vc, kp, ks in kv_parts:
            def attend(qc=qc, qp=qp, qs=qs, kc=kc, vc=vc, kp=kp, ks=ks):
                o, lse_ = flash_attention(qc, kc, vc, q_positions=qp, kv_positions=kp,
                                          q_segment_ids=qs, kv_segment_ids=ks, causal=causal,
                                          softmax_scale=scale, backend=backend)
                return o.astype(jnp.float32), lse_

            def nothing(qc=qc, kc=kc):
                empty = (jnp.zeros(qc.shape, jnp.float32),
                         jnp.full((qc.shape[0], qc.shape[2], qc.shape[1]), -jnp.inf))
                return tuple(varying_like(x, qc, kc) for x in empty)

            o, lse_ = _maybe(_may_see(qp, qs, kp, ks, causal), attend, nothing, backend, qc)
            out, lse = merge(out, lse, o, lse_)
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def _step_backward(q_parts, kv, *, causal, scale, backend, chunks):
    """(dq, dk, dv) contributions of one visiting K/V block, given the ring-merged out/lse.

    `q_parts`: pieces `(q, positions, segments, out, d_out, lse, d_lse)`, cut once per ring.
    """
    kv_parts = list(zip(*(_pieces(x, chunks) for x in _unstack(kv)), strict=True))
    dq = [jnp.zeros(p[0].shape, jnp.float32) for p in q_parts]
    dk = [jnp.zeros(p[0].shape, jnp.float32) for p in kv_parts]
    dv = [jnp.zeros(p[1].shape, jnp.float32) for p in kv_parts]
    for i, (qc, qp, qs, oc, doc, lc, dlc) in enumerate(q_parts):
        for j, (kc, vc, kp, ks) in enumerate(kv_parts):
            def grads(qc=qc, qp=qp, qs=qs, oc=oc, doc=doc, lc=lc, dlc=dlc, kc=kc, vc=vc, kp=kp,
                      ks=ks):
                g = flash_attention_bwd(qc, kc, vc, oc, lc, doc, dlc, q_positions=qp,
                                        kv_positions=kp, q_segment_ids=qs, kv_segment_ids=ks,
                                        causal=causal, softmax_scale=scale, backend=backend)
                return tuple(x.astype(jnp.float32) for x in g)

            def nothing(qc=qc, kc=kc, vc=vc, oc=oc, doc=doc):
                return tuple(varying_like(jnp.zeros(x.shape, jnp.float32), qc, kc, oc, doc)
                             for x in (qc, kc, vc))

            gq, gk, gv = _maybe(_may_see(qp, qs, kp, ks, causal), grads, nothing, backend, qc)
            dq[i], dk[j], dv[j] = dq[i] + gq, dk[j] + gk, dv[j] + gv
    return tuple(jnp.concatenate(x, axis=1) for x in (dq, dk, dv))


def ring_attention(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *,
                   causal: bool, axis_name: str = "node", softmax_scale: float | None = None,
                   backend: str = "auto", chunks: int = 2):
    """Exact attention over a sequence sharded on `axis_name`; returns local (out, lse).

    Local shapes: q `[b, s, h, d]`, k/v `[b, s, kh, d]`, positions/segments `[b, s]` (global
    values), out `[b, s, h, d]`, lse `[b, h, s]`. `s` must divide by `chunks`.
    """
    if q.shape[1] % chunks or k.shape[1] % chunks:
        raise ValueError(f"ring_attention: local lengths {q.shape[1]}, {k.shape[1]} must be "
                         f"multiples of chunks={chunks}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _ring(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                 causal, axis_name, scale, backend, chunks)


def _shift(tree, axis_name):
    n = jax.lax.axis_size(axis_name)
    return jax.lax.ppermute(tree, axis_name, [(i, (i + 1) % n) for i in range(n)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, axis_name, scale, backend, chunks):
    return _ring_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, axis_name, scale,
                     backend, chunks)[0]


def _ring_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, axis_name, scale, backend,
              chunks):
    kw = dict(causal=causal, scale=scale, backend=backend, chunks=chunks)
    n = jax.lax.axis_size(axis_name)
    q_parts = list(zip(*(_pieces(x, chunks) for x in (q, q_pos, q_seg)), strict=True))

    def step(carry, _):
        out, lse, kv = carry
        incoming = _shift(kv, axis_name)  # issued first: overlaps the attention below
        o, lse_ = _step_forward(q_parts, kv, **kw)
        out, lse = merge(out, lse, o, lse_)
        return (out, lse, incoming), None

    b, s, h, d = q.shape
    init = (varying_like(jnp.zeros((b, s, h, d), jnp.float32), q, k),
            varying_like(jnp.full((b, h, s), -jnp.inf, jnp.float32), q, k),
            (jnp.stack([k, v]), jnp.stack([kv_pos, kv_seg])))
    # Unrolled (n - 1 is small): no per-step loop predicate, and the scheduler sees across
    # steps when placing the permutes.
    (out, lse, kv), _ = jax.lax.scan(step, init, None, length=n - 1, unroll=True)
    o, lse_ = _step_forward(q_parts, kv, **kw)  # last block: nothing left to send
    out, lse = merge(out, lse, o, lse_)
    out, lse = name_for_remat(out.astype(q.dtype), lse)
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _ring_bwd(causal, axis_name, scale, backend, chunks, residuals, cotangents):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents
    d_lse = jnp.where(jnp.isfinite(lse), d_lse, 0.0)
    kw = dict(causal=causal, scale=scale, backend=backend, chunks=chunks)
    n = jax.lax.axis_size(axis_name)
    q_side = [_pieces(x, chunks) for x in (q, q_pos, q_seg, out, d_out)]
    q_side += [jnp.split(x, chunks, axis=2) for x in (lse, d_lse)]
    q_parts = list(zip(*q_side, strict=True))

    def accumulate(dq, kv, dkv):
        gq, gk, gv = _step_backward(q_parts, kv, **kw)
        return dq + gq, dkv + jnp.stack([gk, gv])

    def step(carry, _):
        dq, kv, dkv = carry
        incoming = _shift(kv, axis_name)
        dq, dkv = accumulate(dq, kv, dkv)
        # dK/dV travel with their K/V block, one hop behind it.
        return (dq, incoming, _shift(dkv, axis_name)), None

    refs = (q, k, d_out)
    init = (varying_like(jnp.zeros(q.shape, jnp.float32), *refs),
            (jnp.stack([k, v]), jnp.stack([kv_pos, kv_seg])),
            varying_like(jnp.zeros((2, *k.shape), jnp.float32), *refs))
    (dq, kv, dkv), _ = jax.lax.scan(step, init, None, length=n - 1, unroll=True)
    dq, dkv = accumulate(dq, kv, dkv)
    dk, dv = _shift(dkv, axis_name)  # the last hop home; K/V themselves need not move again
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)
