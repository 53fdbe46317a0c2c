"""Token losses as sums and counts, so that sequence shards and chunks can add them up."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

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
    d_h, d_weight = _logit_products(h, weight, d_logits, True, True)
    return d_h, d_weight.astype(weight.dtype)


def _logit_products(h, weight, d_logits, want_h, want_weight):
    """The gradient products of `h @ weight` given d logits, in the operands' dtype
    (float32 accumulation): (dh in h's dtype or None, dweight in float32 or None)."""
    d_logits = d_logits.astype(jnp.promote_types(h.dtype, weight.dtype))
    d_h = jnp.einsum("...v,dv->...d", d_logits, weight,
                     preferred_element_type=jnp.float32).astype(h.dtype) if want_h else None
    d_weight = jnp.einsum("...d,...v->dv", h, d_logits,
                          preferred_element_type=jnp.float32) if want_weight else None
    return d_h, d_weight


_logits.defvjp(_logits_fwd, _logits_bwd)


def token_nll(logits, targets):
    """(summed cross-entropy, count) of `logits[..., t, :]` against `targets[..., t]`,
    skipping IGNORE_INDEX; sums rather than a mean so that shards can add them up."""
    return _nll_terms(logits.astype(jnp.float32), targets)[0]


def _nll_terms(logits, targets):
    """((summed NLL, count), logsumexp per position, valid mask) of float32 logits."""
    valid = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
    return (jnp.where(valid, logz - picked, 0.0).sum(), valid.sum()), logz, valid


def chunked_token_nll(h, weight, targets, chunk: int):
    """`token_nll(h @ weight, targets)` without holding all logits: positions in chunks of
    `chunk`. At long context the logits are the largest activation (32K tokens x 152K
    vocab x 4 B = 20 GB).

    Differentiated, each chunk's gradients are formed beside its loss (d logits = softmax
    - one-hot, then the two products), so the backward does not recompute the logits:
    three vocabulary-sized products per chunk instead of four. Gradients are only formed
    for the arguments being differentiated.
    """
    with jax.named_scope("logits_and_loss"):  # a profile's name for this work
        # Typed like h, the weight's gradient may vary where h does; JAX sums it back.
        return _chunked_nll(h, varying_like(weight, h), targets, chunk)


def _nll_and_grads(h, weight, targets, chunk, want_h, want_weight):
    """((summed NLL, count), (dNLL/dh or None, dNLL/dweight or None))."""
    def piece(h, targets):
        logits = jnp.dot(h, weight, preferred_element_type=jnp.float32)
        sums, logz, valid = _nll_terms(logits, targets)
        if not (want_h or want_weight):
            return sums, None, None
        vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        d_logits = jnp.exp(logits - logz[..., None]) - (vocab == targets[..., None])
        d_logits = jnp.where(valid[..., None], d_logits, 0.0)
        return (sums, *_logit_products(h, weight, d_logits, want_h, want_weight))

    if h.shape[1] <= chunk:
        sums, d_h, d_weight = piece(h, targets)
    else:
        b, s, _ = h.shape

        def one(carry, pieces):
            (nll, count), d_weight = carry
            (p_nll, p_count), d_h, p_weight = piece(*pieces)
            if want_weight:
                d_weight = d_weight + p_weight
            return ((nll + p_nll, count + p_count), d_weight), d_h

        # Inside shard_map the sums vary over the axes the inputs vary over; so must the start.
        zero = (varying_like(jnp.zeros((), jnp.float32), h, targets),
                varying_like(jnp.zeros((), jnp.int32), h, targets))
        d_weight = varying_like(jnp.zeros(weight.shape, jnp.float32), weight, h) \
            if want_weight else None
        (sums, d_weight), d_h = jax.lax.scan(one, (zero, d_weight),
                                             _pieces(h, targets, chunk))
        if want_h:  # [pieces, b, chunk, d] -> [b, s, d]
            d_h = d_h.swapaxes(0, 1).reshape(b, -1, h.shape[-1])[:, :s]
    if want_weight:
        d_weight = d_weight.astype(weight.dtype)
    return sums, (d_h, d_weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_nll(h, weight, targets, chunk):
    return _nll_and_grads(h, weight, targets, chunk, False, False)[0]


def _chunked_nll_fwd(h, weight, targets, chunk):
    return _nll_and_grads(h.value, weight.value, targets.value, chunk, h.perturbed,
                          weight.perturbed)


def _chunked_nll_bwd(chunk, grads, cotangents):
    d_nll = cotangents[0]  # the count is an integer: no cotangent
    if isinstance(d_nll, SymbolicZero):
        d_nll = jnp.zeros((), jnp.float32)
    return (*(None if g is None else (g * d_nll).astype(g.dtype) for g in grads), None)


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd, symbolic_zeros=True)


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
    at a time and recomputed in the backward (each position's gradient depends on the
    policy-gradient weights downstream, so it cannot be formed beside the forward as
    `chunked_token_nll` does): RL's per-token log-probabilities of the sampled answers.
    With `entropy`, `(log-probabilities, token_entropy)` from the same logits."""
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
