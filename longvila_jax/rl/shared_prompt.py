"""Log-probability passes that compute each question's prompt once for all its answers.

Rows `prompt + answer` (`policy_batch`) recompute a question's prompt, tens of thousands of
video tokens, once per answer, forward and backward: with 8 answers, 7/8 of the update's
work is repeated. Here a question is one prompt row and one row holding all its answers:
1. the prompt runs once (under the model's remat), keeping every layer's rotated keys and
   values and its last hidden state, which predicts each answer's first token;
2. the answers run together, each its own segment with positions continuing the prompt's,
   every layer attending to the prompt's keys (all visible) and to its own answer's
   (causal), the two partial attentions merged by their log-sum-exp as ring attention
   merges its blocks.
Both attentions are `flash_attention`, differentiable in the keys and values, so the
answers' gradients reach the prompt's layers exactly: the same values and gradients as the
rows `prompt + answer`, with the prompt computed once. One device only: a prompt split
over a sequence-parallel group would need the answers' queries to visit every shard.

Opt-in (`rl.shared_prompt`). Measured on one H200, LongVILA-7B at 256 frames, 2 x 8
answers of 256 tokens (docs/benchmarks.md): the reference pass takes 4.4 s against the
rows' 35.3 s; the update compiles to 61.8 GiB of temporaries and does not fit beside the
parameters, Adam moments, reference and engine copy, where the rows' update fits (121.6
GiB at peak). Where its memory goes is not yet known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longvila_jax.data.media import IGNORE_INDEX, media_rows
from longvila_jax.kernels import Mask, Tokens, flash_attention
from longvila_jax.models.longvila import splice_media
from longvila_jax.models.loss import chunked_token_logprobs
from longvila_jax.parallel.ring import merge
from longvila_jax.rl.grpo import LossConfig, policy_loss


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedRows:
    """Questions with their answers (int32 host or device arrays): `prompt_ids`,
    `prompt_positions`, `prompt_segments` `[questions, P]` (padding a segment of its own),
    `prompt_media` (the table row of each media position, -1 elsewhere), `prompt_last`
    `[questions]` (the index of each prompt's last token); `answer_ids`, `answer_positions`,
    `answer_segments`, `answer_targets` `[questions, answers * L]` (answer j in columns
    `j * L` on; targets the answer's next tokens); `first` `[questions, answers]` (each
    answer's first token) and `lengths` `[questions, answers]` (0: no answer there)."""

    prompt_ids: object
    prompt_positions: object
    prompt_segments: object
    prompt_media: object
    prompt_last: object
    answer_ids: object
    answer_positions: object
    answer_segments: object
    answer_targets: object
    first: object
    lengths: object

    @property
    def width(self) -> int:
        """L, the tokens each answer has room for."""
        return np.shape(self.answer_ids)[1] // np.shape(self.first)[1]

    def mask(self) -> jax.Array:
        """`[questions * answers, L]` bool: the answer tokens."""
        lengths = jnp.asarray(self.lengths).reshape(-1, 1)
        return jnp.arange(self.width)[None, :] < lengths

    def per_token(self, values: Sequence[Sequence[float] | None]) -> np.ndarray:
        """`values[a]` (one per token of answer a, question-major; None where no answer) as
        `[questions * answers, L]` float32, 0 past each answer's end."""
        out = np.zeros((len(values), self.width), np.float32)
        for a, v in enumerate(values):
            if v is not None:
                out[a, : len(v)] = v
        return out


def shared_rows(prompts: Sequence[np.ndarray], answers: Sequence[Sequence[Sequence[int]]],
                media_token_id: int, offsets: Sequence[int] | None = None) -> SharedRows:
    """`SharedRows` for `answers[q]`, question q's answers to `prompts[q]` (ragged: fewer
    answers are padded with empty ones). Prompt q's media positions take the table's rows
    from `offsets[q]` on (several videos in one table; default 0), as in the rollout."""
    count = max(len(a) for a in answers)
    width = max(max((len(x) for x in a), default=1) for a in answers)
    longest = max(len(p) for p in prompts)
    questions = len(prompts)
    prompt_ids = np.zeros((questions, longest), np.int32)
    prompt_segments = np.ones((questions, longest), np.int32)
    shape = (questions, count * width)
    answer_ids = np.zeros(shape, np.int32)
    answer_positions = np.zeros(shape, np.int32)
    answer_segments = np.full(shape, count, np.int32)  # padding: a segment of its own
    answer_targets = np.full(shape, IGNORE_INDEX, np.int32)
    first = np.zeros((questions, count), np.int32)
    lengths = np.zeros((questions, count), np.int32)
    for q, (prompt, group) in enumerate(zip(prompts, answers, strict=True)):
        prompt_ids[q, : len(prompt)], prompt_segments[q, : len(prompt)] = prompt, 0
        for j, answer in enumerate(group):
            ids = np.asarray(answer, np.int32)
            cols = slice(j * width, j * width + len(ids))
            answer_ids[q, cols] = ids
            answer_positions[q, cols] = len(prompt) + np.arange(len(ids))
            answer_segments[q, cols] = j
            answer_targets[q, j * width: j * width + len(ids) - 1] = ids[1:]
            first[q, j], lengths[q, j] = (ids[0] if len(ids) else 0), len(ids)
    media = media_rows(prompt_ids, media_token_id,
                       None if offsets is None else np.asarray(offsets, np.int32))
    positions = np.broadcast_to(np.arange(longest, dtype=np.int32), (questions, longest))
    return SharedRows(prompt_ids, positions.copy(), prompt_segments, media,
                      np.asarray([len(p) - 1 for p in prompts], np.int32), answer_ids,
                      answer_positions, answer_segments, answer_targets, first, lengths)


def shared_logprobs(model, rows: SharedRows, table, *, entropy: bool = False,
                    loss_chunk: int = 2048):
    """Each answer token's log-probability under `model`, `[questions * answers, L]`
    (question-major, 0 past an answer's end); with `entropy`, a pair with each token's
    `token_entropy`. The prompts' media positions take rows of `table` `[rows, hidden]`."""
    llm = model.llm
    x = splice_media(llm.embed(rows.prompt_ids), table, rows.prompt_media)
    prompt = Tokens(rows.prompt_positions, rows.prompt_segments)
    h, cache = llm.hidden_states_and_kv(x, Mask(prompt, prompt), remat=llm.remat)
    last = jnp.take_along_axis(h, rows.prompt_last[:, None, None], axis=1)  # [q, 1, hidden]
    # The prompt's last position predicts every answer's first token.
    first = chunked_token_logprobs(jnp.broadcast_to(last, (*rows.first.shape, h.shape[-1])),
                                   llm.output_weight(), rows.first, loss_chunk, entropy=entropy)

    def attend(q, k, v, mask, spec, layer_cache):
        over_prompt = Mask(Tokens(mask.q.positions, jnp.zeros_like(mask.q.segment_ids)), prompt)
        out, _ = merge(*flash_attention(q, *layer_cache, over_prompt, spec),
                       *flash_attention(q, k, v, mask, spec))
        return out.astype(q.dtype)

    answers = Tokens(rows.answer_positions, rows.answer_segments)
    h, _ = llm.hidden_states_and_kv(llm.embed(rows.answer_ids), Mask(answers, answers), attend,
                                    cache=cache)
    rest = chunked_token_logprobs(h, llm.output_weight(), rows.answer_targets, loss_chunk,
                                  entropy=entropy)
    shape = (-1, rows.width)

    def joined(at_first, later):
        # token 0 from the prompt's last position; token i > 0 from answer position i - 1
        out = jnp.concatenate([at_first.reshape(-1, 1), later.reshape(shape)[:, :-1]], 1)
        return jnp.where(rows.mask(), out, 0.0)

    return jax.tree.map(joined, first, rest)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedBatch:
    """`SharedRows` with the update's per-token arrays laid out as `SharedRows.per_token`
    (`old_logprobs`, `ref_logprobs`: None without a KL term), `advantages` per answer
    slot and the embedding `table` the prompts' media positions take."""

    rows: SharedRows
    table: jax.Array
    old_logprobs: jax.Array
    ref_logprobs: jax.Array | None
    advantages: jax.Array


def shared_batch(prompts, answers, logprobs, advantages, media_token_id: int, offsets,
                 table) -> SharedBatch:
    """A `SharedBatch` on the default device: question q's `answers[q]` to `prompts[q]`
    (see `shared_rows`), with their sampler `logprobs[q]` and `advantages[q]` in the same
    ragged layout."""
    rows = shared_rows(prompts, answers, media_token_id, offsets)
    count = np.shape(rows.first)[1]

    def slots(per_question, empty):
        return [group[j] if j < len(group) else empty
                for group in per_question for j in range(count)]

    return SharedBatch(jax.tree.map(jnp.asarray, rows), table,
                       jnp.asarray(rows.per_token(slots(logprobs, None))), None,
                       jnp.asarray(slots(advantages, 0.0), jnp.float32))


def shared_loss_fn(config: LossConfig, loss_chunk: int = 2048):
    """`loss(model, batch: SharedBatch) -> (loss, metrics)`: `policy_batch.grpo_loss_fn` on
    `shared_logprobs`, the same loss and metrics with each prompt computed once."""

    def loss(model, batch: SharedBatch):
        logp, entropy = shared_logprobs(model, batch.rows, batch.table, entropy=True,
                                        loss_chunk=loss_chunk)
        return policy_loss(logp, batch.old_logprobs, batch.advantages, batch.rows.mask(),
                           config, batch.ref_logprobs, entropy)

    return loss
