"""The per-query-row terms every flash backward starts from, in plain JAX.

Why one place: the Triton and Mosaic backwards take the same final out/lse (a ring's merged
ones too) and must agree on how an LSE cotangent and rows that saw no key enter.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)


def backward_rows(out, lse, d_out, d_lse):
    """`(delta, lse2)`, float32 `[b, h, sq]`.

    delta = rowsum(dO * O) - d_lse: an LSE cotangent enters the scores' gradient as
    P * d_lse, i.e. as a shift of delta. lse2 is the base-2 LSE, +inf on rows that see
    nothing, so exp2(s - lse2) = 0 there without a mask.
    """
    # Summed in [b, q, h], where the product lies, and transposed apart: fused, XLA may
    # give the reduction a [b, h, q] output layout and run it ~7x slower (Qwen2-1.5B at 16K
    # tokens, layers unrolled, one H200: 5.3 ms of the step; bench/NOTES.md item 42).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = jax.lax.optimization_barrier(delta).transpose(0, 2, 1)
    if d_lse is not None:
        delta = delta - d_lse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf).astype(jnp.float32)
    return delta, lse2
