"""Blockwise flash attention in plain JAX: online softmax over KV blocks (`lax.scan`).

Memory is O(q_seq x block) per step instead of O(q_seq x kv_seq); runs on every device and
is the reference the GPU kernels are tested against. Forward and backward are the
FlashAttention-2 recurrences; the backward recomputes probabilities from the saved LSE.
Shapes: q `[b, sq, h, d]`, k/v `[b, skv, kh, d]`, lse `[b, h, sq]`; heads are grouped
`[kh, h // kh]` so GQA never repeats K/V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longvila_jax.kernels.manual_axes import varying_like

BLOCK_K = 512
# Up to this many query rows (decoding: one new token per sequence) the scores `[rows, kv]`
# are small even for a 400K-token cache, so the keys are one block: no loop, one fused pass
# over the cache, which is what bounds a decode step.
DECODE_ROWS = 16


def _blocks(k, v, kv_positions, kv_segment_ids, block):
    """Pad KV to whole blocks and put the block index first: `[n_blocks, b, block, ...]`."""
    b, skv = k.shape[:2]
    block = min(block, skv)
    n = -(-skv // block)
    pad = n * block - skv
    valid = jnp.ones((b, skv), bool)  # padding appends False

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, block, *x.shape[2:]), 1, 0)

    return tuple(map(split, (k, v, kv_positions, kv_segment_ids, valid)))


def _mask(q_positions, q_segment_ids, kv_pos, kv_seg, valid, causal):
    """`[b, 1, 1, sq, block]` visibility of one KV block."""
    mask = (q_segment_ids[:, :, None] == kv_seg[:, None, :]) & valid[:, None, :]
    if causal:
        mask &= kv_pos[:, None, :] <= q_positions[:, :, None]
    return mask[:, None, None]


def forward(q, k, v, mask, spec, block_k=BLOCK_K):
    """`(out [b, sq, h, d] in q.dtype, lse [b, h, sq] float32)`."""
    q_positions, kv_positions, q_segment_ids, kv_segment_ids = mask.arrays()
    causal, scale = spec.causal, spec.scale
    b, sq, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, sq, kh, h // kh, d)
    if sq <= DECODE_ROWS:
        block_k = max(k.shape[1], 1)

    def step(carry, blk):
        m, denom, acc = carry
        kb, vb, pos, seg, valid = blk
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, kb, preferred_element_type=jnp.float32) * scale
        s = jnp.where(_mask(q_positions, q_segment_ids, pos, seg, valid, causal), s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all-masked so far: exp(-inf)=0
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        denom = alpha * denom + p.sum(-1)
        pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), vb,
                        preferred_element_type=jnp.float32)
        return (m_new, denom, alpha[..., None] * acc + pv), None

    refs = (q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    init = tuple(varying_like(x, *refs) for x in (
        jnp.full((b, kh, h // kh, sq), -jnp.inf, jnp.float32),
        jnp.zeros((b, kh, h // kh, sq), jnp.float32),
        jnp.zeros((b, kh, h // kh, sq, d), jnp.float32)))
    (m, denom, acc), _ = jax.lax.scan(step, init, _blocks(k, v, kv_positions, kv_segment_ids,
                                                      block_k))
    seen = denom > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, denom, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)
    out = jnp.moveaxis(out, 3, 1).reshape(b, sq, h, d).astype(q.dtype)
    return out, lse.reshape(b, h, sq)


def backward(q, k, v, mask, out, lse, d_out, d_lse, spec, block_k=BLOCK_K):
    """`(dq, dk, dv)` given the final (possibly ring-merged) `out` and `lse`."""
    q_positions, kv_positions, q_segment_ids, kv_segment_ids = mask.arrays()
    causal, scale = spec.causal, spec.scale
    b, sq, h, d = q.shape
    skv, kh = k.shape[1], k.shape[2]
    g = h // kh
    qg = q.reshape(b, sq, kh, g, d)
    dog = d_out.reshape(b, sq, kh, g, d)
    lse_g = lse.reshape(b, kh, g, sq)
    lse_safe = jnp.where(jnp.isfinite(lse_g), lse_g, 0.0)
    # D_i = rowsum(dO * O); the LSE cotangent enters as P * d_lse, i.e. D - d_lse.
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", dog.astype(jnp.float32),
                       out.reshape(b, sq, kh, g, d).astype(jnp.float32))
    if d_lse is not None:
        delta = delta - d_lse.reshape(b, kh, g, sq).astype(jnp.float32)

    def step(dq, blk):
        kb, vb, pos, seg, valid = blk
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, kb, preferred_element_type=jnp.float32) * scale
        visible = _mask(q_positions, q_segment_ids, pos, seg, valid, causal)
        p = jnp.where(visible, jnp.exp(s - lse_safe[..., None]), 0.0)
        dv = jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(d_out.dtype), dog,
                        preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqhgd,bkhd->bhgqk", dog, vb, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bhgqk,bkhd->bqhgd", ds, kb, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, qg, preferred_element_type=jnp.float32)
        return dq, (dk, dv)

    refs = (q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, out, lse, d_out)
    dq0 = varying_like(jnp.zeros((b, sq, kh, g, d), jnp.float32), *refs)
    dq, (dk, dv) = jax.lax.scan(step, dq0, _blocks(k, v, kv_positions, kv_segment_ids, block_k))

    def unblock(x):  # [n, b, block, kh, d] -> [b, skv, kh, d]
        return jnp.moveaxis(x, 0, 1).reshape(b, -1, kh, d)[:, :skv]

    return (dq.reshape(b, sq, h, d).astype(q.dtype), unblock(dk).astype(k.dtype),
            unblock(dv).astype(v.dtype))
