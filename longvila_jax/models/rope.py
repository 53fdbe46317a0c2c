"""Rotary position embeddings (half-split layout, as Qwen2 and Llama checkpoints expect).

Context extension changes only the inverse frequencies: a larger theta, linear scaling
(positions divided by `factor`) or Llama-3.1's banded scaling.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, scaling) -> np.ndarray:
    """`[head_dim // 2]` float64 inverse frequencies after the configured scaling.

    `scaling` is a mapping with `type` in {'none', 'linear', 'llama3'} and its parameters.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = scaling["type"]
    if kind == "none":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        out = np.where(wavelen > old_len / low, inv / factor, inv)
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(is_mid, mid, out)
    raise ValueError(f"rope_scaling.type: unknown value {kind!r}")


def apply_rope(x, positions, inv_freq):
    """Rotate `x` `[batch, seq, heads, head_dim]` by integer `positions` `[batch, seq]`."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
