"""Attention kernels behind one entry point (`flash_attention`)."""

from longvila_jax.kernels.attention import flash_attention

__all__ = ["flash_attention"]
