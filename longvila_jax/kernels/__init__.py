"""Attention kernels behind one entry point (`flash_attention`), its mask and its spec."""

from longvila_jax.kernels.attention import AttentionSpec, flash_attention, flash_attention_bwd
from longvila_jax.kernels.mask import Mask, Tokens

__all__ = ["AttentionSpec", "Mask", "Tokens", "flash_attention", "flash_attention_bwd"]
