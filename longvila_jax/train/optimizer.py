"""The optimizer every training stage uses, from a config's `optim` section.

AdamW with linear warmup then cosine decay, global-norm clipping before the update, and
gradient accumulation (optax.MultiSteps: the update is applied every `accumulation_steps`
micro-steps with the mean of their gradients, so k equal micro-batches step exactly like
one k-times larger batch). Weight decay skips vectors (norm scales, biases), as the
Hugging Face Trainer that LongVILA trains with does.
"""

from __future__ import annotations

import jax
import optax


def schedule(optim) -> optax.Schedule:
    """Learning rate per optimizer update: 0 -> peak over `warmup_steps`, then cosine to
    `end_lr_fraction * peak` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.learning_rate, warmup_steps=optim.warmup_steps,
        decay_steps=optim.total_steps, end_value=optim.learning_rate * optim.end_lr_fraction)


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim) -> optax.GradientTransformation:
    """The `optim` section as one optax transformation (see the module docstring)."""
    adamw = optax.adamw(schedule(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=_decay_mask)
    chain = adamw if optim.clip_norm == 0 else optax.chain(
        optax.clip_by_global_norm(optim.clip_norm), adamw)
    if optim.accumulation_steps > 1:
        return optax.MultiSteps(chain, every_k_schedule=optim.accumulation_steps)
    return chain
