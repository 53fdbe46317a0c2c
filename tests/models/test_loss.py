"""Token losses and log-probabilities, chunked over positions, against float64 numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.models.loss import chunked_token_logprobs, chunked_token_nll


def _reference(h, weight, targets):
    """float64 log-softmax of h @ weight at each target, 0 where ignored."""
    logits = h.astype(np.float64) @ weight.astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = targets != IGNORE_INDEX
    picked = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    return np.where(valid, picked, 0.0)


def test_chunked_logprobs_and_nll_match_float64(rng):
    """50 positions in chunks of 16 (the last one padded), a quarter of the targets ignored;
    the gradient through the recomputed chunks is the unchunked one."""
    h = rng.normal(size=(2, 50, 8)).astype(np.float32)
    weight = rng.normal(size=(8, 40)).astype(np.float32)
    targets = rng.integers(0, 40, (2, 50)).astype(np.int32)
    targets[rng.uniform(size=targets.shape) < 0.25] = IGNORE_INDEX
    want = _reference(h, weight, targets)
    for chunk in (16, 64):
        got = chunked_token_logprobs(jnp.asarray(h), jnp.asarray(weight), targets, chunk)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        nll, count = chunked_token_nll(jnp.asarray(h), jnp.asarray(weight), targets, chunk)
        np.testing.assert_allclose(float(nll), -want.sum(), rtol=1e-5)
        assert int(count) == (targets != IGNORE_INDEX).sum()

    def total(hh, chunk):
        return chunked_token_logprobs(hh, jnp.asarray(weight), targets, chunk).sum()

    np.testing.assert_allclose(np.asarray(jax.grad(total)(jnp.asarray(h), 16)),
                               np.asarray(jax.grad(total)(jnp.asarray(h), 64)),
                               rtol=1e-5, atol=1e-6)


def test_chunked_entropy_matches_float64_and_passes_no_gradient(rng):
    """Each scored position's softmax entropy, in chunks or not, equals float64's; the
    log-probabilities beside it are unchanged, and the entropy adds no gradient."""
    h = rng.normal(size=(2, 37, 8)).astype(np.float32)
    weight = rng.normal(size=(8, 40)).astype(np.float32)
    targets = rng.integers(0, 40, (2, 37)).astype(np.int32)
    targets[rng.uniform(size=targets.shape) < 0.25] = IGNORE_INDEX
    logits = h.astype(np.float64) @ weight.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.where(targets != IGNORE_INDEX, -(p * np.log(p)).sum(-1), 0.0)
    for chunk in (8, 64):
        logp, ent = chunked_token_logprobs(jnp.asarray(h), jnp.asarray(weight), targets, chunk,
                                           entropy=True)
        np.testing.assert_allclose(np.asarray(ent), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(logp), _reference(h, weight, targets),
                                   rtol=1e-5, atol=1e-5)
        grad = jax.grad(lambda hh, chunk=chunk: chunked_token_logprobs(
            hh, jnp.asarray(weight), targets, chunk, entropy=True)[1].sum())(jnp.asarray(h))
        assert not np.asarray(grad).any()
