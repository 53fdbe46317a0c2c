"""Typing of freshly made arrays inside `shard_map` (JAX's varying-manual-axes check).

A loop carry or a `cond` branch built from constants is 'unvarying' over the mesh axes,
while values computed from sharded inputs are 'varying'; scan and cond reject the mix.
"""

from __future__ import annotations

import jax


def _varying(x) -> set:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.12; before: aval.vma
    return set(manual.varying if manual is not None else getattr(aval, "vma", ()))


def varying_like(x, *refs):
    """`x` typed as varying over every manual mesh axis that any of `refs` varies over.

    Also repairs outputs of custom calls (jax-triton kernels) that come back unvarying.
    """
    missing = set().union(*(_varying(r) for r in refs)) - _varying(x)
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x
