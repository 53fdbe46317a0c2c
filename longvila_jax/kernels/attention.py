"""The one attention entry point every model and parallel scheme calls.

Masking is expressed only through global token positions and segment ids, so packed
documents, ring chunks, zigzag halves and sequence-parallel shards all use one rule:
a query sees a key iff they share a segment and (not causal or kv_pos <= q_pos).
`flash_attention` returns `(out, lse)` and is differentiable in both; its backward is
public (`flash_attention_bwd`) because ring attention calls it with the ring-merged
out/lse. Backends implement `forward(...) -> (out, lse)` and `backward(...) -> (dq, dk, dv)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from longvila_jax.kernels import xla
from longvila_jax.kernels.manual_axes import varying_like

BACKENDS = ("auto", "xla", "triton", "cudnn")


def _backend(name: str):
    """The backend module; GPU ones are imported only when asked for."""
    if name == "xla":
        return xla
    if name == "triton":
        from longvila_jax.kernels import triton

        return triton
    if name == "cudnn":
        from longvila_jax.kernels import cudnn

        return cudnn
    raise ValueError(f"flash_attention: unknown backend {name!r}; one of {BACKENDS}")


def _choose(backend: str, q, unmasked: bool) -> str:
    """Resolve 'auto': cuDNN for plain (unpacked, default-position) attention on GPU, our
    Triton kernel for everything else on GPU, the blockwise XLA path elsewhere and for
    decoding's few query rows."""
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention: unknown backend {backend!r}; one of {BACKENDS}")
    if backend != "auto":
        if backend == "cudnn" and not unmasked:
            raise ValueError("flash_attention: backend 'cudnn' takes no positions or segment "
                             "ids; use 'triton' or 'xla' for packed or offset attention")
        return backend
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return "xla"
    if q.shape[1] <= xla.DECODE_ROWS:  # decoding: GPU kernels' query tiles would be padding
        return "xla"
    return "cudnn" if unmasked and q.shape[-1] in (64, 128) else "triton"


def skips_hidden_tiles(backend: str, q) -> bool:
    """Whether masked (positions/segments) attention on `q` runs a kernel that skips fully
    hidden tiles by itself; callers then need no `lax.cond` around pieces that see nothing."""
    return _choose(backend, q, unmasked=False) == "triton"


def _prepare(q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids, softmax_scale):
    """(masks with defaults filled in, scale, unmasked: no mask inputs and square attention)."""
    unmasked = all(x is None for x in (q_positions, kv_positions, q_segment_ids,
                                       kv_segment_ids)) and q.shape[1] == k.shape[1]
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"flash_attention: heads={heads} is not a multiple of kv_heads={kv_heads}")

    def arange(n):
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))

    def zeros(n):
        return jnp.zeros((batch, n), jnp.int32)

    masks = (arange(q_len) if q_positions is None else q_positions,
             arange(kv_len) if kv_positions is None else kv_positions,
             zeros(q_len) if q_segment_ids is None else q_segment_ids,
             zeros(kv_len) if kv_segment_ids is None else kv_segment_ids)
    return masks, head_dim**-0.5 if softmax_scale is None else float(softmax_scale), unmasked


def flash_attention(q, k, v, *, q_positions=None, kv_positions=None, q_segment_ids=None,
                    kv_segment_ids=None, causal: bool, softmax_scale: float | None = None,
                    backend: str = "auto"):
    """Attention returning `(out, lse)`.

    q `[batch, q_seq, heads, head_dim]`, k/v `[batch, kv_seq, kv_heads, head_dim]` with
    `heads % kv_heads == 0`. Positions and segment ids are int32 `[batch, seq]`; omitted
    positions mean `arange`, omitted segments one segment. Returns out in q's dtype and
    lse `[batch, heads, q_seq]` float32 (natural log). Rows that see no key give out = 0
    and lse = -inf, and pass no gradient.
    """
    masks, scale, unmasked = _prepare(q, k, q_positions, kv_positions, q_segment_ids,
                                      kv_segment_ids, softmax_scale)
    return _attention(q, k, v, *masks, causal, scale, _choose(backend, q, unmasked))


def name_for_remat(out, lse):
    """Tag the attention residuals that `selective` remat keeps (models/layers.py).

    Called in forward rules only (which run only under differentiation), so an attention
    nested inside another one's forward, as each ring step is, is not tagged and not kept.
    """
    return checkpoint_name(out, "attention_out"), checkpoint_name(lse, "attention_lse")


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, scale, backend):
    out, lse = _backend(backend).forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal=causal,
                                         scale=scale)
    # Inside shard_map, kernel outputs must vary over the mesh axes their inputs vary over.
    refs = (q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return varying_like(out, *refs), varying_like(lse, *refs)


def _attention_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, scale, backend):
    args = [p.value for p in (q, k, v, q_pos, kv_pos, q_seg, kv_seg)]  # symbolic_zeros wraps
    out, lse = _attention(*args, causal, scale, backend)
    out, lse = name_for_remat(out, lse)
    return (out, lse), (*args, out, lse)


def _attention_bwd(causal, scale, backend, residuals, cotangents):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents
    # Symbolic zeros tell the backends when nothing flows into lse (cuDNN's backward can
    # then be used) and when nothing flows into out (ring steps that only merge lse).
    if isinstance(d_lse, SymbolicZero):
        d_lse = None
    if isinstance(d_out, SymbolicZero):
        d_out = jnp.zeros_like(out)
    grads = _backend(backend).backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, d_out,
                                       d_lse, causal=causal, scale=scale)
    grads = [varying_like(g, p) for g, p in zip(grads, (q, k, v), strict=True)]
    return (*grads, None, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def flash_attention_bwd(q, k, v, out, lse, d_out, d_lse=None, *, q_positions=None,
                        kv_positions=None, q_segment_ids=None, kv_segment_ids=None,
                        causal: bool, softmax_scale: float | None = None, backend: str = "auto"):
    """`(dq, dk, dv)` of attention given its FINAL `out` and `lse`.

    Ring attention calls this once per KV block with the output and LSE merged over the
    whole ring; the result is that block's exact share of the gradient. `d_lse` is the
    cotangent of lse (None for zero).
    """
    masks, scale, unmasked = _prepare(q, k, q_positions, kv_positions, q_segment_ids,
                                      kv_segment_ids, softmax_scale)
    grads = _backend(_choose(backend, q, unmasked)).backward(
        q, k, v, *masks, out, lse, d_out, d_lse, causal=causal, scale=scale)
    return tuple(varying_like(g, x, out, d_out) for g, x in zip(grads, (q, k, v), strict=True))
