"""The one attention entry point every model and parallel scheme calls.

Masking is expressed only through global token positions and segment ids, so packed
documents, ring chunks and sequence-parallel shards all use the same rule:
a query may see a key iff they share a segment and (not causal or kv_pos <= q_pos).
This file holds the exact XLA path; faster kernels plug in behind `backend`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla")


def attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal):
    """Boolean visibility `[batch, q_seq, kv_seq]` from positions and segment ids."""
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
    return mask


def flash_attention(
    q,
    k,
    v,
    *,
    q_positions=None,
    kv_positions=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str = "auto",
):
    """Attention returning `(out, lse)`.

    Shapes: q `[batch, q_seq, heads, head_dim]`, k/v `[batch, kv_seq, kv_heads, head_dim]`
    with `heads % kv_heads == 0` (GQA handled by grouping, never by repeating K/V).
    Positions and segment ids are int `[batch, seq]`; omitted positions mean `arange`,
    omitted segments mean one segment. Returns out `[batch, q_seq, heads, head_dim]` in
    q's dtype and lse `[batch, heads, q_seq]` in float32 (natural log). Rows that see
    no key give out = 0 and lse = -inf.
    """
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention: unknown backend {backend!r}; one of {BACKENDS}")
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"flash_attention: heads={heads} is not a multiple of kv_heads={kv_heads}")
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((batch, q_len), jnp.int32)
    if kv_segment_ids is None:
        kv_segment_ids = jnp.zeros((batch, kv_len), jnp.int32)
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale

    groups = heads // kv_heads
    qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal)
    mask = mask[:, None, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    # A fully masked row has max -inf; shifting by 0 keeps exp() at 0 instead of NaN.
    safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(logits - jax.lax.stop_gradient(safe_max))
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    safe_denom = jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", (probs / safe_denom).astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    lse = jnp.where(denom > 0, jnp.log(safe_denom) + jax.lax.stop_gradient(safe_max), -jnp.inf)
    out = out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
    return out, lse[..., 0].reshape(batch, heads, q_len)
