"""SigLIP vision tower (no pooling head), returning the features LongVILA selects.

LongVILA reads `hidden_states[mm_vision_select_layer]` (-2): the output of all but the
last encoder layer, before `post_layernorm`. Only the layers needed are run, but every
checkpoint weight is kept so export reproduces the folder bit for bit.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from longvila_jax.kernels import AttentionSpec, flash_attention
from longvila_jax.models.layers import LayerNorm, Linear, gelu, param, scan_layers, stacked


class EncoderLayer(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, attention_backend, rngs):
        c = cfg.hidden_size
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.layer_norm1 = LayerNorm(c, eps=cfg.layer_norm_eps, rngs=rngs,
                                     param_dtype=param_dtype)
        self.q_proj = Linear(c, c, bias=True, **kw)
        self.k_proj = Linear(c, c, bias=True, **kw)
        self.v_proj = Linear(c, c, bias=True, **kw)
        self.out_proj = Linear(c, c, bias=True, **kw)
        self.layer_norm2 = LayerNorm(c, eps=cfg.layer_norm_eps, rngs=rngs,
                                     param_dtype=param_dtype)
        self.fc1 = Linear(c, cfg.intermediate_size, bias=True, **kw)
        self.fc2 = Linear(cfg.intermediate_size, c, bias=True, **kw)
        self.num_heads = cfg.num_heads
        self.attention = AttentionSpec(causal=False, backend=attention_backend)
        self.approximate_gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def __call__(self, x):
        n, s, c = x.shape
        hd = c // self.num_heads
        y = self.layer_norm1(x)
        q, k, v = (p(y).reshape(n, s, self.num_heads, hd)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        attn, _ = flash_attention(q, k, v, None, self.attention)
        x = x + self.out_proj(attn.reshape(n, s, c))
        y = self.layer_norm2(x)
        return x + self.fc2(gelu(self.fc1(y), self.approximate_gelu))


class SiglipVisionTower(nnx.Module):
    """Images `[frames, height, width, 3]` (normalised) -> features `[frames, patches, hidden]`."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        cfg = model_cfg.vision
        dtype, param_dtype = jnp.dtype(model_cfg.dtype), jnp.dtype(model_cfg.param_dtype)
        p, c = cfg.patch_size, cfg.hidden_size
        self.grid, self.image_size = cfg.image_size // p, cfg.image_size
        # Kernel rows are ordered (kh, kw, rgb) to match patches cut from NHWC images.
        self.patch_kernel = param(rngs, (p * p * 3, c), param_dtype)
        self.patch_bias = param(rngs, (c,), param_dtype, "zeros")
        self.position_embedding = param(rngs, (self.grid * self.grid, c), param_dtype)
        self.layers = stacked(cfg.num_layers, lambda r: EncoderLayer(
            cfg, dtype=dtype, param_dtype=param_dtype,
            attention_backend=model_cfg.attention_backend, rngs=r), rngs)
        self.post_layernorm = LayerNorm(c, eps=cfg.layer_norm_eps, rngs=rngs,
                                        param_dtype=param_dtype)
        select = cfg.select_layer
        self.num_run = select if select > 0 else cfg.num_layers + 1 + select
        self.patch_size, self.dtype, self.remat = p, dtype, model_cfg.remat
        self.scan = model_cfg.scan_layers

    def patchify(self, images):
        """`[n, H, W, 3]` -> `[n, grid*grid, p*p*3]`; trailing pixels dropped like a VALID conv."""
        n, p, g = images.shape[0], self.patch_size, self.grid
        x = images[:, : g * p, : g * p, :].reshape(n, g, p, g, p, 3)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, p * p * 3)

    def __call__(self, images, gather=None):
        """`gather`: FSDP per-layer parameter gathering (see `scan_layers`)."""
        if images.shape[1] // self.patch_size != self.grid or images.shape[-1] != 3:
            raise ValueError(f"SiglipVisionTower: images of shape {images.shape} do not give a "
                             f"{self.grid}x{self.grid} patch grid of RGB pixels")
        x = jnp.dot(self.patchify(images.astype(self.dtype)),
                    self.patch_kernel[...].astype(self.dtype)) + self.patch_bias[...].astype(
                        self.dtype)
        x = x + self.position_embedding[...].astype(self.dtype)
        return scan_layers(self.layers, x, lambda layer, h, _: (layer(h), None),
                           remat=self.remat, count=self.num_run, gather=gather,
                           scan=self.scan)[0]
