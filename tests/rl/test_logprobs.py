"""RL's two views of an answer's log-probabilities agree: the sampler's (cached decoding)
and the training forward's (`parallel.mmsp.logprobs_fn`, the pass the policy update
differentiates), for the same weights, on one device and sequence-parallel."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from longvila_jax.checkpoint import build_model
from longvila_jax.configs import model_config
from longvila_jax.data.batch import from_rows
from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.infer.decode import Sampling
from longvila_jax.infer.engine import InferenceEngine
from longvila_jax.parallel.layout import SPEC, Layout
from longvila_jax.parallel.mesh import make_mesh
from longvila_jax.parallel.mmsp import logprobs_fn

FRAMES = 3


def _model(seed: int):
    """The tiny model, untied, weights scaled up so that sampling wanders (as in the
    engine's tests)."""
    config = model_config("tiny")
    config.model.llm.tie_embeddings = False
    model = build_model(config, seed=seed)
    nnx.update(model, jax.tree.map(lambda p: p * 6.0 if p.ndim == 2 else p,
                                   nnx.state(model, nnx.Param)))
    return model


@pytest.fixture(scope="module")
def rollouts(module_rng):
    """Two prompts about one video, two sampled answers each, with the sampler's
    log-probabilities; the rows prompt + answer, padded to 96 tokens."""
    seed = int(module_rng.integers(1 << 30))
    engine = InferenceEngine(_model(seed), mesh=make_mesh(1, 1, 1, jax.devices()[:1]))
    frames = module_rng.normal(size=(FRAMES, 56, 56, 3)).astype(np.float32)
    table = engine.encode(frames)
    media = np.full(FRAMES * engine.tokens_per_frame, engine.media_token_id)
    prompts = [np.concatenate([module_rng.integers(0, 500, 4), media,
                               module_rng.integers(0, 500, n)]).astype(np.int32)
               for n in (5, 11)]
    ids, logprobs = engine.generate_ids_and_logprobs(
        prompts, table, sampling=Sampling(10, n=2, temperature=1.0,
                                          seed=int(module_rng.integers(1 << 30))))
    width = 96
    rows = np.zeros((4, width), np.int32)
    labels = np.full((4, width), IGNORE_INDEX, np.int32)
    segments = np.ones((4, width), np.int32)  # padding: a segment of its own
    starts = []
    for r, answer in enumerate(ids):
        prompt = prompts[r // 2]
        full = np.concatenate([prompt, answer])
        rows[r, : len(full)], segments[r, : len(full)] = full, 0
        labels[r, len(prompt): len(full)] = answer
        starts.append(len(prompt) - 1)  # the position that predicts the answer's first token
    batch = from_rows(rows, labels, segment_ids=segments, media_token_id=engine.media_token_id)
    return {"seed": seed, "table": np.asarray(table).reshape(-1, table.shape[-1]),
            "batch": batch, "ids": ids, "logprobs": logprobs, "starts": starts}


@pytest.mark.parametrize(("mesh", "scheme"), [((1, 1), "none"), ((8, 1), "ring"),
                                              ((1, 8), "ulysses"), ((2, 4), "2d")])
def test_training_forward_logprobs_equal_the_samplers(rollouts, mesh, scheme):
    model = _model(rollouts["seed"])  # the same weights, stacked, as training holds them
    devices = jax.devices()[: mesh[0] * mesh[1]]
    layout = Layout(scheme, 1, *mesh)
    device_mesh = make_mesh(1, *mesh, devices)
    laid = jax.device_put(layout.lay_out(rollouts["batch"]), NamedSharding(device_mesh, SPEC))
    got = np.asarray(logprobs_fn(device_mesh, scheme)(model, laid, rollouts["table"]))
    natural = np.zeros_like(got)
    natural[:, layout.permutation(got.shape[1])] = got
    for r, (answer, want) in enumerate(zip(rollouts["ids"], rollouts["logprobs"],
                                           strict=True)):
        start = rollouts["starts"][r]
        np.testing.assert_allclose(natural[r, start: start + len(answer)], want,
                                   rtol=1e-5, atol=1e-5)
        assert np.all(natural[r, : start] == 0) and np.all(natural[r, start + len(answer):] == 0)
