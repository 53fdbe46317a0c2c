"""Model-test fixtures: modules built abstractly, then filled with fresh random parameters.

Library init (0.02-scale normals, zero biases, unit norms) would hide bias and norm-scale
bugs and give near-zero logits; every parameter here is drawn from the test's `rng` with
a scale that keeps activations O(1), so a 1e-4 tolerance is a real constraint.
Building under `nnx.eval_shape` also skips compiling the initialisers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


def _name(path) -> str:
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    keys = [str(k) for k in keys if k is not None and k != "value"]
    return keys[-1]


def _draw(rng: np.random.Generator, path, leaf):
    name, shape = _name(path), leaf.shape
    noise = rng.normal(size=shape)
    if name == "scale":
        value = 1.0 + 0.2 * noise
    elif name.endswith("bias"):
        value = 0.2 * noise
    elif name == "embed_tokens":
        value = noise
    elif name == "position_embedding":
        value = 0.5 * noise
    else:  # kernels `[..., in, out]`
        value = noise / np.sqrt(shape[-2])
    return jnp.asarray(value, leaf.dtype)


@pytest.fixture
def random_model(rng):
    """`build(factory)`: the module `factory()` makes, with every parameter drawn from `rng`."""

    def build(factory):
        model = nnx.eval_shape(factory)
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree_util.tree_map_with_path(
            lambda path, leaf: _draw(rng, path, leaf), state))
        return model

    return build
