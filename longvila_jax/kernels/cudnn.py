"""cuDNN flash attention through `jax.nn.dot_product_attention`: the baseline, and a fast path.

cuDNN takes no segment ids or arbitrary positions, so this backend serves only unpacked
attention with default positions (the API checks that before choosing it). Its LSE comes
from `return_residual=True`. The backward uses cuDNN's own when no LSE cotangent flows;
with one (ring merges), the exact blockwise XLA backward takes over.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longvila_jax.kernels import xla


def _attend(q, k, v, causal, scale):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        implementation="cudnn", return_residual=True)


def forward(q, k, v, mask, spec):
    out, lse = _attend(q, k, v, spec.causal, spec.scale)
    return out, jnp.swapaxes(lse, 1, 2).astype(jnp.float32)  # [b, sq, h] -> [b, h, sq]


def backward(q, k, v, mask, out, lse, d_out, d_lse, spec):
    if d_lse is not None:
        return xla.backward(q, k, v, mask, out, lse, d_out, d_lse, spec)
    _, vjp = jax.vjp(lambda q, k, v: _attend(q, k, v, spec.causal, spec.scale)[0], q, k, v)
    return vjp(d_out.astype(q.dtype))
