"""Decoding with a KV cache: `n` answers per prompt from one prefilled cache, stopping on the
device.

The prompts' cache (`prefill.PromptCache`, one row per prompt) is read-only and stays where
prefill left it, sharded over the sequence group: each device attends the new tokens'
queries to its own shard and the partial results are merged exactly (`merge_over`). A
prompt's `n` answers are `n` query rows of that prompt's cache row (its positions and
segment decide what they see), so they share it without copies. Each answer's generated
keys and values go to its own small replicated tail, one `[rows, slots, kv_heads,
head_dim]` array per layer; writing them into the sharded cache would make every step
move the whole cache. Everything else in a step (one token per answer) is replicated.

A call decodes in a `lax.while_loop` until a given step or until every answer has emitted a
stop id (checked on the device), so the host syncs once per call: once per generation, or
once per chunk when it checks stop strings.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.infer.prefill import CACHE_SPECS
from longvila_jax.kernels import Mask, Tokens, flash_attention
from longvila_jax.models.loss import token_logprobs
from longvila_jax.parallel.mesh import SEQUENCE_AXES
from longvila_jax.parallel.ring import merge, merge_over


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How answers are drawn (vLLM's `SamplingParams`, the parts decoding has): `n` answers
    per prompt, each at most `max_new_tokens` long and ending before its first `stop_ids`
    token; `temperature` 0 is greedy (then the `n` answers are equal), else softmax at
    `temperature` restricted to the `top_p` nucleus; `seed` makes a draw repeatable. With
    `keep_stop`, an answer's stop id stays at its end (RL trains the policy to stop)."""

    max_new_tokens: int
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    keep_stop: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"need max_new_tokens >= 1 and n >= 1, got "
                             f"{self.max_new_tokens}, {self.n}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got "
                             f"{self.temperature}, {self.top_p}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Where `n` answers to each of `batch` prompts stand (all replicated).

    `step` tokens have been generated; `tokens` `[batch, n]` are the last of them, the next
    step's inputs. `ids` and `logprobs` `[slots, batch, n]` hold every generated token and
    its log-probability under the model (the full softmax of its logits, temperature 1:
    what a policy-gradient update needs, whatever the sampler's temperature and top-p);
    `logits` `[slots, batch, n, vocab]` the logits themselves when asked for (tests), else
    None. `done` `[batch, n]`: the answer has ended (a stop id on the device, a stop string
    by the host). `tail_k`/`tail_v`: per layer, the generated tokens' keys and values,
    `[batch * n, slots, kv_heads, head_dim]`, slot i holding generated token i.
    """

    tokens: jax.Array
    done: jax.Array
    step: jax.Array
    key: jax.Array
    ids: jax.Array
    logprobs: jax.Array
    logits: jax.Array | None
    tail_k: list[jax.Array]
    tail_v: list[jax.Array]


def sample(logits, key, temperature, top_p, banned: tuple[int, ...] = ()):
    """Next tokens `[...]` from float32 `logits` `[..., vocab]`, never a `banned` id.

    `temperature` 0 is greedy (argmax); otherwise the logits are divided by it and the
    smallest set of most likely tokens whose probability reaches `top_p` is sampled from
    (nucleus sampling; `top_p` 1 keeps every token). Banned ids' logits are -inf first, so
    the others share their probability as if the vocabulary lacked them. Only the branch
    the scalars pick runs: greedy decoding never sorts the vocabulary.
    """
    if banned:
        logits = logits.at[..., jnp.asarray(banned)].set(-jnp.inf)

    def nucleus(scaled):
        ordered = jnp.sort(scaled, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        # The most likely token is always kept; a token is kept while the mass before it
        # is below top_p.
        kept = jnp.where(before < top_p, ordered, jnp.inf).min(axis=-1, keepdims=True)
        return jnp.where(scaled >= kept, scaled, -jnp.inf)

    def hot():
        scaled = logits / jnp.maximum(temperature, 1e-6)
        scaled = jax.lax.cond(top_p < 1, nucleus, lambda s: s, scaled)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, hot,
                        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def make_start(mesh, banned: tuple[int, ...] = ()):
    """Jitted `start(logits, key, temperature, top_p, stop_ids, *, n, slots, kv_shape,
    with_logits) -> DecodeState`: each prompt's first `n` tokens sampled from its prefill
    `logits` `[batch, 1, vocab]`, with empty tails of `slots` slots (`kv_shape`: layers,
    kv_heads, head_dim, dtype)."""

    @functools.partial(jax.jit, static_argnames=("n", "slots", "kv_shape", "with_logits"),
                       out_shardings=NamedSharding(mesh, P()))
    def start(logits, key, temperature, top_p, stop_ids, *, n, slots, kv_shape, with_logits):
        batch, vocab = logits.shape[0], logits.shape[-1]
        logits = jnp.broadcast_to(logits[:, :1], (batch, n, vocab))
        key, draw = jax.random.split(key)
        tokens = sample(logits, draw, temperature, top_p, banned)
        layers, kv_heads, head_dim, dtype = kv_shape
        tail = [jnp.zeros((batch * n, slots, kv_heads, head_dim), dtype)
                for _ in range(layers)]
        return DecodeState(
            tokens=tokens, done=jnp.isin(tokens, stop_ids), step=jnp.int32(1), key=key,
            ids=jnp.zeros((slots, batch, n), jnp.int32).at[0].set(tokens),
            logprobs=jnp.zeros((slots, batch, n), jnp.float32).at[0].set(
                token_logprobs(logits, tokens)),
            logits=jnp.zeros((slots, batch, n, vocab), jnp.float32).at[0].set(logits)
            if with_logits else None,
            tail_k=tail, tail_v=[jnp.zeros_like(t) for t in tail])

    return start


def make_decode(graphdef, mesh, banned: tuple[int, ...] = ()):
    """Jitted `decode(params, cache, state, until, temperature, top_p, stop_ids) -> state`.

    Generates tokens from `state` (donated) until `state.step` reaches `until` or every
    answer is done: each step feeds the last tokens at positions `cache.lengths + step - 1`,
    writes their keys and values to tail slot `step - 1` and samples the next (never a
    `banned` id); an answer is done once it emits one of `stop_ids`.
    """

    def decode_chunk(params, cache, state, until, temperature, top_p, stop_ids):
        model = nnx.merge(graphdef, params)
        batch, n = state.tokens.shape
        rows = batch * n
        slots = state.ids.shape[0]
        # Padding slots of the prompt cache get their own segment, so nothing sees them.
        prompt = Tokens(cache.positions,
                        (cache.positions >= cache.lengths[:, None]).astype(jnp.int32))
        row_lengths = jnp.repeat(cache.lengths, n)[:, None]
        slot_ids = jnp.arange(slots, dtype=jnp.int32)[None]
        zeros = jnp.zeros((rows, 1), jnp.int32)

        def step(state):
            t = state.step - 1  # the input tokens' tail slot
            positions = jnp.broadcast_to(cache.lengths[:, None] + t, (batch, n))
            new = Tokens(positions, jnp.zeros((batch, n), jnp.int32))
            row_q = Tokens(positions.reshape(rows, 1), zeros)
            # Slots from t on are not written yet: a segment of their own hides them.
            past = Tokens(row_lengths + slot_ids,
                          jnp.broadcast_to((slot_ids >= t).astype(jnp.int32), (rows, slots)))

            def attend(q, k, v, mask, spec, layer_cache):
                prompt_k, prompt_v, past_k, past_v = layer_cache
                with jax.named_scope("prompt_attention"):
                    out, lse = flash_attention(q, prompt_k, prompt_v, Mask(mask.q, prompt),
                                               spec)
                with jax.named_scope("merge"):
                    out, lse = merge_over(out, lse, SEQUENCE_AXES)
                with jax.named_scope("tail_attention"):
                    per_row = [x.reshape(rows, 1, *x.shape[2:]) for x in (q, k, v)]
                    past_out, past_lse = flash_attention(per_row[0], past_k, past_v,
                                                         Mask(row_q, past), spec)
                    own_out, own_lse = flash_attention(*per_row, Mask(row_q, row_q), spec)
                    tail_out, tail_lse = merge(past_out, past_lse, own_out, own_lse)
                    tail_out = tail_out.reshape(q.shape)
                    tail_lse = tail_lse.reshape(batch, n, -1).transpose(0, 2, 1)
                    return merge(out, lse, tail_out, tail_lse)[0].astype(q.dtype)

            layer_caches = list(zip(cache.k, cache.v, state.tail_k, state.tail_v, strict=True))
            h, (ks, vs) = model.llm.hidden_states_and_kv(
                model.llm.embed(state.tokens), Mask(new, new), attend, cache=layer_caches)

            def written(tails, news):
                return [jax.lax.dynamic_update_slice_in_dim(
                    tail, new_kv.reshape(rows, 1, *new_kv.shape[2:]).astype(tail.dtype), t, 1)
                    for tail, new_kv in zip(tails, news, strict=True)]

            with jax.named_scope("logits"):
                logits = model.llm.logits(h)
            key, draw = jax.random.split(state.key)
            with jax.named_scope("sample"):
                tokens = sample(logits, draw, temperature, top_p, banned)
                logprobs = token_logprobs(logits, tokens)
            g = state.step
            return DecodeState(
                tokens=tokens, done=state.done | jnp.isin(tokens, stop_ids), step=g + 1,
                key=key, ids=state.ids.at[g].set(tokens),
                logprobs=state.logprobs.at[g].set(logprobs),
                logits=None if state.logits is None else state.logits.at[g].set(logits),
                tail_k=written(state.tail_k, ks), tail_v=written(state.tail_v, vs))

        def running(state):
            return (state.step < until) & ~state.done.all()

        return jax.lax.while_loop(running, step, state)

    sharded = jax.shard_map(decode_chunk, mesh=mesh,
                            in_specs=(P(), CACHE_SPECS, P(), P(), P(), P(), P()),
                            out_specs=P())
    return jax.jit(sharded, donate_argnums=(2,))
