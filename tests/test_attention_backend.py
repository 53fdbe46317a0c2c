"""`model.attention_backend` reaches every attention the model runs: the vision tower, the
MM-SP training step's sequence-parallel attention, sequence-parallel prefill and decoding
against the sharded KV cache (their attention hooks once called the kernel without it)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from longvila_jax.checkpoint import build_model
from longvila_jax.configs import model_config
from longvila_jax.data.batch import from_rows
from longvila_jax.infer.decode import Sampling
from longvila_jax.infer.engine import InferenceEngine
from longvila_jax.kernels import attention
from longvila_jax.parallel.layout import Layout
from longvila_jax.parallel.mesh import make_mesh
from longvila_jax.parallel.mmsp import loss_fn


@pytest.fixture
def requested(monkeypatch):
    """The backend every attention call asked for, recorded as it is traced."""
    asked = []
    choose = attention._choose

    def spy(backend, q, unmasked):
        asked.append(backend)
        return choose(backend, q, unmasked)

    monkeypatch.setattr(attention, "_choose", spy)
    return asked


@pytest.fixture(scope="module")
def model():
    config = model_config("tiny")
    config.model.attention_backend = "xla"  # on a CPU 'auto' resolves to it: only the ask differs
    return build_model(config, seed=0)


def test_training_asks_every_attention_for_the_configured_backend(model, requested, rng):
    frames = rng.normal(size=(2, 56, 56, 3)).astype(np.float32)
    media = [model.media_token_id] * (2 * model.media_tokens_per_frame)
    ids = np.asarray([media + list(rng.integers(0, 500, 64 - len(media)))], np.int32)
    for scheme, (node, local) in (("ring", (8, 1)), ("ulysses", (1, 8)), ("2d", (2, 4))):
        batch = Layout(scheme, 1, node, local).lay_out(
            from_rows(ids, ids, frames[None], media_token_id=model.media_token_id))
        mesh = make_mesh(1, node, local)
        jax.jit(lambda b, mesh=mesh, scheme=scheme: loss_fn(mesh, scheme)(model, b)).lower(
            batch)
    assert requested and set(requested) == {"xla"}, sorted(set(requested))


def test_prefill_and_decoding_ask_for_the_configured_backend(model, requested, rng):
    engine = InferenceEngine(model, mesh=make_mesh(1, 2, 4), scheme="2d")
    table = engine.encode(rng.normal(size=(1, 56, 56, 3)).astype(np.float32))
    media = [model.media_token_id] * model.media_tokens_per_frame
    prompt = np.asarray(media + list(rng.integers(0, 500, 9)), np.int32)
    engine.generate_ids([prompt], table, sampling=Sampling(2))
    assert requested and set(requested) == {"xla"}, sorted(set(requested))
