"""Projectors against a float64 numpy forward built from VILA's definitions.

The merge reference is written straight from the spec (one merged token at a time), so a
wrong reshape or transpose order in `merge_blocks` shows up as a mismatch.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longvila_jax.config import base_config, validate
from longvila_jax.models.projector import Projector, merge_blocks

TOL = 1e-4


def reference_merge(x, grid, block, row_major):
    """`[n, grid*grid, c]` row-major patches -> merged tokens, one (i, j) at a time."""
    x = np.asarray(x, np.float64)
    n, _, c = x.shape
    side = -(-grid // block) * block

    def patch(row, col):
        # Zero rows/columns appended at the bottom/right.
        if row >= grid or col >= grid:
            return np.zeros((n, c))
        return x[:, row * grid + col]

    g = side // block
    out = np.zeros((n, g * g, block * block * c))
    for i in range(g):
        for j in range(g):
            token = i * g + j if row_major else j * g + i
            out[:, token] = np.concatenate(
                [patch(block * i + a, block * j + b) for a in range(block) for b in range(block)],
                axis=-1)
    return out


@pytest.mark.parametrize("row_major", [False, True])
@pytest.mark.parametrize("grid,block", [(4, 2), (5, 2), (7, 2), (27, 2), (7, 3), (9, 3),
                                        (10, 3)])
def test_merge_blocks_matches_spec(rng, grid, block, row_major):
    n, c = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    x = rng.normal(size=(n, grid * grid, c)).astype(np.float32)
    got = np.asarray(merge_blocks(jnp.asarray(x), grid, block, row_major))
    want = reference_merge(x, grid, block, row_major)
    assert got.shape == want.shape == (n, (-(-grid // block)) ** 2, block * block * c)
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_block_one_keeps_row_major_patches(rng):
    # mlp2x_gelu: one token per patch, in the tower's row-major order.
    grid = int(rng.integers(2, 6))
    x = rng.normal(size=(2, grid * grid, 3)).astype(np.float32)
    got = np.asarray(merge_blocks(jnp.asarray(x), grid, 1, row_major=True))
    np.testing.assert_array_equal(got, reference_merge(x, grid, 1, True).astype(np.float32))


def test_column_and_row_major_differ(rng):
    # Guards the test above against an order-blind reference: the two orders must disagree.
    x = rng.normal(size=(1, 16, 2)).astype(np.float32)
    col = np.asarray(merge_blocks(jnp.asarray(x), 4, 2, row_major=False))
    row = np.asarray(merge_blocks(jnp.asarray(x), 4, 2, row_major=True))
    assert not np.array_equal(col, row)
    np.testing.assert_array_equal(col[0, [0, 2, 1, 3]], row[0])


def layer_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


_erf = np.vectorize(math.erf)


def gelu_exact(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


# VILA's nn.Sequential per projector type: (block, row-major, ops with their indices).
VILA_PROJECTORS = {
    "mlp2x_gelu": (1, True, [("linear", "0"), ("gelu", None), ("linear", "2")]),
    "mlp_downsample": (2, False, [("ln", "1"), ("linear", "2"), ("gelu", None),
                                  ("linear", "4")]),
    "mlp_downsample_2x2_fix": (2, True, [("ln", "1"), ("linear", "2"), ("gelu", None),
                                         ("linear", "4")]),
    "mlp_downsample_3x3_fix": (3, True, [("ln", "1"), ("linear", "2"), ("gelu", None),
                                         ("ln", "4"), ("linear", "5"), ("gelu", None),
                                         ("linear", "7")]),
}


def reference_projector(proj, features, grid, kind):
    block, row_major, ops = VILA_PROJECTORS[kind]
    x = reference_merge(features, grid, block, row_major)
    for op, index in ops:
        if op == "gelu":
            x = gelu_exact(x)
            continue
        layer = proj.layers[index]
        if op == "ln":
            x = layer_norm(x, np.asarray(layer.scale[...], np.float64),
                           np.asarray(layer.bias[...], np.float64))
        else:
            x = x @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...],
                                                                          np.float64)
    return x


def projector_config(kind, image_size, vision_dim, llm_dim):
    cfg = base_config()
    cfg.model.projector.type = kind
    cfg.model.vision.image_size = image_size
    cfg.model.vision.patch_size = 14
    cfg.model.vision.hidden_size = vision_dim
    cfg.model.vision.num_heads = 1
    cfg.model.llm.hidden_size = llm_dim
    return validate(cfg)


@pytest.mark.parametrize("kind", list(VILA_PROJECTORS))
@pytest.mark.parametrize("image_size", [384, 70])
def test_projector_matches_reference(rng, random_model, kind, image_size):
    vision_dim, llm_dim = int(rng.integers(2, 6)), int(rng.integers(4, 12))
    cfg = projector_config(kind, image_size, vision_dim, llm_dim)
    proj = random_model(lambda: Projector(cfg.model, rngs=nnx.Rngs(0)))
    grid = image_size // 14
    frames = int(rng.integers(1, 3))
    features = rng.normal(size=(frames, grid * grid, vision_dim)).astype(np.float32)
    got = np.asarray(nnx.jit(lambda p, x: p(x))(proj, jnp.asarray(features)))
    want = reference_projector(proj, features, grid, kind)
    block = VILA_PROJECTORS[kind][0]
    assert proj.tokens_per_image == (-(-grid // block)) ** 2
    assert got.shape == want.shape == (frames, proj.tokens_per_image, llm_dim)
    assert np.max(np.abs(got - want)) <= TOL * max(1.0, np.max(np.abs(want)))


@pytest.mark.parametrize("kind,tokens", [("mlp2x_gelu", 729), ("mlp_downsample", 196),
                                         ("mlp_downsample_2x2_fix", 196),
                                         ("mlp_downsample_3x3_fix", 81)])
def test_tokens_per_image_at_384px(kind, tokens):
    cfg = projector_config(kind, 384, 4, 8)
    proj = nnx.eval_shape(lambda: Projector(cfg.model, rngs=nnx.Rngs(0)))
    assert proj.tokens_per_image == tokens
