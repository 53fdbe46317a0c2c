"""Decoding with a KV cache: a chunk of tokens per call, the prompt cache staying sharded.

The prompt's cache (`prefill.PromptCache`) is read-only and stays where prefill left it,
sharded over the sequence group: each device attends the new token's query to its own shard
and the partial results are merged exactly (`merge_over`). Generated tokens' keys and values
go to a small replicated `tail` `[layers, batch, max_new, kv_heads, head_dim]`; writing them
into the sharded cache instead would make every step move the whole cache. Everything else
in a step (one token per row) is replicated.

A call runs `steps` tokens in one `lax.scan`, so the host syncs once per chunk (to check stop
strings), not once per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from longvila_jax.infer.prefill import CACHE_SPECS
from longvila_jax.kernels import Mask, Tokens, flash_attention
from longvila_jax.parallel.mesh import SEQUENCE_AXES
from longvila_jax.parallel.ring import merge, merge_over


def sample(logits, key, temperature, top_p, banned: tuple[int, ...] = ()):
    """Next tokens `[batch]` from float32 `logits` `[batch, vocab]`, never a `banned` id.

    `temperature` 0 is greedy (argmax); otherwise the logits are divided by it and the
    smallest set of most likely tokens whose probability reaches `top_p` is sampled from
    (nucleus sampling; `top_p` 1 keeps every token). Banned ids' logits are -inf first, so
    the others share their probability as if the vocabulary lacked them.
    """
    if banned:
        logits = logits.at[:, jnp.asarray(banned)].set(-jnp.inf)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    # The most likely token is always kept; a token is kept while the mass before it < top_p.
    kept = jnp.where(before < top_p, ordered, jnp.inf).min(axis=-1, keepdims=True)
    drawn = jax.random.categorical(key, jnp.where(scaled >= kept, scaled, -jnp.inf), axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def make_decode(graphdef, mesh, steps: int, with_logits: bool = False,
                banned: tuple[int, ...] = ()):
    """Jitted `decode(params, cache, tail_k, tail_v, tokens, start, key, temperature, top_p)`.

    `tokens` `[batch]` sit at positions `cache.lengths + start`; their keys and values go to
    tail slot `start`, and so on for `steps` tokens, each `sample`d without the `banned` ids.
    Returns `(tokens [steps, batch] sampled after each step, logits, tail_k, tail_v, key)`;
    the tails are donated. `logits` are the model's float32 `[steps, batch, vocab]` for each
    step with `with_logits` (banned ids' logits as the model gave them), else None (a 152K
    vocabulary makes them the largest output of a step; only tests read them).
    """

    def local(params, cache, tail_k, tail_v, tokens, start, key, temperature, top_p):
        model = nnx.merge(graphdef, params)
        batch, slots = tokens.shape[0], tail_k.shape[2]
        # The tail's slots: generated tokens in order, each at its own position.
        tail = Tokens(cache.lengths[:, None] + jnp.arange(slots, dtype=jnp.int32),
                      jnp.zeros((batch, slots), jnp.int32))
        # Padding slots of the prompt cache get their own segment, so nothing sees them.
        padding = (cache.positions >= cache.lengths[:, None]).astype(jnp.int32)
        own_segment = jnp.zeros((batch, 1), jnp.int32)

        def step(carry, _):
            tail_k, tail_v, tokens, t, key = carry
            new = Tokens((cache.lengths + t)[:, None], own_segment)

            def attend(q, k, v, mask, spec, layer_cache):
                prompt_k, prompt_v, past_k, past_v = layer_cache
                out, lse = flash_attention(q, prompt_k, prompt_v,
                                           Mask(mask.q, Tokens(cache.positions, padding)), spec)
                out, lse = merge_over(out, lse, SEQUENCE_AXES)
                past_k = jax.lax.dynamic_update_slice_in_dim(past_k, k, t, axis=1)
                past_v = jax.lax.dynamic_update_slice_in_dim(past_v, v, t, axis=1)
                new_out, new_lse = flash_attention(q, past_k, past_v, Mask(mask.q, tail), spec)
                return merge(out, lse, new_out, new_lse)[0].astype(q.dtype)

            h, (k, v) = model.llm.hidden_states_and_kv(
                model.llm.embed(tokens[:, None]), Mask(new, new), attend,
                cache=(cache.k, cache.v, tail_k, tail_v))
            tail_k = jax.lax.dynamic_update_slice_in_dim(tail_k, k.astype(tail_k.dtype), t, 2)
            tail_v = jax.lax.dynamic_update_slice_in_dim(tail_v, v.astype(tail_v.dtype), t, 2)
            logits = model.llm.logits(h[:, 0])
            key, draw = jax.random.split(key)
            tokens = sample(logits, draw, temperature, top_p, banned)
            return (tail_k, tail_v, tokens, t + 1, key), (tokens,
                                                          logits if with_logits else None)

        carry = (tail_k, tail_v, tokens, start, key)
        (tail_k, tail_v, _, _, key), (out, logits) = jax.lax.scan(step, carry, length=steps)
        return out, logits, tail_k, tail_v, key

    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(), CACHE_SPECS, P(), P(), P(), P(), P(), P(), P()),
        out_specs=(P(), P(), P(), P(), P()))
    return jax.jit(sharded, donate_argnums=(2, 3))

