"""One optimizer step for any loss `loss(model, batch) -> scalar`.

The same step serves the single-device loss and the MM-SP loss (`parallel.mmsp.loss_fn`),
so a sharded run differs from a single-device run only in the loss it is given. With
gradient accumulation (`optim.accumulation_steps`) every call is one micro-step; the
optimizer applies the mean update every k-th call.
"""

from __future__ import annotations

import optax
from flax import nnx

from longvila_jax.train.optimizer import make_optimizer


def make_optimizer_state(model, optim) -> nnx.Optimizer:
    """Optimizer state for `model`'s parameters from a config's `optim` section."""
    return nnx.Optimizer(model, make_optimizer(optim), wrt=nnx.Param)


def make_train_step(loss):
    """`step(model, optimizer, batch) -> metrics` (jitted), updating both in place.

    Metrics: `loss` and `grad_norm` (before clipping), as float32 scalars.
    """

    @nnx.jit
    def step(model, optimizer, batch):
        value, grads = nnx.value_and_grad(loss)(model, batch)
        optimizer.update(model, grads)
        return {"loss": value, "grad_norm": optax.tree.norm(grads)}

    return step
