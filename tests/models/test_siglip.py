"""The SigLIP tower against a float64 numpy forward (patchify, pre-LN encoder, layer select).

Patches are cut pixel by pixel in (kh, kw, rgb) order, matching `patch_kernel`'s rows;
image sizes not divisible by the patch exercise the VALID-conv cropping.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longvila_jax.config import base_config, validate
from longvila_jax.models.siglip import SiglipVisionTower

TOL = 1e-4
_erf = np.vectorize(math.erf)


def gelu(x, approximate):
    if approximate:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def reference_patches(image, patch, grid):
    """`[H, W, 3]` -> `[grid*grid, patch*patch*3]`, row-major patches, (kh, kw, rgb) inside."""
    out = np.zeros((grid * grid, patch * patch * 3))
    for r in range(grid):
        for c in range(grid):
            out[r * grid + c] = [image[r * patch + kh, c * patch + kw, ch]
                                 for kh in range(patch) for kw in range(patch) for ch in range(3)]
    return out


def reference_tower(tower, images, vcfg, layers_run):
    f = lambda v: np.asarray(v[...], np.float64)
    layers = tower.layers
    heads, c, eps = vcfg.num_heads, vcfg.hidden_size, vcfg.layer_norm_eps
    hd = c // heads
    approximate = vcfg.hidden_act == "gelu_pytorch_tanh"
    grid = vcfg.image_size // vcfg.patch_size
    outs = []
    for image in np.asarray(images, np.float64):
        x = reference_patches(image, vcfg.patch_size, grid) @ f(tower.patch_kernel)
        x = x + f(tower.patch_bias) + f(tower.position_embedding)
        for i in range(layers_run):
            y = layer_norm(x, f(layers.layer_norm1.scale)[i], f(layers.layer_norm1.bias)[i], eps)
            q, k, v = (y @ f(p.kernel)[i] + f(p.bias)[i] for p in (layers.q_proj, layers.k_proj,
                                                                layers.v_proj))
            attn = np.zeros_like(x)
            for h in range(heads):
                cols = slice(h * hd, (h + 1) * hd)
                scores = q[:, cols] @ k[:, cols].T / math.sqrt(hd)
                w = np.exp(scores - scores.max(-1, keepdims=True))
                attn[:, cols] = (w / w.sum(-1, keepdims=True)) @ v[:, cols]
            x = x + attn @ f(layers.out_proj.kernel)[i] + f(layers.out_proj.bias)[i]
            y = layer_norm(x, f(layers.layer_norm2.scale)[i], f(layers.layer_norm2.bias)[i], eps)
            y = gelu(y @ f(layers.fc1.kernel)[i] + f(layers.fc1.bias)[i], approximate)
            x = x + y @ f(layers.fc2.kernel)[i] + f(layers.fc2.bias)[i]
        outs.append(x)
    return np.stack(outs)


def vision_config(rng, image_size, patch_size, select_layer=-2, act="gelu_pytorch_tanh"):
    cfg = base_config()
    v = cfg.model.vision
    v.num_heads = int(rng.choice([1, 2, 4]))
    v.hidden_size = v.num_heads * int(rng.choice([4, 8]))
    v.intermediate_size = int(rng.integers(8, 40))
    v.num_layers = int(rng.integers(2, 4))
    v.patch_size, v.image_size = patch_size, image_size
    v.layer_norm_eps = float(rng.choice([1e-6, 1e-5]))
    v.select_layer, v.hidden_act = select_layer, act
    return validate(cfg)


_tower = nnx.jit(lambda t, x: t(x))


@pytest.mark.parametrize("image_size,patch_size", [(60, 14), (56, 14), (23, 5)])
def test_tower_matches_reference(rng, random_model, image_size, patch_size):
    cfg = vision_config(rng, image_size, patch_size)
    vcfg = cfg.model.vision
    tower = random_model(lambda: SiglipVisionTower(cfg.model, rngs=nnx.Rngs(0)))
    frames, grid = int(rng.integers(1, 3)), image_size // patch_size
    images = rng.normal(size=(frames, image_size, image_size, 3)).astype(np.float32)
    got = np.asarray(_tower(tower, jnp.asarray(images)))
    assert got.shape == (frames, grid * grid, vcfg.hidden_size)
    want = reference_tower(tower, images, vcfg, vcfg.num_layers - 1)
    assert np.max(np.abs(got - want)) <= TOL
    # Only pixels inside grid*patch count: changing the cropped margin changes nothing.
    if image_size % patch_size:
        edge = images.copy()
        edge[:, grid * patch_size:, :, :] = rng.normal(size=edge[:, grid * patch_size:].shape)
        edge[:, :, grid * patch_size:, :] = 5.0
        np.testing.assert_array_equal(np.asarray(_tower(tower, jnp.asarray(edge))), got)


@pytest.mark.parametrize("select_layer,act,scan", [
    (-1, "gelu", True), (1, "gelu_pytorch_tanh", True), (-2, "gelu", True),
    (-2, "gelu_pytorch_tanh", False), (1, "gelu", False)])
def test_select_layer_and_activation(rng, random_model, select_layer, act, scan):
    cfg = vision_config(rng, 28, 7, select_layer=select_layer, act=act)
    cfg.model.scan_layers = scan  # unrolled: the same layers in a Python loop
    vcfg = cfg.model.vision
    tower = random_model(lambda: SiglipVisionTower(cfg.model, rngs=nnx.Rngs(0)))
    images = rng.normal(size=(1, 28, 28, 3)).astype(np.float32)
    got = np.asarray(_tower(tower, jnp.asarray(images)))
    run = select_layer if select_layer > 0 else vcfg.num_layers + 1 + select_layer
    want = reference_tower(tower, images, vcfg, run)
    assert np.max(np.abs(got - want)) <= TOL


def test_rejects_images_of_the_wrong_size(rng, random_model):
    cfg = vision_config(rng, 28, 7)
    tower = random_model(lambda: SiglipVisionTower(cfg.model, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="patch grid"):
        tower(jnp.asarray(rng.normal(size=(1, 21, 21, 3)), jnp.float32))
