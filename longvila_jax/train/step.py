"""One optimizer step for any loss `loss(model, batch) -> scalar`.

The same step serves the single-device loss and the MM-SP loss (`parallel.mmsp.loss_fn`),
so a sharded run differs from a single-device run only in the loss it is given. With
gradient accumulation (`optim.accumulation_steps`) every call is one micro-step; the
optimizer applies the mean update every k-th call. Only the parameters a stage trains
(`train.trainable`) get gradients and optimizer state; the rest are constants of the loss.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from longvila_jax.train.optimizer import make_optimizer


def trainable_filter(patterns: str):
    """nnx filter: parameters whose '/'-joined path matches one of the comma-separated
    regular expressions `patterns` (searched anywhere in the path)."""
    compiled = [re.compile(p) for p in patterns.split(",") if p]

    def matches(path, value):
        name = "/".join(str(p) for p in path)
        return isinstance(value, nnx.Param) and any(c.search(name) for c in compiled)

    return matches


def make_optimizer_state(model, optim, trainable=nnx.Param) -> nnx.Optimizer:
    """Optimizer state for `model`'s `trainable` parameters from a config's `optim`."""
    return nnx.Optimizer(model, make_optimizer(optim), wrt=trainable)


def make_train_step(loss, trainable=nnx.Param):
    """`step(model, optimizer, batch) -> metrics` (jitted), updating both in place.

    `loss` returns a scalar, or `(scalar, metrics)` (a dict of device scalars that join
    the step's, as RL's clip fraction and KL do). Metrics (device scalars): `loss` and
    `grad_norm` (of the trainable parameters, before clipping); `applied`, whether the
    update was applied: a step whose loss or gradient norm is not finite leaves parameters
    and optimizer state bit-identical (a `where` on one scalar, fused into the update, so
    no second copy of the state is held). The caller decides whether to stop; reading
    these one step behind costs no host sync. A finite gradient can still overflow the
    state; `state_is_finite` checks it where it matters, before a checkpoint (checking it
    in the step cost a copy of the parameters: 6 GiB more at Qwen2-1.5B's:
    docs/benchmarks.md, "Non-finite guard").

    The model's and optimizer's arrays are donated: the step writes their new values over
    the old buffers, so float32 parameters and Adam moments (12 bytes per parameter) are
    held once, not twice, at the step's peak.
    """

    @functools.partial(nnx.jit, donate_argnums=(0, 1))
    def step(model, optimizer, batch):
        def with_metrics(model, batch):
            out = loss(model, batch)
            return out if isinstance(out, tuple) else (out, {})

        diff = nnx.DiffState(0, trainable)
        (value, metrics), grads = nnx.value_and_grad(with_metrics, argnums=diff,
                                                     has_aux=True)(model, batch)
        with jax.named_scope("optimizer"):  # a profile's name for this work
            grad_norm = optax.tree.norm(grads)
            applied = jnp.isfinite(value) & jnp.isfinite(grad_norm)
            # The values, not the Variables: those are updated in place by `update`.
            before = jax.tree.map(jnp.asarray, (nnx.state(model, trainable),
                                                nnx.state(optimizer)))
            optimizer.update(model, grads)
            after = nnx.state(model, trainable), nnx.state(optimizer)
            kept = jax.tree.map(lambda new, old: jnp.where(applied, new, old), after, before)
            nnx.update(model, kept[0])
            nnx.update(optimizer, kept[1])
        return {**metrics, "loss": value, "grad_norm": grad_norm, "applied": applied}

    return step


@jax.jit
def state_is_finite(tree) -> jax.Array:
    """Whether every float in `tree` (parameters, optimizer state) is finite."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)
