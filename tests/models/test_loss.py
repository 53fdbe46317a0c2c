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


def _nll_gradients_float64(h, weight, targets):
    """d(summed NLL)/dh and /dweight in float64: (softmax - onehot) times the operands."""
    logits = h.astype(np.float64) @ weight.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    valid = targets != IGNORE_INDEX
    g = p - np.eye(weight.shape[1])[np.where(valid, targets, 0)]
    g *= valid[..., None]
    return g @ weight.T.astype(np.float64), np.einsum("bsd,bsv->dv", h.astype(np.float64), g)


def test_nll_gradients_match_float64_in_float32_and_bfloat16(rng):
    """The loss's own backward (gradients formed beside each chunk's loss, in the operands'
    dtype): exact in float32; in bf16 within bf16 rounding of the float64 gradient."""
    h = rng.normal(size=(2, 30, 16)).astype(np.float32)
    weight = rng.normal(size=(16, 48)).astype(np.float32) / 4
    targets = rng.integers(0, 48, (2, 30)).astype(np.int32)
    targets[rng.uniform(size=targets.shape) < 0.25] = IGNORE_INDEX
    for dtype, rtol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        hh, ww = jnp.asarray(h, dtype), jnp.asarray(weight, dtype)
        want = _nll_gradients_float64(np.asarray(hh, np.float64), np.asarray(ww, np.float64),
                                      targets)
        for chunk, argnums in ((8, (0, 1)), (64, (0, 1)), (8, (0,)), (8, (1,))):
            # A mean (the count's cotangent is dropped); one argument alone (LoRA's frozen
            # output weight), in chunks and in one piece.
            def mean(a, b, chunk=chunk):
                nll, count = chunked_token_nll(a, b, targets, chunk)
                return nll / count

            got = jax.grad(mean, argnums)(hh, ww)
            count = (targets != IGNORE_INDEX).sum()
            for g, w in zip(got, [want[i] / count for i in argnums], strict=True):
                assert g.dtype == dtype
                err = np.abs(np.asarray(g, np.float64) - w).max() / np.abs(w).max()
                assert err <= rtol, (dtype, chunk, argnums, err)


def test_logits_weight_gradient_sums_over_sequence_shards(rng):
    """Inside shard_map, with positions sharded and the weight replicated, the weight's
    gradient is the whole sequence's (the custom backward's piece summed over shards)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    h = rng.normal(size=(1, 32, 8)).astype(np.float32)
    weight = rng.normal(size=(8, 24)).astype(np.float32)
    targets = rng.integers(0, 24, (1, 32)).astype(np.int32)
    mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4])

    def loss(hh, ww, tt):
        nll = jax.shard_map(lambda a, b, t: jax.lax.psum(chunked_token_nll(a, b, t, 4)[0],
                                                         "sp"),
                            mesh=mesh, in_specs=(P(None, "sp"), P(), P(None, "sp")),
                            out_specs=P())(hh, ww, tt)
        return nll

    sharded = NamedSharding(mesh, P(None, "sp"))
    args = (jax.device_put(h, sharded), jax.device_put(weight, NamedSharding(mesh, P())),
            jax.device_put(targets, sharded))
    got = jax.jit(jax.grad(loss, (0, 1)))(*args)
    want = _nll_gradients_float64(h, weight, targets)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5)
