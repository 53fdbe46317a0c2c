"""Sequence parallelism: the device mesh and the attention schemes that run over it."""

from longvila_jax.parallel.attention2d import attention_2d
from longvila_jax.parallel.mesh import AXES, check_ulysses, make_mesh
from longvila_jax.parallel.ring import merge, ring_attention, zigzag_permutation
from longvila_jax.parallel.ulysses import ulysses, ulysses_attention

__all__ = ["AXES", "attention_2d", "check_ulysses", "make_mesh", "merge", "ring_attention",
           "ulysses", "ulysses_attention", "zigzag_permutation"]
