"""Sequence parallelism: the device mesh and the attention schemes that run over it."""

from longvila_jax.parallel.attention2d import attention_2d
from longvila_jax.parallel.mesh import AXES, make_mesh
from longvila_jax.parallel.ring import merge, merge_over, ring_attention, zigzag_permutation
from longvila_jax.parallel.schemes import (
    SCHEMES,
    layout_permutation,
    resolve_scheme,
    sequence_parallel_attention,
)
from longvila_jax.parallel.ulysses import HeadLayout, head_layout, ulysses, ulysses_attention

__all__ = ["AXES", "SCHEMES", "HeadLayout", "attention_2d", "head_layout", "layout_permutation",
           "make_mesh", "merge", "merge_over", "resolve_scheme",
           "ring_attention", "sequence_parallel_attention", "ulysses", "ulysses_attention",
           "zigzag_permutation"]
