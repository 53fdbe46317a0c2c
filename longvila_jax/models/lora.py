"""LoRA adapters on the LLM's stacked linear layers (LongVILA stage 4, LongLoRA-style).

`apply_lora` swaps each target `Linear` of the stacked decoder (`llm.layers.<target>`) for
a `LoRALinear` that holds the SAME kernel/bias Variables, so base parameter paths
(`llm/layers/q_proj/kernel`) are unchanged and base checkpoints load as they are; the
adapters add `llm/layers/<target>/lora_a` `[layers, in, rank]` and `.../lora_b`
`[layers, rank, out]`, stacked like every other layer parameter and sliced per layer by
`scan_layers`. `merge_lora` (a model) and `merge_lora_params` (a flat checkpoint dict)
fold `kernel + lora_a @ lora_b * alpha / rank` back in with one shared function.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longvila_jax.models.layers import Linear, param

LORA_NAMES = ("lora_a", "lora_b")


def is_lora_path(path) -> bool:
    """Whether a parameter path (a tuple of keys, e.g. from `model_params`) is an adapter."""
    return bool(path) and str(path[-1]) in LORA_NAMES


# The nnx filter for the adapter parameters, e.g. `nnx.grad(loss, argnums=nnx.DiffState(0,
# LORA_FILTER))` or `nnx.state(model, LORA_FILTER)`.
LORA_FILTER = nnx.All(nnx.Param, lambda path, _: is_lora_path(path))


def lora_scale(lora_cfg) -> float:
    return float(lora_cfg.alpha) / int(lora_cfg.rank)


def lora_targets(lora_cfg) -> list[str]:
    return [t for t in lora_cfg.targets.split(",") if t]


class LoRALinear(Linear):
    """`x @ kernel + bias + (x @ lora_a @ lora_b) * scale`, adapting an existing `Linear`.

    Built on a stacked `Linear` (kernel `[layers, in, out]`), so the adapters carry the
    leading `layers` axis from creation. `lora_a` is normal with std `1 / sqrt(3 * in)`:
    the variance of PEFT's default (`kaiming_uniform_(a=sqrt(5))`, uniform in
    `±1/sqrt(in)`) that LongLoRA trains with, so its learning rates carry over.
    `lora_b` is zero, so a fresh adapter leaves the model unchanged.
    """

    def __init__(self, base: Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        layers, d_in, d_out = self.kernel.shape
        param_dtype = self.kernel.dtype
        self.lora_a = param(rngs, (layers, d_in, rank), param_dtype, "normal",
                            1.0 / math.sqrt(3 * d_in), stacked=True)
        self.lora_b = param(rngs, (layers, rank, d_out), param_dtype, "zeros", stacked=True)
        self.scale = float(alpha) / rank

    def __call__(self, x):
        x = x.astype(self.dtype)
        delta = jnp.dot(jnp.dot(x, self.lora_a[...].astype(self.dtype)),
                        self.lora_b[...].astype(self.dtype))
        return super().__call__(x) + delta * jnp.asarray(self.scale, self.dtype)


def apply_lora(model, lora_cfg, rngs: nnx.Rngs):
    """Wrap `model.llm.layers.<target>` for each target in `LoRALinear`, in place.

    No-op when `lora_cfg` is None or its rank is 0; returns `model`.
    """
    if lora_cfg is None or lora_cfg.rank == 0:
        return model
    layers = model.llm.layers
    for name in lora_targets(lora_cfg):
        base = getattr(layers, name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"apply_lora: llm.layers.{name} already has LoRA adapters")
        setattr(layers, name, LoRALinear(base, rank=lora_cfg.rank, alpha=lora_cfg.alpha,
                                         rngs=rngs))
    return model


@jax.jit
def _merged(kernel, a, b, scale):
    """`kernel + a @ b * scale` for stacked `[layers, in, out]` kernels, float32 math (full
    precision: no TF32) and the kernel's dtype out."""
    delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + delta * scale).astype(kernel.dtype)


def merge_lora_params(flat_params: dict, lora_cfg) -> dict:
    """Flat `{path: array}` (as `train/checkpoint.model_params`) with adapters folded into
    their kernels and the `lora_a`/`lora_b` entries dropped; a new dict, numpy values."""
    scale = np.float32(lora_scale(lora_cfg))
    out = {k: v for k, v in flat_params.items() if not is_lora_path(k)}
    for path in flat_params:
        if str(path[-1]) != "lora_a":
            continue
        prefix = path[:-1]
        kernel = flat_params[(*prefix, "kernel")]
        merged = _merged(kernel, flat_params[path], flat_params[(*prefix, "lora_b")], scale)
        out[(*prefix, "kernel")] = np.asarray(merged)
    return out


def merge_lora(model):
    """Fold every `LoRALinear` of `model.llm.layers` into a plain `Linear`, in place.

    The merged `Linear` keeps the same kernel/bias Variables (so paths and sharding
    metadata are unchanged); returns `model`.
    """
    layers = model.llm.layers
    for name, module in list(vars(layers).items()):
        if not isinstance(module, LoRALinear):
            continue
        module.kernel[...] = _merged(module.kernel[...], module.lora_a[...],
                                     module.lora_b[...], np.float32(module.scale))
        shape = module.kernel.shape[1:]
        linear = nnx.eval_shape(lambda s=shape, m=module: Linear(
            *s, bias=m.bias is not None, rngs=nnx.Rngs(0),
            param_dtype=m.kernel.dtype, dtype=m.dtype))
        linear.kernel, linear.bias = module.kernel, module.bias
        setattr(layers, name, linear)
    return model
