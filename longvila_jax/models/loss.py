"""Token losses as sums and counts, so that sequence shards and chunks can add them up."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.kernels.manual_axes import varying_like


def float32_logits(h, weight):
    """float32 logits `h @ weight` from compute-dtype operands, whose backward also
    multiplies in the compute dtype (accumulating in float32).

    Why: the cotangent of float32 logits is float32, and JAX's transpose of the product
    then runs both gradient products in float32 (TF32 on Hopper, a third of bf16's rate):
    10 % of a Qwen2-1.5B step at 16K tokens (bench/NOTES.md). Rounding that cotangent to
    bf16 is what the model's other products get anyway; float32 operands stay float32.
    """
    # Typed like h, the weight's gradient may vary where h does; JAX sums it back.
    return _logits(h, varying_like(weight, h))


@jax.custom_vjp
def _logits(h, weight):
    return jnp.dot(h, weight, preferred_element_type=jnp.float32)


def _logits_fwd(h, weight):
    return _logits(h, weight), (h, weight)


def _logits_bwd(residuals, d_logits):
    h, weight = residuals
    d_logits = d_logits.astype(jnp.promote_types(h.dtype, weight.dtype))
    d_h = jnp.einsum("...v,dv->...d", d_logits, weight, preferred_element_type=jnp.float32)
    d_weight = jnp.einsum("...d,...v->dv", h, d_logits, preferred_element_type=jnp.float32)
    return d_h.astype(h.dtype), d_weight.astype(weight.dtype)


_logits.defvjp(_logits_fwd, _logits_bwd)


def token_nll(logits, targets):
    """(summed cross-entropy, count) of `logits[..., t, :]` against `targets[..., t]`,
    skipping IGNORE_INDEX; sums rather than a mean so that shards can add them up."""
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
    return jnp.where(valid, logz - picked, 0.0).sum(), valid.sum()


def chunked_token_nll(h, weight, targets, chunk: int):
    """`token_nll(h @ weight, targets)` without holding all logits: positions in chunks of
    `chunk`, each chunk's float32 logits recomputed in the backward. At long context the
    logits are the largest activation (32K tokens x 152K vocab x 4 B = 20 GB)."""
    with jax.named_scope("logits_and_loss"):  # a profile's name for this work
        if h.shape[1] <= chunk:
            return token_nll(float32_logits(h, weight), targets)
        pieces = _pieces(h, targets, chunk)

        @jax.checkpoint
        def one(carry, piece):
            nll, count = token_nll(float32_logits(piece[0], weight), piece[1])
            return (carry[0] + nll, carry[1] + count), None

        # Inside shard_map the sums vary over the axes the inputs vary over; so must the start.
        zero = (varying_like(jnp.zeros((), jnp.float32), h, targets),
                varying_like(jnp.zeros((), jnp.int32), h, targets))
        return jax.lax.scan(one, zero, pieces)[0]


def token_logprobs(logits, targets):
    """float32 `[..., t]`: log softmax(`logits[..., t, :]`)[`targets[..., t]`], 0 where the
    target is IGNORE_INDEX."""
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE_INDEX
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
    return jnp.where(valid, picked - jax.nn.logsumexp(logits, axis=-1), 0.0)


def token_entropy(logits, targets):
    """float32 `[..., t]`: the entropy (nats) of softmax(`logits[..., t, :]`), 0 where the
    target is IGNORE_INDEX; no gradient flows through it (a metric: RL watches the policy's
    entropy collapse)."""
    logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
    logz = jax.nn.logsumexp(logits, axis=-1)
    mean_logit = (jax.nn.softmax(logits, axis=-1) * logits).sum(-1)
    return jnp.where(targets != IGNORE_INDEX, logz - mean_logit, 0.0)


def chunked_token_logprobs(h, weight, targets, chunk: int, *, entropy: bool = False):
    """`token_logprobs(h @ weight, targets)` `[b, s]`, the logits formed `chunk` positions
    at a time and recomputed in the backward (see `chunked_token_nll`): RL's per-token
    log-probabilities of the sampled answers. With `entropy`, `(log-probabilities,
    token_entropy)` from the same logits."""
    with jax.named_scope("logits_and_loss"):
        b, s, _ = h.shape

        def of(logits, targets):
            logp = token_logprobs(logits, targets)
            return (logp, token_entropy(logits, targets)) if entropy else logp

        if s <= chunk:
            return of(float32_logits(h, weight), targets)

        @jax.checkpoint
        def one(_, piece):
            return None, of(float32_logits(piece[0], weight), piece[1])

        out = jax.lax.scan(one, None, _pieces(h, targets, chunk))[1]  # [pieces, b, chunk] each
        return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(b, -1)[:, :s], out)


def _pieces(h, targets, chunk: int):
    """`h` `[b, s, d]` and `targets` `[b, s]` padded to whole chunks (padding ignored),
    chunk index first: `([n, b, chunk, d], [n, b, chunk])`, for a scan over chunks."""
    b, s, d = h.shape
    pad = -s % chunk
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    return (h.reshape(b, -1, chunk, d).swapaxes(0, 1),
            targets.reshape(b, -1, chunk).swapaxes(0, 1))


def next_token_loss(logits, labels):
    """Mean cross-entropy of `logits[:, t]` against `labels[:, t+1]`, skipping IGNORE_INDEX.

    Labels are unshifted (as in Hugging Face), so VILA-style label tensors port unchanged.
    """
    total, count = token_nll(logits[:, :-1], labels[:, 1:])
    return total / jnp.maximum(count, 1)
