"""Attention kernels behind one entry point (`flash_attention`)."""

from longvila_jax.kernels.attention import flash_attention, flash_attention_bwd

__all__ = ["flash_attention", "flash_attention_bwd"]
