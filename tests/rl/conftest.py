"""Rollouts shared by RL's tests: a tiny model's sampled answers to two prompts about one
video, with the sampler's log-probabilities, and the answers as training rows."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from longvila_jax.checkpoint import build_model
from longvila_jax.configs import model_config
from longvila_jax.infer.decode import Sampling
from longvila_jax.infer.engine import InferenceEngine
from longvila_jax.parallel.mesh import make_mesh
from longvila_jax.rl.policy_batch import answer_rows

FRAMES = 3
ANSWERS = 2  # per prompt


def _policy_model(seed: int):
    """The tiny model, untied, weights scaled up so that sampling wanders (as in the
    engine's tests)."""
    config = model_config("tiny")
    config.model.llm.tie_embeddings = False
    model = build_model(config, seed=seed)
    nnx.update(model, jax.tree.map(lambda p: p * 6.0 if p.ndim == 2 else p,
                                   nnx.state(model, nnx.Param)))
    return model


@pytest.fixture(scope="session")
def policy_model():
    """`policy_model(seed)`: the tiny model, untied, weights scaled up."""
    return _policy_model


@pytest.fixture(scope="module")
def rollouts(module_rng):
    """Two prompts about one video, `ANSWERS` sampled answers each (10 tokens at most),
    the sampler's log-probabilities and the rows prompt + answer (a multiple of 16 wide)."""
    seed = int(module_rng.integers(1 << 30))
    engine = InferenceEngine(_policy_model(seed), mesh=make_mesh(1, 1, 1, jax.devices()[:1]))
    frames = module_rng.normal(size=(FRAMES, 56, 56, 3)).astype(np.float32)
    table = engine.encode(frames)
    media = np.full(FRAMES * engine.tokens_per_frame, engine.media_token_id)
    prompts = [np.concatenate([module_rng.integers(0, 500, 4), media,
                               module_rng.integers(0, 500, n)]).astype(np.int32)
               for n in (5, 11)]
    ids, logprobs = engine.generate_ids_and_logprobs(
        prompts, table, sampling=Sampling(10, n=ANSWERS, temperature=1.0,
                                          seed=int(module_rng.integers(1 << 30))))
    rows = answer_rows(prompts, ids, ANSWERS, 16, engine.media_token_id)
    return {"seed": seed, "table": np.asarray(table).reshape(-1, table.shape[-1]),
            "rows": rows, "ids": ids, "logprobs": logprobs, "prompts": prompts,
            "media_token_id": engine.media_token_id}
