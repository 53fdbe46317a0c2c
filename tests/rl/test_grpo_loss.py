"""GRPO's loss, KL terms and group advantages against float64 references written token by
token, on hand-made tokens that hit every branch (both clips, the dual clip) and random
ones, with answers of ragged lengths."""

from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longvila_jax.rl.grpo import KL_KINDS, LossConfig, group_advantages, kl_penalty, policy_loss

CONFIG = LossConfig()
# Kinks of the loss in the log-ratio: the two clip edges, the dual clip, the clamp.
KINKS = (math.log(1 - CONFIG.clip_low), math.log(1 + CONFIG.clip_high),
         math.log(CONFIG.dual_clip))


def _reference_kl(logp: float, ref: float, kind: str) -> float:
    if kind == "kl":
        return logp - ref
    if kind == "mse":
        return 0.5 * (logp - ref) ** 2
    log_ratio = min(max(ref - logp, -20.0), 20.0)
    return min(max(math.exp(log_ratio) - log_ratio - 1.0, -10.0), 10.0)


def _reference_loss(logp, old, advantages, mask, config, ref=None) -> float:
    """Token by token in float64: the clipped surrogate, the dual clip for negative
    advantages, beta x KL; averaged over every answer token."""
    total, count = 0.0, 0
    for i in range(logp.shape[0]):
        a = float(advantages[i])
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = math.exp(min(max(float(logp[i, t] - old[i, t]), -20.0), 20.0))
            clipped = min(max(ratio, 1 - config.clip_low), 1 + config.clip_high)
            loss = max(-a * ratio, -a * clipped)
            if a < 0:
                loss = min(loss, -a * config.dual_clip)
            if ref is not None:
                loss += config.beta * _reference_kl(float(logp[i, t]), float(ref[i, t]),
                                                    config.kl)
            total += loss
            count += 1
    return total / count


def _batch(rng):
    """Six answers of ragged lengths (3 to 9 tokens of 9): the first three hand-made so that
    every branch is taken, the rest random log-ratios kept 1e-3 away from every kink."""
    answers, width = 6, 9
    lengths = np.array([4, 3, 5, 9, 6, 7])
    mask = np.arange(width)[None] < lengths[:, None]
    old = rng.normal(-2.0, 0.5, (answers, width))
    log_ratio = rng.uniform(-1.5, 1.5, (answers, width))
    while True:
        near = np.min([np.abs(log_ratio - k) for k in KINKS], axis=0) < 1e-3
        if not near.any():
            break
        log_ratio[near] = rng.uniform(-1.5, 1.5, near.sum())
    log_ratio[0, :4] = [0.5, -0.5, 0.1, 2.0]  # A > 0: above the high clip, in range, ...
    log_ratio[1, :3] = [-0.5, 0.5, 1.5]       # A < 0: below the low clip, in range, dual
    log_ratio[2, :5] = [0.0, 0.0, 0.05, -0.05, 0.2]
    advantages = np.concatenate([[1.3, -0.8, 0.0], rng.normal(size=answers - 3)])
    ref = old + rng.normal(0, 0.3, (answers, width))
    return old + log_ratio, old, advantages, mask, ref


@pytest.mark.parametrize("kind", [None, *KL_KINDS])
def test_loss_and_gradient_match_float64(rng, kind):
    logp, old, advantages, mask, ref = _batch(rng)
    config = LossConfig(kl=kind or "kl", beta=0.05 if kind else 0.0)
    ref = ref if kind else None
    want = _reference_loss(logp, old, advantages, mask, config, ref)

    def loss(lp):
        return policy_loss(lp, jnp.asarray(old, jnp.float32), jnp.asarray(advantages,
                                                                          jnp.float32),
                           jnp.asarray(mask), config,
                           None if ref is None else jnp.asarray(ref, jnp.float32))

    (got, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logp,
                                                                              jnp.float32))
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    assert 0 < float(metrics["clip_fraction"]) < 1 and float(metrics["dual_clip_fraction"]) > 0
    # Central differences of the float64 reference, token by token (1e-3 from any kink).
    h = 1e-5
    for i, t in zip(*np.nonzero(mask), strict=True):
        up, down = logp.copy(), logp.copy()
        up[i, t] += h
        down[i, t] -= h
        numeric = (_reference_loss(up, old, advantages, mask, config, ref)
                   - _reference_loss(down, old, advantages, mask, config, ref)) / (2 * h)
        assert abs(float(grad[i, t]) - numeric) < 2e-4 * max(1.0, abs(numeric)), (i, t)
    assert np.all(np.asarray(grad)[~mask] == 0)  # padding tokens get nothing


def test_first_iteration_ratio_is_one_and_kl_to_itself_is_zero(rng):
    """Old log-probs equal to the policy's: every ratio is 1, the loss is minus the
    token-mean advantage, and its gradient the advantage-weighted log-prob gradient."""
    logp, _, advantages, mask, _ = _batch(rng)
    logp, adv, m = (jnp.asarray(x, jnp.float32) for x in (logp, advantages, mask))

    def loss(lp):
        return policy_loss(lp, jax.lax.stop_gradient(lp), adv, m, CONFIG, lp)[0]

    value, grad = jax.value_and_grad(loss)(logp)
    tokens = mask.sum()
    want = -(advantages[:, None] * mask).sum() / tokens
    np.testing.assert_allclose(float(value), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), -advantages[:, None] * mask / tokens,
                               rtol=1e-6, atol=1e-7)
    metrics = policy_loss(logp, logp, adv, m, CONFIG, logp)[1]
    assert float(metrics["ratio"]) == 1.0 and float(metrics["kl"]) == 0.0
    for kind in KL_KINDS:
        assert float(jnp.abs(kl_penalty(logp, logp, kind)).max()) == 0.0


def test_group_advantages_and_the_equal_reward_filter(rng):
    rewards = rng.uniform(0, 1, (4, 5)).round(1)
    rewards[2] = 0.9  # every answer the same: nothing to learn from this group
    advantages, kept = group_advantages(rewards, drop_equal=True)
    for g in range(4):
        mean, std = statistics.mean(rewards[g]), statistics.stdev(rewards[g])
        want = [(r - mean) / (std + 1e-6) for r in rewards[g]]
        np.testing.assert_allclose(advantages[g], want, rtol=1e-5, atol=1e-6)
    assert kept.tolist() == [True, True, False, True]
    assert group_advantages(rewards)[1].all()
    with pytest.raises(ValueError, match="answers >= 2"):
        group_advantages(rewards[:, :1])


def test_bad_loss_settings_are_named():
    with pytest.raises(ValueError, match=r"rl\.kl"):
        LossConfig(kl="k9")
    with pytest.raises(ValueError, match=r"rl\.dual_clip"):
        LossConfig(dual_clip=0.5)
