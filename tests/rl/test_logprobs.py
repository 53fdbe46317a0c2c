"""RL's two views of an answer's log-probabilities agree: the sampler's (cached decoding)
and the training forward's (`parallel.mmsp.logprobs_fn`, the pass the policy update
differentiates), for the same weights, on one device and sequence-parallel."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from longvila_jax.parallel.layout import SPEC, Layout
from longvila_jax.parallel.mesh import make_mesh
from longvila_jax.parallel.mmsp import logprobs_fn


@pytest.mark.parametrize(("mesh", "scheme"), [((1, 1), "none"), ((8, 1), "ring"),
                                              ((1, 8), "ulysses"), ((2, 4), "2d")])
def test_training_forward_logprobs_equal_the_samplers(rollouts, policy_model, mesh, scheme):
    model = policy_model(rollouts["seed"])  # the same weights, stacked, as training holds them
    devices = jax.devices()[: mesh[0] * mesh[1]]
    layout = Layout(scheme, 1, *mesh)
    device_mesh = make_mesh(1, *mesh, devices)
    rows = rollouts["rows"]
    laid = jax.device_put(layout.lay_out(rows.batch), NamedSharding(device_mesh, SPEC))
    got = np.asarray(logprobs_fn(device_mesh, scheme)(model, laid, rollouts["table"]))
    natural = np.zeros_like(got)
    natural[:, layout.permutation(got.shape[1])] = got
    for r, (answer, want) in enumerate(zip(rollouts["ids"], rollouts["logprobs"],
                                           strict=True)):
        start = rows.starts[r]
        np.testing.assert_allclose(natural[r, start: start + len(answer)], want,
                                   rtol=1e-5, atol=1e-5)
        assert np.all(natural[r, : start] == 0) and np.all(natural[r, start + len(answer):] == 0)
