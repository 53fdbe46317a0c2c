"""The policy update's input: sampled answers laid out as training rows, and the GRPO loss.

A rollout gives, per prompt, `n` answers with the sampler's log-probabilities. The update
runs the training forward (`parallel.mmsp.logprobs_fn`: FSDP parameters, the scheme's
sequence-parallel attention) over rows `prompt + answer`, whose targets are the answer's
tokens alone, so only answer positions carry a log-probability and a loss. The prompt's
video positions take rows of the embedding table the rollout used (MR-SP: the video is
encoded once per step and every pass reuses it; the vision tower does not run).

Per-token arrays (the old and reference log-probabilities) are written at the positions
that predict each answer token, then laid out like the tokens (the scheme's zigzag order),
so the loss is elementwise over one sharding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.data.batch import Batch, from_rows
from longvila_jax.data.media import IGNORE_INDEX, media_rows
from longvila_jax.parallel.layout import SPEC, Layout
from longvila_jax.parallel.mmsp import logprobs_fn
from longvila_jax.rl.grpo import LossConfig, policy_loss


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PolicyBatch:
    """Answers as training rows on the mesh: `tokens` (laid out, `SPEC`), the embedding
    `table` `[rows, hidden]` (replicated; None: the tokens' frames go through the tower
    in every pass, as a loop without MR-SP's reuse does), per-token `old_logprobs` and
    `ref_logprobs` (laid out as `tokens`; ref None without a KL term), per-row
    `advantages`."""

    tokens: Batch
    table: jax.Array | None
    old_logprobs: jax.Array
    ref_logprobs: jax.Array | None
    advantages: jax.Array


@dataclasses.dataclass(frozen=True)
class AnswerRows:
    """Rows `prompt + answer` in natural order (host arrays): `batch` (its targets the
    answer tokens only; padding a segment of its own) and `starts[r]`, the position that
    predicts row r's first answer token."""

    batch: Batch
    starts: np.ndarray

    def per_token(self, values: Sequence[np.ndarray]) -> np.ndarray:
        """`values[r]` (one per answer token) at the positions predicting them, 0 elsewhere:
        `[rows, seq]` float32 in natural order."""
        out = np.zeros(np.shape(self.batch.input_ids), np.float32)
        for r, (start, v) in enumerate(zip(self.starts, values, strict=True)):
            out[r, start: start + len(v)] = v
        return out


def answer_rows(prompts: Sequence[np.ndarray], answers: Sequence[Sequence[int]], n: int,
                multiple: int, media_token_id: int,
                offsets: Sequence[int] | None = None) -> AnswerRows:
    """Rows for `answers` (prompt-major: answer j of prompt i is row `i * n + j`), each
    `prompts[i] + answer`, right-padded to one width, a multiple of `multiple` (the
    layout's `2 x group`). Prompt i's media positions take the table's rows from
    `offsets[i]` on (several videos in one table; default 0), as in the rollout."""
    if len(answers) != len(prompts) * n:
        raise ValueError(f"answer_rows: {len(answers)} answers for {len(prompts)} prompts x {n}")
    full = [np.concatenate([prompts[r // n], np.asarray(a, np.int32)]).astype(np.int32)
            for r, a in enumerate(answers)]
    width = -(-max(len(f) for f in full) // multiple) * multiple
    rows = np.zeros((len(full), width), np.int32)
    labels = np.full((len(full), width), IGNORE_INDEX, np.int32)
    segments = np.ones((len(full), width), np.int32)  # padding: a segment of its own
    for r, ids in enumerate(full):
        prompt = len(prompts[r // n])
        rows[r, : len(ids)], segments[r, : len(ids)] = ids, 0
        labels[r, prompt: len(ids)] = ids[prompt:]
    starts = np.asarray([len(prompts[r // n]) - 1 for r in range(len(full))], np.int32)
    batch = from_rows(rows, labels, segment_ids=segments, media_token_id=media_token_id)
    if offsets is not None:
        batch = dataclasses.replace(batch, media_rows=media_rows(
            rows, media_token_id, np.repeat(np.asarray(offsets, np.int32), n)))
    return AnswerRows(batch, starts)


def place(rows: AnswerRows, layout: Layout, mesh, table, old_logprobs, advantages,
          ref_logprobs=None) -> PolicyBatch:
    """A `PolicyBatch` on `mesh`: the rows and per-token arrays (natural order, `[rows,
    seq]`) laid out and sharded as `SPEC`, `table` replicated, `advantages` `[rows]` over
    `data`."""
    perm = layout.permutation(np.shape(rows.batch.input_ids)[1])
    spec = NamedSharding(mesh, SPEC)

    def laid(values):
        return None if values is None else jax.device_put(
            np.ascontiguousarray(np.asarray(values, np.float32)[:, perm]), spec)

    return PolicyBatch(
        tokens=jax.device_put(layout.lay_out(rows.batch), spec),
        table=None if table is None else jax.device_put(
            jnp.asarray(table).reshape(-1, table.shape[-1]), NamedSharding(mesh, P())),
        old_logprobs=laid(old_logprobs), ref_logprobs=laid(ref_logprobs),
        advantages=jax.device_put(np.asarray(advantages, np.float32),
                                  NamedSharding(mesh, P("data"))))


def grpo_loss_fn(mesh, scheme: str, config: LossConfig, loss_chunk: int = 2048):
    """`loss(model, batch: PolicyBatch) -> (loss, metrics)`: GRPO's clipped token-mean loss
    (`rl.grpo.policy_loss`) over the training forward's log-probabilities of the answers;
    the metrics add the policy's token-mean `entropy` over the answers, from the same logits."""
    logprobs = logprobs_fn(mesh, scheme, loss_chunk, entropy=True)

    def loss(model, batch: PolicyBatch):
        logp, entropy = logprobs(model, batch.tokens, batch.table)
        mask = batch.tokens.targets != IGNORE_INDEX
        return policy_loss(logp, batch.old_logprobs, batch.advantages, mask, config,
                           batch.ref_logprobs, entropy)

    return loss
