"""GRPO's pieces that are arithmetic: group advantages, the clipped policy loss, the KL term.

Definitions follow Long-RL's defaults (built on verl / EasyR1), each a config value:

- advantage of answer i in its group: (r_i - mean) / (std + 1e-6), std the unbiased sample
  standard deviation of the group's rewards (as EasyR1's `torch.std`); a group whose
  rewards are all equal teaches nothing (its advantages are 0) and can be dropped (DAPO);
- per answer token: ratio = exp(clamp(logp - old_logp, +-20)); loss = max(-A ratio,
  -A clip(ratio, 1 - clip_low, 1 + clip_high)), and for A < 0 at most -A dual_clip (the
  dual clip bounds how far a negative advantage pushes a token the policy already left);
- KL to the reference per token: `kl` (logp - ref), `mse` (half its square) or
  `low_var_kl` (exp(ref - logp) - (ref - logp) - 1, the non-negative k3 estimator, its
  log-ratio clamped to +-20 and the value to [-10, 10] as verl does);
- token-mean: every answer token of the batch weighs the same, whatever its answer's length.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

KL_KINDS = ("low_var_kl", "kl", "mse")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float = 3.0
    log_ratio_clamp: float = 20.0
    kl: str = "low_var_kl"
    beta: float = 0.01

    def __post_init__(self):
        if self.kl not in KL_KINDS:
            raise ValueError(f"rl.kl: {self.kl!r} is not one of {KL_KINDS}")
        if self.dual_clip <= 1:
            raise ValueError(f"rl.dual_clip: {self.dual_clip} must be > 1")


def group_advantages(rewards, eps: float = 1e-6, drop_equal: bool = False):
    """`(advantages [B, G], kept [B] bool)` from rewards `[B, G]` (B groups of G answers).

    With `drop_equal`, groups whose rewards are all equal are marked not kept (their
    advantages are 0 either way)."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: need [groups, answers >= 2], got {rewards.shape}")
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, ddof=1, keepdims=True)
    advantages = (rewards - mean) / (std + eps)
    kept = ~np.all(rewards == rewards[:, :1], axis=1) if drop_equal \
        else np.ones(len(rewards), bool)
    return advantages.astype(np.float32), kept


def kl_penalty(logp, ref_logp, kind: str):
    """Per-token KL estimate of the policy from the reference (see the module docstring)."""
    if kind == "kl":
        return logp - ref_logp
    if kind == "mse":
        return 0.5 * jnp.square(logp - ref_logp)
    if kind == "low_var_kl":
        log_ratio = jnp.clip(ref_logp - logp, -20.0, 20.0)
        return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -10.0, 10.0)
    raise ValueError(f"kl_penalty: {kind!r} is not one of {KL_KINDS}")


def policy_loss(logp, old_logp, advantages, mask, config: LossConfig, ref_logp=None,
                entropy=None):
    """`(loss, metrics)`: GRPO's token-mean clipped loss (plus beta x KL with `ref_logp`);
    with the policy's per-token `entropy`, its token-mean is a metric too.

    `logp`, `old_logp`, `ref_logp`, `mask`, `entropy` are `[answers, tokens]` (mask 1 on
    answer tokens, so answers of any length share one array); `advantages` `[answers]`.
    """
    mask = mask.astype(logp.dtype)
    tokens = jnp.maximum(mask.sum(), 1.0)

    def mean(x):
        return (x * mask).sum() / tokens

    a = advantages[:, None]
    log_ratio = jnp.clip(logp - old_logp, -config.log_ratio_clamp, config.log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    plain = -a * ratio
    clipped = -a * jnp.clip(ratio, 1 - config.clip_low, 1 + config.clip_high)
    loss = jnp.maximum(plain, clipped)
    dual = jnp.minimum(loss, -a * config.dual_clip)
    loss = jnp.where(a < 0, dual, loss)
    total = mean(loss)
    metrics = {"pg_loss": total, "clip_fraction": mean((clipped > plain).astype(logp.dtype)),
               "dual_clip_fraction": mean(((a < 0) & (dual < jnp.maximum(plain, clipped)))
                                          .astype(logp.dtype)),
               "ratio": mean(ratio)}
    if entropy is not None:
        metrics["entropy"] = mean(entropy)
    if ref_logp is not None and config.beta > 0:
        kl = mean(kl_penalty(logp, ref_logp, config.kl))
        total = total + config.beta * kl
        metrics["kl"] = kl
    return total, metrics
