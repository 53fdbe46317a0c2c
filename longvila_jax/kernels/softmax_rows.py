"""The per-query-row terms every flash backward starts from, in plain JAX.

Why one place: the Triton and Mosaic backwards take the same final out/lse (a ring's merged
ones too) and must agree on how an LSE cotangent and rows that saw no key enter.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

LOG2E = math.log2(math.e)


def backward_rows(out, lse, d_out, d_lse):
    """`(delta, lse2)`, float32 `[b, h, sq]`.

    delta = rowsum(dO * O) - d_lse: an LSE cotangent enters the scores' gradient as
    P * d_lse, i.e. as a shift of delta. lse2 is the base-2 LSE, +inf on rows that see
    nothing, so exp2(s - lse2) = 0 there without a mask.
    """
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    if d_lse is not None:
        delta = delta - d_lse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf).astype(jnp.float32)
    return delta, lse2
