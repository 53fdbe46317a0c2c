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

Sequence-parallel with Ulysses: each device holds a contiguous piece of the row for
everything but attention, and Ulysses' all-to-all gives every device the whole row for
some heads, where the split above runs unchanged. Ring attention would need the answers'
queries to visit every key shard and is not supported (nor 2D). Used where it can be
unless `rl.shared_prompt` is False; measured on one H200 in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from longvila_jax.data.media import IGNORE_INDEX, media_rows
from longvila_jax.kernels import Mask, Tokens, flash_attention
from longvila_jax.models.longvila import splice_media
from longvila_jax.models.loss import chunked_token_logprobs
from longvila_jax.parallel.layout import SPEC
from longvila_jax.parallel.mesh import SEQUENCE_AXES
from longvila_jax.parallel.mmsp import sharded
from longvila_jax.parallel.ring import merge
from longvila_jax.parallel.ulysses import ulysses
from longvila_jax.rl.grpo import LossConfig, policy_loss

SCHEMES = ("none", "ulysses")  # the sequence-parallel schemes a shared prompt runs under


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedRows:
    """Each question one row `[prompt | answers | padding]` (int32 host or device arrays
    `[questions, S]`): `ids`, `positions`, `segments` (the prompt 0, answer j j, padding
    `answers`, a segment of its own) and `media` (the table row of each media position, -1
    elsewhere). The prompts, padded, fill columns `[0, split)`, answer j columns `split + j
    * width` on; `prompt_last` `[questions]` is each prompt's last column and `lengths`
    `[questions, answers]` each answer's length (0: no answer there)."""

    ids: object
    positions: object
    segments: object
    media: object
    prompt_last: object
    lengths: object
    split: int = dataclasses.field(metadata={"static": True})
    width: int = dataclasses.field(metadata={"static": True})

    def mask(self) -> jax.Array:
        """`[questions * answers, width]` bool: the answer tokens."""
        lengths = jnp.asarray(self.lengths).reshape(-1, 1)
        return jnp.arange(self.width)[None, :] < lengths

    def per_token(self, values: Sequence[Sequence[float] | None]) -> np.ndarray:
        """`values[a]` (one per token of answer a, question-major; None where no answer) as
        `[questions * answers, width]` float32, 0 past each answer's end."""
        out = np.zeros((len(values), self.width), np.float32)
        for a, v in enumerate(values):
            if v is not None:
                out[a, : len(v)] = v
        return out


def shared_rows(prompts: Sequence[np.ndarray], answers: Sequence[Sequence[Sequence[int]]],
                media_token_id: int, offsets: Sequence[int] | None = None,
                multiple: int = 1) -> SharedRows:
    """`SharedRows` for `answers[q]`, question q's answers to `prompts[q]` (ragged: fewer
    answers are padded with empty ones), each row padded to a multiple of `multiple` (a
    sequence-parallel group). Prompt q's media positions take the table's rows from
    `offsets[q]` on (several videos in one table; default 0), as in the rollout."""
    count = max(len(a) for a in answers)
    width = max(max((len(x) for x in a), default=1) for a in answers)
    split = max(len(p) for p in prompts)
    length = -(-(split + count * width) // multiple) * multiple
    questions = len(prompts)
    ids = np.zeros((questions, length), np.int32)
    positions = np.zeros((questions, length), np.int32)
    segments = np.full((questions, length), count, np.int32)
    lengths = np.zeros((questions, count), np.int32)
    for q, (prompt, group) in enumerate(zip(prompts, answers, strict=True)):
        ids[q, : len(prompt)], segments[q, : len(prompt)] = prompt, 0
        positions[q, :split] = np.arange(split)
        for j, answer in enumerate(group):
            cols = slice(split + j * width, split + j * width + len(answer))
            ids[q, cols], segments[q, cols] = answer, j
            positions[q, cols] = len(prompt) + np.arange(len(answer))
            lengths[q, j] = len(answer)
    media = media_rows(np.where(np.arange(length) < split, ids, -1), media_token_id,
                       None if offsets is None else np.asarray(offsets, np.int32))
    return SharedRows(ids, positions, segments, media,
                      np.asarray([len(p) - 1 for p in prompts], np.int32), lengths, split,
                      width)


def _split_attention(rows: SharedRows, spec):
    """`attend(q, k, v) -> (out, lse)` over whole rows: the prompts causal over themselves,
    the answers over the whole prompt and their own answer (see the module docstring)."""
    split = rows.split
    cut = lambda a: (a[:, :split], a[:, split:])
    (prompt_positions, answer_positions), (prompt_segments, answer_segments) = (
        cut(jnp.asarray(rows.positions)), cut(jnp.asarray(rows.segments)))
    prompt = Tokens(prompt_positions, prompt_segments)
    answers = Tokens(answer_positions, answer_segments)
    over_prompt = Mask(Tokens(answer_positions, jnp.zeros_like(answer_segments)), prompt)

    def attend(q, k, v):
        (qp, qa), (kp, ka), (vp, va) = cut(q), cut(k), cut(v)
        at_prompt, prompt_lse = flash_attention(qp, kp, vp, Mask(prompt, prompt), spec)
        at_answers, answers_lse = merge(*flash_attention(qa, kp, vp, over_prompt, spec),
                                        *flash_attention(qa, ka, va, Mask(answers, answers),
                                                         spec))
        return (jnp.concatenate([at_prompt, at_answers.astype(q.dtype)], axis=1),
                jnp.concatenate([prompt_lse, answers_lse], axis=2))

    return attend


def shared_logprobs_fn(mesh, scheme: str, loss_chunk: int = 2048, *, entropy: bool = False):
    """`logprobs(model, rows: SharedRows, table)`: each answer token's log-probability,
    `[questions * answers, width]` (question-major, 0 past an answer's end); with `entropy`,
    a pair with each token's `token_entropy`. The prompts' media positions take rows of
    `table` `[rows, hidden]` (replicated). On `mesh` with `scheme` 'none' (one device) or
    'ulysses' (rows a multiple of the group long: `shared_rows(multiple=)`); the model's
    parameters FSDP-sharded or replicated, as `parallel.mmsp.logprobs_fn` takes them."""
    if scheme not in SCHEMES:
        raise ValueError(f"shared_logprobs_fn: scheme {scheme!r} is not one of {SCHEMES}")

    def local(model, rows: SharedRows, table, gather):
        llm = model.llm
        group = jax.lax.axis_size(SEQUENCE_AXES)
        piece = lambda a, size: jax.lax.dynamic_slice_in_dim(  # this device's piece
            a, jax.lax.axis_index(SEQUENCE_AXES) * size, size, axis=1)
        size = rows.ids.shape[1] // group
        x = splice_media(llm.embed(piece(rows.ids, size)), table, piece(rows.media, size))

        def attend(q, k, v, mask, spec, _):
            split = _split_attention(rows, spec)
            if scheme == "none":
                return split(q, k, v)[0]
            # the whole rows for some heads, the attention's result back in pieces
            return ulysses(lambda q, k, v, _: split(q, k, v), q, k, v, None,
                           axis_name=SEQUENCE_AXES)[0]

        tokens = Tokens(piece(rows.positions, size), piece(rows.segments, size))
        h = llm.hidden_states(x, Mask(tokens, tokens), attend, gather("llm"))
        # The states that predict answer tokens, from whichever piece holds each: the
        # prompt's last and every answer column, summed over the pieces (zero elsewhere).
        questions, count = rows.lengths.shape
        wanted = jnp.concatenate([
            rows.prompt_last[:, None],
            jnp.broadcast_to(rows.split + jnp.arange(count * rows.width),
                             (questions, count * rows.width))], axis=1)
        wanted = wanted - jax.lax.axis_index(SEQUENCE_AXES) * size
        held = (wanted >= 0) & (wanted < size)
        states = jnp.take_along_axis(h, jnp.clip(wanted, 0, size - 1)[..., None], axis=1)
        states = jax.lax.psum(jnp.where(held[..., None], states, 0), SEQUENCE_AXES)
        # Each device scores its share of the answer tokens, one row laid out as `SPEC`.
        before, targets = _predicting(states, rows)
        share = -(-targets.size // group)
        pad = share * group - targets.size
        before = piece(jnp.pad(before, ((0, pad), (0, 0)))[None], share)
        targets = piece(jnp.pad(targets, (0, pad), constant_values=IGNORE_INDEX)[None], share)
        return chunked_token_logprobs(before, llm.output_weight(), targets, loss_chunk,
                                      entropy=entropy)

    run = sharded(mesh, local, (SPEC, SPEC) if entropy else SPEC, P(), batch_spec=P())
    devices = mesh.shape["node"] * mesh.shape["local"]

    def logprobs(model, rows: SharedRows, table):
        if rows.ids.shape[1] % devices:
            raise ValueError(f"shared_logprobs_fn: rows of {rows.ids.shape[1]} tokens do not "
                             f"split over {devices} devices (shared_rows(multiple=))")
        shape = rows.mask().shape  # past an answer's end the target is ignored: 0 there
        return jax.tree.map(lambda x: x[0, : math.prod(shape)].reshape(shape),
                            run(model, rows, table))

    return logprobs


def _predicting(states, rows: SharedRows):
    """`(before [tokens, hidden], targets [tokens])` over every answer slot's tokens (question
    and answer major): the final hidden state that predicts each token, from `states`
    `[questions, 1 + answers * width, hidden]` (each prompt's last position, then every
    answer column), and the token (IGNORE_INDEX past an answer's end). Answer token 0 is
    predicted by the prompt's last position, token i by answer token i - 1."""
    questions, count = rows.lengths.shape
    hidden = states.shape[-1]
    before = jnp.concatenate([
        jnp.broadcast_to(states[:, None, :1], (questions, count, 1, hidden)),
        states[:, 1:].reshape(questions, count, rows.width, hidden)[:, :, :-1]], axis=2)
    mask = rows.mask()
    ids = rows.ids[:, rows.split: rows.split + count * rows.width]
    targets = jnp.where(mask, ids.reshape(mask.shape), IGNORE_INDEX)
    return before.reshape(-1, hidden), targets.reshape(-1)


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
                 table, multiple: int = 1) -> SharedBatch:
    """A `SharedBatch`: question q's `answers[q]` to `prompts[q]` (see `shared_rows`), with
    their sampler `logprobs[q]` and `advantages[q]` in the same ragged layout."""
    rows = shared_rows(prompts, answers, media_token_id, offsets, multiple)
    count = np.shape(rows.lengths)[1]

    def slots(per_question, empty):
        return [group[j] if j < len(group) else empty
                for group in per_question for j in range(count)]

    return SharedBatch(jax.tree.map(jnp.asarray, rows), table,
                       jnp.asarray(rows.per_token(slots(logprobs, None))), None,
                       jnp.asarray(slots(advantages, 0.0), jnp.float32))


def shared_loss_fn(mesh, scheme: str, config: LossConfig, loss_chunk: int = 2048):
    """`loss(model, batch: SharedBatch) -> (loss, metrics)`: `policy_batch.grpo_loss_fn` on
    `shared_logprobs_fn`, the same loss and metrics with each prompt computed once."""
    logprobs = shared_logprobs_fn(mesh, scheme, loss_chunk, entropy=True)

    def loss(model, batch: SharedBatch):
        logp, entropy = logprobs(model, batch.rows, batch.table)
        return policy_loss(logp, batch.old_logprobs, batch.advantages, batch.rows.mask(),
                           config, batch.ref_logprobs, entropy)

    return loss
