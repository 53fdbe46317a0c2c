"""Log-probability passes that compute each question's prompt once for all its answers.

Rows `prompt + answer` (`policy_batch`) recompute a question's prompt, tens of thousands of
video tokens, once per answer, forward and backward: with 8 answers, 7/8 of the update's
work is repeated. Here a question is one row, its prompt followed by all its answers, each
answer its own segment with positions continuing the prompt's. Every layer's attention
splits the row at the prompt's end: the prompt attends to itself (causal), and the answers
attend to the whole prompt and, causally, to their own answer, the two partial attentions
merged by their log-sum-exp as ring attention merges its blocks. All three are
`flash_attention`, so the values and gradients are those of the rows `prompt + answer`
exactly, with the prompt computed once.

One scan over the layers runs the prompt and the answers together under the model's
remat: the backward keeps one hidden state per layer for the row, as a row `prompt +
answer` would, and accumulates each layer's weight gradient once. (A first version ran the
prompt and then the answers as two scans, the prompt's keys and values stacked between
them: compiled for LongVILA-7B at 256 frames it held 61.8 GiB of temporaries, two stacked
copies of every layer's weight gradient and the answers' unrematerialised activations
among them, and did not fit on one H200.)

One device only: a prompt split over a sequence-parallel group would need the answers'
queries to visit every shard. Used on one device unless `rl.shared_prompt` is False;
measured on one H200 in docs/benchmarks.md.
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
    `answer_segments` `[questions, answers * L]` (answer j in columns `j * L` on, padding a
    segment of its own) and `lengths` `[questions, answers]` (0: no answer there)."""

    prompt_ids: object
    prompt_positions: object
    prompt_segments: object
    prompt_media: object
    prompt_last: object
    answer_ids: object
    answer_positions: object
    answer_segments: object
    lengths: object

    @property
    def width(self) -> int:
        """L, the tokens each answer has room for."""
        return np.shape(self.answer_ids)[1] // np.shape(self.lengths)[1]

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
    answer_segments = np.full(shape, count, np.int32)
    lengths = np.zeros((questions, count), np.int32)
    for q, (prompt, group) in enumerate(zip(prompts, answers, strict=True)):
        prompt_ids[q, : len(prompt)], prompt_segments[q, : len(prompt)] = prompt, 0
        for j, answer in enumerate(group):
            cols = slice(j * width, j * width + len(answer))
            answer_ids[q, cols] = answer
            answer_positions[q, cols] = len(prompt) + np.arange(len(answer))
            answer_segments[q, cols] = j
            lengths[q, j] = len(answer)
    media = media_rows(prompt_ids, media_token_id,
                       None if offsets is None else np.asarray(offsets, np.int32))
    positions = np.broadcast_to(np.arange(longest, dtype=np.int32), (questions, longest))
    return SharedRows(prompt_ids, positions.copy(), prompt_segments, media,
                      np.asarray([len(p) - 1 for p in prompts], np.int32), answer_ids,
                      answer_positions, answer_segments, lengths)


def shared_logprobs(model, rows: SharedRows, table, *, entropy: bool = False,
                    loss_chunk: int = 2048):
    """Each answer token's log-probability under `model`, `[questions * answers, L]`
    (question-major, 0 past an answer's end); with `entropy`, a pair with each token's
    `token_entropy`. The prompts' media positions take rows of `table` `[rows, hidden]`."""
    llm = model.llm
    split = np.shape(rows.prompt_ids)[1]
    prompt = Tokens(rows.prompt_positions, rows.prompt_segments)
    answers = Tokens(rows.answer_positions, rows.answer_segments)
    over_prompt = Mask(Tokens(rows.answer_positions, jnp.zeros_like(rows.answer_segments)),
                       prompt)

    def attend(q, k, v, mask, spec, _):
        (qp, qa), (kp, ka), (vp, va) = (jnp.split(x, [split], axis=1) for x in (q, k, v))
        at_prompt, _ = flash_attention(qp, kp, vp, Mask(prompt, prompt), spec)
        at_answers, _ = merge(*flash_attention(qa, kp, vp, over_prompt, spec),
                              *flash_attention(qa, ka, va, Mask(answers, answers), spec))
        return jnp.concatenate([at_prompt, at_answers.astype(q.dtype)], axis=1)

    x = jnp.concatenate([splice_media(llm.embed(rows.prompt_ids), table, rows.prompt_media),
                         llm.embed(rows.answer_ids)], axis=1)
    row = Tokens(jnp.concatenate([rows.prompt_positions, rows.answer_positions], axis=1),
                 jnp.concatenate([rows.prompt_segments, rows.answer_segments], axis=1))
    h = llm.hidden_states(x, Mask(row, row), attend)  # the mask's positions rotate q and k
    # Answer token 0 is predicted by the prompt's last position, token i by answer token i - 1.
    questions, count = np.shape(rows.lengths)
    last = jnp.take_along_axis(h, rows.prompt_last[:, None, None], axis=1)
    before = jnp.concatenate([
        jnp.broadcast_to(last[:, None], (questions, count, 1, h.shape[-1])),
        h[:, split:].reshape(questions, count, rows.width, -1)[:, :, :-1]], axis=2)
    mask = rows.mask()
    targets = jnp.where(mask, jnp.asarray(rows.answer_ids).reshape(mask.shape), IGNORE_INDEX)
    # One row of every answer token: the logits are formed `loss_chunk` tokens at a time.
    out = chunked_token_logprobs(before.reshape(1, -1, h.shape[-1]), llm.output_weight(),
                                 targets.reshape(1, -1), loss_chunk, entropy=entropy)
    return jax.tree.map(lambda x: jnp.where(mask, x.reshape(mask.shape), 0.0), out)


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
    count = np.shape(rows.lengths)[1]

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
