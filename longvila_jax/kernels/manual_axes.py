"""Typing of freshly made arrays inside `shard_map` (JAX's varying-manual-axes check).

A loop carry or a `cond` branch built from constants is 'unvarying' over the mesh axes,
while values computed from sharded inputs are 'varying'; scan and cond reject the mix.
"""

from __future__ import annotations

import jax


def varying_like(x, *refs):
    """`x` typed as varying over every manual mesh axis that any of `refs` varies over."""
    axes = set()
    for ref in refs:
        aval = jax.typeof(ref)
        manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.12; before: aval.vma
        axes |= set(manual.varying if manual is not None else getattr(aval, "vma", ()))
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x
