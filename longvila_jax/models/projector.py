"""Vision-to-language projectors with VILA's exact token-merge orders.

Each projector is VILA's `nn.Sequential`; the modules keep its indices (`layers.1`,
`layers.2`, ...) so checkpoint keys map one to one. The block merge must reproduce
VILA's reshapes exactly or real checkpoints silently produce garbage:
for a merged token (i, j) the channels are the block's patches in row-major order,
[x[b*i + a, b*j + c] for a in range(b) for c in range(b)], and the merged tokens come
out column-major (j-major) for `mlp_downsample` but row-major for the `_fix` variants.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from longvila_jax.models.layers import LayerNorm, Linear, gelu

# projector type -> (block size, tokens row-major?)
MERGES = {
    "mlp2x_gelu": (1, True),
    "mlp_downsample": (2, False),
    "mlp_downsample_2x2_fix": (2, True),
    "mlp_downsample_3x3_fix": (3, True),
}


def merge_blocks(x, grid: int, block: int, row_major: bool):
    """`[n, grid*grid, c]` row-major patches -> `[n, ceil(grid/block)^2, block*block*c]`.

    Grids not divisible by `block` get zero rows/columns appended at the bottom/right.
    """
    if block == 1:
        return x
    n, _, c = x.shape
    pad = (-grid) % block
    x = jnp.pad(x.reshape(n, grid, grid, c), ((0, 0), (0, pad), (0, pad), (0, 0)))
    g = (grid + pad) // block
    x = x.reshape(n, g, block, g, block, c)  # [n, i, a, j, b, c]
    order = (0, 1, 3, 2, 4, 5) if row_major else (0, 3, 1, 2, 4, 5)
    return x.transpose(order).reshape(n, g * g, block * block * c)


def layer_specs(kind: str, vision_dim: int, llm_dim: int):
    """VILA's Sequential as (index, op, d_in, d_out); op in {'ln', 'linear', 'gelu'}."""
    c = vision_dim
    if kind == "mlp2x_gelu":
        return [(0, "linear", c, llm_dim), (1, "gelu", 0, 0), (2, "linear", llm_dim, llm_dim)]
    if kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return [(1, "ln", 4 * c, 4 * c), (2, "linear", 4 * c, llm_dim), (3, "gelu", 0, 0),
                (4, "linear", llm_dim, llm_dim)]
    if kind == "mlp_downsample_3x3_fix":
        return [(1, "ln", 9 * c, 9 * c), (2, "linear", 9 * c, 3 * c), (3, "gelu", 0, 0),
                (4, "ln", 3 * c, 3 * c), (5, "linear", 3 * c, llm_dim), (6, "gelu", 0, 0),
                (7, "linear", llm_dim, llm_dim)]
    raise ValueError(f"model.projector.type: unknown value {kind!r}")


class Projector(nnx.Module):
    """Vision features `[frames, patches, vision_dim]` -> LLM tokens `[frames, tokens, llm_dim]`."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        kind = model_cfg.projector.type
        dtype, param_dtype = jnp.dtype(model_cfg.dtype), jnp.dtype(model_cfg.param_dtype)
        self.specs = tuple(layer_specs(kind, model_cfg.vision.hidden_size,
                                       model_cfg.llm.hidden_size))
        layers = {}
        for index, op, d_in, d_out in self.specs:
            if op == "ln":
                layers[str(index)] = LayerNorm(d_in, eps=1e-5, rngs=rngs,
                                               param_dtype=param_dtype)
            elif op == "linear":
                layers[str(index)] = Linear(d_in, d_out, bias=True,
                                            rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.layers = nnx.Dict(layers)
        self.block, self.row_major = MERGES[kind]
        self.grid = model_cfg.vision.image_size // model_cfg.vision.patch_size

    @property
    def tokens_per_image(self) -> int:
        return (-(-self.grid // self.block)) ** 2

    def __call__(self, features):
        x = merge_blocks(features, self.grid, self.block, self.row_major)
        for index, op, _, _ in self.specs:
            # torch.nn.GELU() in VILA and LLaVA projectors is the exact (erf) GELU.
            x = gelu(x, approximate=False) if op == "gelu" else self.layers[str(index)](x)
        return x
