"""GRPO's update step on the training forward: at the first iteration (old log-probabilities
recomputed by the same forward) the ratio is 1 and the gradient is the advantage-weighted
log-probability gradient; a policy equal to its reference has KL 0; and the whole step
(FSDP parameters, AdamW, sequence-parallel attention) equals the one-device step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longvila_jax.checkpoint import build_model
from longvila_jax.config import base_config
from longvila_jax.configs import model_config
from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.parallel import fsdp
from longvila_jax.parallel.layout import Layout
from longvila_jax.parallel.mesh import make_mesh
from longvila_jax.parallel.mmsp import logprobs_fn
from longvila_jax.rl.grpo import KL_KINDS, LossConfig
from longvila_jax.rl.loop import adapters_off
from longvila_jax.rl.policy_batch import answer_rows, grpo_loss_fn, place
from longvila_jax.rl.shared_prompt import SharedBatch, shared_loss_fn, shared_rows
from longvila_jax.train.step import make_optimizer_state, make_train_step


def _batch(rollouts, layout, mesh, advantages, ref=False):
    rows = rollouts["rows"]
    old = rows.per_token(rollouts["logprobs"])
    return place(rows, layout, mesh, rollouts["table"], old, advantages,
                 old if ref else None)


def _flat(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(nnx.state(tree))]


@pytest.mark.parametrize("kind", KL_KINDS)
def test_first_iteration_ratio_is_one_and_the_gradient_is_the_policy_gradient(
        rollouts, policy_model, rng, kind):
    model = policy_model(rollouts["seed"])
    mesh = make_mesh(1, 1, 1, jax.devices()[:1])
    layout = Layout("none")
    batch = _batch(rollouts, layout, mesh, rng.normal(size=len(rollouts["ids"])))
    recomputed = logprobs_fn(mesh, "none")(model, batch.tokens, batch.table)
    batch = dataclasses.replace(batch, old_logprobs=recomputed, ref_logprobs=recomputed)
    config = LossConfig(kl=kind, beta=0.05)
    loss = grpo_loss_fn(mesh, "none", config)
    (value, metrics), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model, batch)
    assert abs(float(metrics["ratio"]) - 1.0) < 1e-6
    assert float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["kl"]) == 0.0  # the policy is its reference
    _, entropy = logprobs_fn(mesh, "none", entropy=True)(model, batch.tokens, batch.table)
    scored = np.asarray(batch.tokens.targets != IGNORE_INDEX)
    assert float(metrics["entropy"]) > 0
    np.testing.assert_allclose(float(metrics["entropy"]), np.asarray(entropy)[scored].mean(),
                               rtol=1e-5)

    mask = np.asarray(batch.tokens.targets != IGNORE_INDEX)
    a = np.asarray(batch.advantages)

    def surrogate(model):
        logp = logprobs_fn(mesh, "none")(model, batch.tokens, batch.table)
        pg = -(logp * a[:, None] * mask).sum() / mask.sum()
        # The KL term's gradient at policy == reference: 0 for k3 and mse, the
        # log-probability gradient itself for `kl` (logp - ref).
        return pg + (config.beta * (logp * mask).sum() / mask.sum() if kind == "kl" else 0.0)

    want = nnx.jit(nnx.grad(surrogate))(model)
    np.testing.assert_allclose(float(value), -(a[:, None] * mask).sum() / mask.sum(),
                               rtol=1e-5, atol=1e-6)
    scale = np.sqrt(sum(np.sum(w ** 2) for w in _flat(want)))
    for g, w in zip(_flat(grads), _flat(want), strict=True):
        assert np.linalg.norm(g - w) <= 1e-5 * scale + 1e-6 * np.linalg.norm(w)


@pytest.mark.parametrize(("data", "node", "local", "scheme"),
                         [(1, 8, 1, "ring"), (1, 1, 8, "ulysses"), (1, 2, 4, "2d"),
                          (2, 2, 2, "2d")])
def test_sharded_policy_steps_equal_one_device(rollouts, policy_model, rng, data, node, local,
                                               scheme):
    optim = base_config().optim
    optim.learning_rate, optim.eps = 1e-3, 1e-5
    config = LossConfig(beta=0.02)
    advantages = [rng.normal(size=len(rollouts["ids"])) for _ in range(2)]
    outs, models = [], []
    for d, n, loc, s in ((1, 1, 1, "none"), (data, node, local, scheme)):
        mesh = make_mesh(d, n, loc, jax.devices()[: d * n * loc])
        layout = Layout(s, d, n, loc)
        model = policy_model(rollouts["seed"])
        optimizer = make_optimizer_state(model, optim)
        fsdp.place(model, optimizer, mesh)
        step = make_train_step(grpo_loss_fn(mesh, s, config, loss_chunk=16))
        metrics = []
        for a in advantages:
            batch = _batch(rollouts, layout, mesh, a, ref=True)
            metrics.append(jax.device_get(step(model, optimizer, batch)))
        outs.append(metrics)
        models.append(model)
    for want, got in zip(*outs, strict=True):
        assert got["applied"]
        for key in ("loss", "grad_norm", "ratio", "kl", "clip_fraction"):
            np.testing.assert_allclose(got[key], want[key], rtol=2e-4, atol=1e-6, err_msg=key)
    for g, w in zip(_flat(models[1]), _flat(models[0]), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def _shared(rollouts, ids, slots, logprobs, ref, advantages, multiple=1):
    """`SharedBatch` of `rollouts`' two questions, answer slot j of question q holding row
    `slots[q * n + j]` (None: no answer), those rows' answers cut to `ids[r]`."""
    n = len(rollouts["ids"]) // len(rollouts["prompts"])
    groups = [[ids[r] for r in slots[q * n: (q + 1) * n] if r is not None] for q in (0, 1)]
    rows = shared_rows(rollouts["prompts"], groups, rollouts["media_token_id"],
                       multiple=multiple)
    return SharedBatch(
        jax.tree.map(jnp.asarray, rows), jnp.asarray(rollouts["table"]),
        jnp.asarray(rows.per_token([None if r is None else logprobs[r] for r in slots])),
        jnp.asarray(rows.per_token([None if r is None else ref[r] for r in slots])),
        jnp.asarray([0.0 if r is None else advantages[r] for r in slots], jnp.float32))


def _ragged(rollouts, rng):
    """Answers of different lengths, and question 0 with one answer (empty slots beside it):
    `(ids, slots, logprobs, ref, advantages)` as `_shared` takes them."""
    n = len(rollouts["ids"]) // len(rollouts["prompts"])
    ids = [list(a[: max(1, len(a) - 2 * k)]) for k, a in enumerate(rollouts["ids"])]
    slots = [1, *[None] * (n - 1), *range(n, 2 * n)]
    keep = [r for r in slots if r is not None]
    logprobs = {r: rollouts["logprobs"][r][: len(ids[r])] for r in keep}
    ref = {r: rng.normal(size=len(ids[r])) - 3.0 for r in keep}
    advantages = {r: rng.normal() for r in keep}
    return ids, slots, logprobs, ref, advantages


def test_each_prompt_once_gives_the_loss_metrics_and_gradient_of_rows(rollouts, policy_model,
                                                                    rng):
    """`rl.shared_prompt`: answers beside their prompt, computed once per question, give
    the loss, the metrics and the gradient of rows prompt + answer, with answers of
    different lengths and a question with fewer answers than another (an empty slot)."""
    model = policy_model(rollouts["seed"])
    mesh = make_mesh(1, 1, 1, jax.devices()[:1])
    n = len(rollouts["ids"]) // len(rollouts["prompts"])
    ids, slots, logprobs, ref, advantages = _ragged(rollouts, rng)
    keep = [r for r in slots if r is not None]
    config = LossConfig(beta=0.05)

    rows = answer_rows([rollouts["prompts"][r // n] for r in keep], [ids[r] for r in keep], 1,
                       16, rollouts["media_token_id"])
    by_rows = place(rows, Layout("none"), mesh, rollouts["table"],
                    rows.per_token([logprobs[r] for r in keep]),
                    np.asarray([advantages[r] for r in keep]),
                    rows.per_token([ref[r] for r in keep]))
    by_question = _shared(rollouts, ids, slots, logprobs, ref, advantages)
    (want, want_metrics), want_grads = nnx.jit(nnx.value_and_grad(
        grpo_loss_fn(mesh, "none", config), has_aux=True))(model, by_rows)
    (got, metrics), grads = nnx.jit(nnx.value_and_grad(  # logits 24 tokens at a time
        shared_loss_fn(mesh, "none", config, loss_chunk=24), has_aux=True))(model, by_question)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-6)
    for key in ("pg_loss", "ratio", "kl", "clip_fraction", "entropy"):
        np.testing.assert_allclose(float(metrics[key]), float(want_metrics[key]), rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    scale = np.sqrt(sum(np.sum(w ** 2) for w in _flat(want_grads)))
    for g, w in zip(_flat(grads), _flat(want_grads), strict=True):
        assert np.linalg.norm(g - w) <= 1e-5 * scale + 1e-6 * np.linalg.norm(w)


@pytest.mark.parametrize(("node", "local"), [(1, 8), (2, 2)])
def test_shared_prompt_steps_under_ulysses_equal_one_device(rollouts, policy_model, rng, node,
                                                            local):
    """Each prompt once beside its answers, sequence-parallel with Ulysses (8 devices: the
    tiny model's 4 heads padded; 2 x 2: both axes) and FSDP-sharded parameters: two
    optimizer steps give one device's metrics and parameters."""
    optim = base_config().optim
    optim.learning_rate, optim.eps = 1e-3, 1e-5
    config = LossConfig(beta=0.02)
    ids, slots, logprobs, ref, _ = _ragged(rollouts, rng)
    advantages = [{r: rng.normal() for r in slots if r is not None} for _ in range(2)]
    outs, models = [], []
    for n, loc, scheme in ((1, 1, "none"), (node, local, "ulysses")):
        mesh = make_mesh(1, n, loc, jax.devices()[: n * loc])
        model = policy_model(rollouts["seed"])
        optimizer = make_optimizer_state(model, optim)
        fsdp.place(model, optimizer, mesh)
        step = make_train_step(shared_loss_fn(mesh, scheme, config, loss_chunk=16))
        outs.append([jax.device_get(step(model, optimizer, _shared(
            rollouts, ids, slots, logprobs, ref, a, multiple=n * loc))) for a in advantages])
        models.append(model)
    for want, got in zip(*outs, strict=True):
        assert got["applied"]
        for key in ("loss", "grad_norm", "ratio", "kl", "clip_fraction", "entropy"):
            np.testing.assert_allclose(got[key], want[key], rtol=2e-4, atol=1e-6, err_msg=key)
    for g, w in zip(_flat(models[1]), _flat(models[0]), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_the_lora_reference_is_the_model_with_itsadapters_off(rollouts, rng):
    """With LoRA, the KL's reference policy is the trained model with every `lora_b` zero,
    computed without touching the model's own adapters."""
    config = model_config("tiny")
    config.model.lora.update(rank=4, targets="q_proj,v_proj")
    model = build_model(config, seed=int(rng.integers(1 << 30)))
    lora_b = nnx.All(nnx.Param, lambda path, _: str(path[-1]) == "lora_b")
    nnx.update(model, jax.tree.map(lambda b: jnp.asarray(rng.normal(size=b.shape), b.dtype),
                                   nnx.state(model, lora_b)))
    mesh = make_mesh(1, 1, 1, jax.devices()[:1])
    batch = _batch(rollouts, Layout("none"), mesh, rng.normal(size=len(rollouts["ids"])))
    logprobs = nnx.jit(logprobs_fn(mesh, "none"))
    before = jax.tree.map(np.asarray, nnx.state(model, lora_b))
    got = np.asarray(logprobs(adapters_off(model), batch.tokens, batch.table))
    jax.tree.map(np.testing.assert_array_equal, before,
                 jax.tree.map(np.asarray, nnx.state(model, lora_b)))
    with_adapters = np.asarray(logprobs(model, batch.tokens, batch.table))
    nnx.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, lora_b)))
    want = np.asarray(logprobs(model, batch.tokens, batch.table))
    np.testing.assert_array_equal(got, want)
    assert np.abs(with_adapters - want).max() > 1e-3
