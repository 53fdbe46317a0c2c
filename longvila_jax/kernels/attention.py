"""The one attention entry point every model and parallel scheme calls.

`flash_attention(q, k, v, mask, spec)` returns `(out, lse)` and is differentiable in both.
The mask is a `Mask` value (global positions and segment ids, see `mask.py`) or None for
plain unpacked attention; the spec is a frozen `AttentionSpec` (causal, scale, backend),
static under jit, which a model builds once from its config and hands to every call, its
sequence-parallel and decoding ones included. The backward is public
(`flash_attention_bwd`) because ring attention calls it with the ring-merged out/lse.
Backends implement `forward(q, k, v, mask, spec) -> (out, lse)` and
`backward(q, k, v, mask, out, lse, d_out, d_lse, spec) -> (dq, dk, dv)`, given a full mask
and a spec whose backend and scale are resolved.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from longvila_jax.kernels import xla
from longvila_jax.kernels.manual_axes import varying_like
from longvila_jax.kernels.mask import Mask

BACKENDS = ("auto", "xla", "triton", "mosaic", "cudnn")
# The names under which the forward rules tag attention's results; `selective` remat
# keeps exactly these (models/layers.py).
REMAT_NAMES = ("attention_out", "attention_lse")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """How to attend: `causal`, the softmax `scale` (None: head_dim ** -0.5) and the
    `backend` (one of `BACKENDS`). Hashable: it is a static argument of jitted code."""

    causal: bool = True
    scale: float | None = None
    backend: str = "auto"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"flash_attention: unknown backend {self.backend!r}; one of "
                             f"{BACKENDS}")


def _backend(name: str):
    """The backend module; GPU ones are imported only when asked for."""
    if name == "xla":
        return xla
    if name == "triton":
        from longvila_jax.kernels import triton

        return triton
    if name == "mosaic":
        from longvila_jax.kernels import mosaic

        return mosaic
    from longvila_jax.kernels import cudnn

    return cudnn


def _choose(backend: str, q, unmasked: bool) -> str:
    """Resolve 'auto' to the fastest correct backend (bench/attention.py,
    docs/benchmarks.md): on a GPU, cuDNN for plain (unpacked, default-position) attention;
    for everything else our Mosaic GPU kernels on Hopper (bf16/fp16, head dim 64 or 128),
    the Triton kernels elsewhere; the blockwise XLA path off GPU and for decoding's few
    query rows."""
    if backend != "auto":
        if backend == "cudnn" and not unmasked:
            raise ValueError("flash_attention: backend 'cudnn' takes no positions or segment "
                             "ids; use 'triton', 'mosaic' or 'xla' for packed or offset "
                             "attention")
        if backend == "mosaic" and not _mosaic_supports(q):
            raise ValueError(f"flash_attention: backend 'mosaic' needs a Hopper GPU, bf16 or "
                             f"fp16 and head dim 64 or 128; got {q.dtype} q {q.shape} on "
                             f"{jax.devices()[0].device_kind}")
        return backend
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return "xla"
    if q.shape[1] <= xla.DECODE_ROWS:  # decoding: GPU kernels' query tiles would be padding
        return "xla"
    if unmasked and q.shape[-1] in (64, 128):
        return "cudnn"
    return "mosaic" if _mosaic_supports(q) else "triton"


def _mosaic_supports(q) -> bool:
    if jax.default_backend() != "gpu":
        return False
    from longvila_jax.kernels import mosaic

    return mosaic.supports(q)


def skips_hidden_tiles(spec: AttentionSpec, q) -> bool:
    """Whether masked attention on `q` under `spec` runs a kernel that skips fully hidden
    tiles by itself; callers then need no `lax.cond` around pieces that see nothing."""
    return _choose(spec.backend, q, unmasked=False) in ("triton", "mosaic")


def _resolve(q, k, mask: Mask | None, spec: AttentionSpec) -> tuple[Mask, AttentionSpec]:
    """The full mask (defaults filled in) and the spec with its backend and scale chosen."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"flash_attention: heads={heads} is not a multiple of kv_heads={kv_heads}")
    unmasked = mask is None and q_len == kv_len
    if mask is None:
        mask = Mask.default(batch, q_len, kv_len)
    scale = head_dim**-0.5 if spec.scale is None else float(spec.scale)
    return mask, AttentionSpec(spec.causal, scale, _choose(spec.backend, q, unmasked))


def flash_attention(q, k, v, mask: Mask | None, spec: AttentionSpec):
    """Attention returning `(out, lse)`.

    q `[batch, q_seq, heads, head_dim]`, k/v `[batch, kv_seq, kv_heads, head_dim]` with
    `heads % kv_heads == 0`; `mask` None means positions `arange` and one segment on both
    sides. Returns out in q's dtype and lse `[batch, heads, q_seq]` float32 (natural log).
    Rows that see no key give out = 0 and lse = -inf, and pass no gradient.
    """
    mask, spec = _resolve(q, k, mask, spec)
    return _attention(q, k, v, mask, spec)


def name_for_remat(out, lse):
    """Tag the attention residuals that `selective` remat keeps (models/layers.py).

    Called in forward rules only (which run only under differentiation), so an attention
    nested inside another one's forward, as each ring step is, is not tagged and not kept.
    """
    return tuple(checkpoint_name(x, name) for x, name in zip((out, lse), REMAT_NAMES,
                                                             strict=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, spec):
    out, lse = _backend(spec.backend).forward(q, k, v, mask, spec)
    # Inside shard_map, kernel outputs must vary over the mesh axes their inputs vary over.
    refs = (q, k, v, *mask.arrays())
    return varying_like(out, *refs), varying_like(lse, *refs)


def _attention_fwd(q, k, v, mask, spec):
    # symbolic_zeros wraps every primal leaf
    q, k, v, mask = jax.tree.map(lambda p: p.value, (q, k, v, mask))
    out, lse = name_for_remat(*_attention(q, k, v, mask, spec))
    return (out, lse), (q, k, v, mask, out, lse)


def _attention_bwd(spec, residuals, cotangents):
    q, k, v, mask, out, lse = residuals
    d_out, d_lse = cotangents
    # Symbolic zeros tell the backends when nothing flows into lse (cuDNN's backward can
    # then be used) and when nothing flows into out (ring steps that only merge lse).
    if isinstance(d_lse, SymbolicZero):
        d_lse = None
    if isinstance(d_out, SymbolicZero):
        d_out = jnp.zeros_like(out)
    grads = _backend(spec.backend).backward(q, k, v, mask, out, lse, d_out, d_lse, spec)
    grads = [varying_like(g, p) for g, p in zip(grads, (q, k, v), strict=True)]
    return (*grads, None)


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def flash_attention_bwd(q, k, v, out, lse, d_out, d_lse, mask: Mask | None,
                        spec: AttentionSpec):
    """`(dq, dk, dv)` of attention given its FINAL `out` and `lse`.

    Ring attention calls this once per KV block with the output and LSE merged over the
    whole ring; the result is that block's exact share of the gradient. `d_lse` is the
    cotangent of lse (None for zero).
    """
    mask, spec = _resolve(q, k, mask, spec)
    grads = _backend(spec.backend).backward(q, k, v, mask, out, lse, d_out, d_lse, spec)
    return tuple(varying_like(g, x, out, d_out) for g, x in zip(grads, (q, k, v), strict=True))
