"""The optimizer against closed forms: the warmup-cosine schedule, AdamW's update with
masked weight decay and global-norm clipping (float64 numpy), accumulation equal to one
large batch, and `optim` config errors naming the key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longvila_jax.config.schema import ConfigError, base_config, validate
from longvila_jax.train.optimizer import make_optimizer, schedule


def optim_config(rng, **overrides):
    optim = base_config().optim
    optim.learning_rate = float(rng.uniform(1e-4, 1e-2))
    optim.total_steps = int(rng.integers(50, 200))
    optim.warmup_steps = int(rng.integers(1, optim.total_steps // 2))
    optim.end_lr_fraction = float(rng.uniform(0, 0.2))
    optim.weight_decay = float(rng.uniform(0.01, 0.2))
    for key, value in overrides.items():
        optim[key] = value
    return optim


def test_schedule_is_linear_warmup_then_cosine(rng):
    optim = optim_config(rng)
    lr, warm, total = optim.learning_rate, optim.warmup_steps, optim.total_steps
    end = lr * optim.end_lr_fraction
    fn = schedule(optim)
    for step in (int(s) for s in rng.integers(0, total + 20, 25)):
        if step < warm:
            want = lr * step / warm
        else:
            frac = min(step - warm, total - warm) / (total - warm)
            want = end + (lr - end) * 0.5 * (1 + np.cos(np.pi * frac))
        assert abs(float(fn(step)) - want) <= 1e-6 * lr, (step, float(fn(step)), want)


def adamw_reference(params, grads_seq, optim):
    """float64 numpy AdamW with global-norm clipping and decay on matrices only."""
    m = {k: np.zeros(x.shape) for k, x in params.items()}
    v = {k: np.zeros(x.shape) for k, x in params.items()}
    p = {k: x.astype(np.float64) for k, x in params.items()}
    for t, grads in enumerate(grads_seq, start=1):
        norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
        scale = min(1.0, optim.clip_norm / norm) if optim.clip_norm else 1.0
        lr = float(schedule(optim)(t - 1))
        for k in p:
            g = grads[k].astype(np.float64) * scale
            m[k] = optim.b1 * m[k] + (1 - optim.b1) * g
            v[k] = optim.b2 * v[k] + (1 - optim.b2) * g * g
            update = (m[k] / (1 - optim.b1**t)) / (np.sqrt(v[k] / (1 - optim.b2**t)) + optim.eps)
            if p[k].ndim >= 2:
                update = update + optim.weight_decay * p[k]
            p[k] = p[k] - lr * update
    return p


def run(tx, params, grads_seq):
    state, p = tx.init(params), {k: jnp.asarray(x) for k, x in params.items()}
    for grads in grads_seq:
        updates, state = tx.update(grads, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    return p


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_updates_match_float64_adamw(rng, clip):
    optim = optim_config(rng, clip_norm=clip)
    params = {"w": rng.standard_normal((4, 3)).astype(np.float32),
              "b": rng.standard_normal(3).astype(np.float32)}
    grads_seq = [{k: rng.standard_normal(x.shape).astype(np.float32) for k, x in params.items()}
                 for _ in range(int(rng.integers(3, 7)))]
    got = run(make_optimizer(optim), params, grads_seq)
    want = adamw_reference(params, grads_seq, optim)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=1e-6)


def test_accumulation_equals_one_large_batch(rng):
    k = int(rng.integers(2, 5))
    optim = optim_config(rng, warmup_steps=0)  # the first update has the peak rate, not 0
    params = {"w": rng.standard_normal((5, 2)).astype(np.float32)}
    micro = [{"w": rng.standard_normal((5, 2)).astype(np.float32)} for _ in range(k)]
    single = make_optimizer(optim)
    optim.accumulation_steps = k
    got = run(make_optimizer(optim), params, micro)
    want = run(single, params, [{"w": np.mean([g["w"] for g in micro], axis=0)}])
    np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(want["w"]), rtol=1e-5,
                               atol=1e-7)
    assert not np.allclose(np.asarray(got["w"]), params["w"])  # a step was taken


@pytest.mark.parametrize("key,value,message", [
    ("warmup_steps", 5000, "optim.warmup_steps: invalid value 5000"),
    ("learning_rate", 0.0, "optim.learning_rate: invalid value 0.0"),
    ("b2", 1.0, "optim.b2: invalid value 1.0"),
    ("accumulation_steps", 0, "optim.accumulation_steps: invalid value 0"),
    ("clip_norm", -1.0, "optim.clip_norm: invalid value -1.0"),
])
def test_bad_optim_values_name_the_key(key, value, message):
    config = base_config()
    config.optim[key] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)
