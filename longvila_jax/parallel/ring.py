"""Ring attention over a mesh axis (`node`): K/V blocks travel, queries stay.

Call inside `jax.shard_map` with q/k/v and the mask sharded along the sequence on
`axis_name`. Each of the n steps sends the visiting K/V block (with its positions and
segment ids, the keys' half of the mask) to the next
rank BEFORE attending to it, so the transfer can overlap the compute, and folds the block's
(out, lse) into the running result with the one LSE merge (`merge`). The backward is a
second ring that carries K, V and their dK/dV accumulators and calls `flash_attention_bwd`
with the ring-merged out/lse, so memory stays O(local block).

Work skipping: each local shard is cut into `chunks` pieces (2 for the zigzag layout) and a
(query piece, key piece) pair runs only if its position/segment ranges can see each other.
With the zigzag layout (`zigzag_permutation`) every rank then does the same causal work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from longvila_jax.kernels import AttentionSpec, Mask, Tokens, flash_attention, flash_attention_bwd
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


def _may_see(mask: Mask, causal: bool):
    """Scalar: can any query of this piece pair see any key (in any batch row)?"""
    q, kv = mask.q, mask.kv
    overlap = ((kv.segment_ids.max(1) >= q.segment_ids.min(1))
               & (kv.segment_ids.min(1) <= q.segment_ids.max(1)))
    if causal:
        overlap &= kv.positions.min(1) <= q.positions.max(1)
    return overlap.any()


def _travelling(k, v, kv: Tokens):
    """What moves around the ring, as two arrays: K and V stacked, positions and segments
    stacked, so that each hop is one collective-permute of each (XLA's scheduler keeps one
    permute in flight, and a separate V permute waited exposed; bench/NOTES.md)."""
    return jnp.stack([k, v]), jnp.stack([kv.positions, kv.segment_ids])


def _arrived(block, chunks):
    """The travelling block -> its pieces `[(k, v, Tokens)]`."""
    kv, ids = block
    return list(zip(_pieces(kv[0], chunks), _pieces(kv[1], chunks),
                    Tokens(ids[0], ids[1]).split(chunks), strict=True))


def _maybe(visible, compute, nothing, spec: AttentionSpec, q):
    """`compute()` if the piece pair may see anything, else `nothing()`.

    Our Triton kernel skips hidden tiles itself, so a hidden pair costs it only a launch,
    while `lax.cond` makes the GPU wait for the host to read the predicate (twice per step
    and direction); there the call is made unconditionally. The XLA path computes every
    tile, so it keeps the cond.
    """
    if skips_hidden_tiles(spec, q):
        return compute()
    return jax.lax.cond(visible, compute, nothing)


def _step_forward(q_parts, block, spec: AttentionSpec, chunks: int):
    """(out f32, lse) of local queries against one visiting K/V block, skipping hidden pairs.

    `q_parts`: the query-side pieces `(q, Tokens)`, cut once per ring.
    """
    outs, lses = [], []
    kv_parts = _arrived(block, chunks)
    for qc, q_ids in q_parts:
        b, s, h, d = qc.shape
        out = jnp.zeros((b, s, h, d), jnp.float32)
        lse = jnp.full((b, h, s), -jnp.inf, jnp.float32)
        for kc, vc, kv_ids in kv_parts:
            mask = Mask(q_ids, kv_ids)

            def attend(qc=qc, kc=kc, vc=vc, mask=mask):
                o, lse_ = flash_attention(qc, kc, vc, mask, spec)
                return o.astype(jnp.float32), lse_

            def nothing(qc=qc, kc=kc):
                empty = (jnp.zeros(qc.shape, jnp.float32),
                         jnp.full((qc.shape[0], qc.shape[2], qc.shape[1]), -jnp.inf))
                return tuple(varying_like(x, qc, kc) for x in empty)

            o, lse_ = _maybe(_may_see(mask, spec.causal), attend, nothing, spec, qc)
            out, lse = merge(out, lse, o, lse_)
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def _step_backward(q_parts, block, spec: AttentionSpec, chunks: int):
    """(dq, dk, dv) contributions of one visiting K/V block, given the ring-merged out/lse.

    `q_parts`: pieces `(q, Tokens, out, d_out, lse, d_lse)`, cut once per ring.
    """
    kv_parts = _arrived(block, chunks)
    dq = [jnp.zeros(p[0].shape, jnp.float32) for p in q_parts]
    dk = [jnp.zeros(p[0].shape, jnp.float32) for p in kv_parts]
    dv = [jnp.zeros(p[1].shape, jnp.float32) for p in kv_parts]
    for i, (qc, q_ids, oc, doc, lc, dlc) in enumerate(q_parts):
        for j, (kc, vc, kv_ids) in enumerate(kv_parts):
            mask = Mask(q_ids, kv_ids)

            def grads(qc=qc, oc=oc, doc=doc, lc=lc, dlc=dlc, kc=kc, vc=vc, mask=mask):
                g = flash_attention_bwd(qc, kc, vc, oc, lc, doc, dlc, mask, spec)
                return tuple(x.astype(jnp.float32) for x in g)

            def nothing(qc=qc, kc=kc, vc=vc, oc=oc, doc=doc):
                return tuple(varying_like(jnp.zeros(x.shape, jnp.float32), qc, kc, oc, doc)
                             for x in (qc, kc, vc))

            gq, gk, gv = _maybe(_may_see(mask, spec.causal), grads, nothing, spec, qc)
            dq[i], dk[j], dv[j] = dq[i] + gq, dk[j] + gk, dv[j] + gv
    return tuple(jnp.concatenate(x, axis=1) for x in (dq, dk, dv))


def ring_attention(q, k, v, mask: Mask, spec: AttentionSpec, *, axis_name="node",
                   chunks: int = 2):
    """Exact attention over a sequence sharded on `axis_name`; returns local (out, lse).

    Local shapes: q `[b, s, h, d]`, k/v `[b, s, kh, d]`, the mask's positions and segments
    `[b, s]` (global values), out `[b, s, h, d]`, lse `[b, h, s]`. `s` must divide by
    `chunks`.
    """
    if q.shape[1] % chunks or k.shape[1] % chunks:
        raise ValueError(f"ring_attention: local lengths {q.shape[1]}, {k.shape[1]} must be "
                         f"multiples of chunks={chunks}")
    scale = q.shape[-1] ** -0.5 if spec.scale is None else float(spec.scale)
    return _ring(q, k, v, mask, dataclasses.replace(spec, scale=scale), axis_name, chunks)


def _shift(tree, axis_name):
    n = jax.lax.axis_size(axis_name)
    return jax.lax.ppermute(tree, axis_name, [(i, (i + 1) % n) for i in range(n)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring(q, k, v, mask, spec, axis_name, chunks):
    return _ring_fwd(q, k, v, mask, spec, axis_name, chunks)[0]


def _ring_fwd(q, k, v, mask, spec, axis_name, chunks):
    n = jax.lax.axis_size(axis_name)
    q_parts = list(zip(_pieces(q, chunks), mask.q.split(chunks), strict=True))

    def step(carry, _):
        out, lse, block = carry
        incoming = _shift(block, axis_name)  # issued first: overlaps the attention below
        o, lse_ = _step_forward(q_parts, block, spec, chunks)
        out, lse = merge(out, lse, o, lse_)
        return (out, lse, incoming), None

    b, s, h, d = q.shape
    init = (varying_like(jnp.zeros((b, s, h, d), jnp.float32), q, k),
            varying_like(jnp.full((b, h, s), -jnp.inf, jnp.float32), q, k),
            _travelling(k, v, mask.kv))
    # Unrolled (n - 1 is small): no per-step loop predicate, and the scheduler sees across
    # steps when placing the permutes.
    (out, lse, block), _ = jax.lax.scan(step, init, None, length=n - 1, unroll=True)
    o, lse_ = _step_forward(q_parts, block, spec, chunks)  # last block: nothing left to send
    out, lse = merge(out, lse, o, lse_)
    out, lse = name_for_remat(out.astype(q.dtype), lse)
    return (out, lse), (q, k, v, mask, out, lse)


def _ring_bwd(spec, axis_name, chunks, residuals, cotangents):
    q, k, v, mask, out, lse = residuals
    d_out, d_lse = cotangents
    d_lse = jnp.where(jnp.isfinite(lse), d_lse, 0.0)
    n = jax.lax.axis_size(axis_name)
    q_parts = list(zip(_pieces(q, chunks), mask.q.split(chunks), _pieces(out, chunks),
                       _pieces(d_out, chunks), jnp.split(lse, chunks, axis=2),
                       jnp.split(d_lse, chunks, axis=2), strict=True))

    def accumulate(dq, block, dkv):
        gq, gk, gv = _step_backward(q_parts, block, spec, chunks)
        return dq + gq, dkv + jnp.stack([gk, gv])

    def step(carry, _):
        dq, block, dkv = carry
        incoming = _shift(block, axis_name)
        dq, dkv = accumulate(dq, block, dkv)
        # dK/dV travel with their K/V block, one hop behind it.
        return (dq, incoming, _shift(dkv, axis_name)), None

    refs = (q, k, d_out)
    init = (varying_like(jnp.zeros(q.shape, jnp.float32), *refs),
            _travelling(k, v, mask.kv),
            varying_like(jnp.zeros((2, *k.shape), jnp.float32), *refs))
    (dq, block, dkv), _ = jax.lax.scan(step, init, None, length=n - 1, unroll=True)
    dq, dkv = accumulate(dq, block, dkv)
    dk, dv = _shift(dkv, axis_name)  # the last hop home; K/V themselves need not move again
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)
