"""One step's sequences, as training, prefill and the RL passes hand them to the model.

The data side fills a `Batch` once, row by row: the targets already shifted (each position
holds the token it predicts) and each media position's row in its row's frame table; the
mesh side only permutes tokens into its scheme's order and pads frames
(`parallel.layout.Layout.lay_out`). A `Batch` is a registered pytree, so it crosses `jit` and
`shard_map` whole, with one sharding for every field (rows over `data`, the next axis over
the sequence group: tokens, or a row's frames).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from longvila_jax.data.media import IGNORE_INDEX, media_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """`[rows, seq]` int32: `input_ids`; `targets`, the token each position predicts
    (`IGNORE_INDEX` where nothing is scored; None where nothing is, as in prefill);
    `positions` and `segment_ids`, global, the attention mask (`kernels.Mask`);
    `media_rows`, the row of the media table a media position takes, -1 elsewhere (its
    row's own frames' table, or a table the rows share, as prefill's video embeddings);
    `frames` `[rows, frames, H, W, 3]` float32, each row's own in the order its media
    positions name them, zeros padding (None: no frames to encode)."""

    input_ids: object
    targets: object
    positions: object
    segment_ids: object
    media_rows: object
    frames: object = None


def next_tokens(labels: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """`targets[..., t] = labels[..., t + 1]` where t + 1 is in t's segment, else
    `IGNORE_INDEX`: no position is trained to predict the next packed sample, nor past the
    end of its row."""
    targets = np.full(labels.shape, IGNORE_INDEX, np.int32)
    same = segment_ids[..., 1:] == segment_ids[..., :-1]
    targets[..., :-1] = np.where(same, labels[..., 1:], IGNORE_INDEX)
    return targets


def from_rows(input_ids, labels, frames=None, positions=None, segment_ids=None, *,
              media_token_id: int) -> Batch:
    """A `Batch` of natural-order rows: `labels` `[rows, seq]` unshifted (as Hugging Face
    gives them), `positions` None: arange, `segment_ids` None: one segment per row,
    `frames` `[rows, F, H, W, 3]` or None."""
    input_ids = np.asarray(input_ids, np.int32)
    shape = input_ids.shape
    positions = np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape) \
        if positions is None else np.asarray(positions, np.int32)
    segment_ids = np.zeros(shape, np.int32) if segment_ids is None \
        else np.asarray(segment_ids, np.int32)
    return Batch(input_ids, next_tokens(np.asarray(labels), segment_ids), positions,
                 segment_ids, media_rows(input_ids, media_token_id),
                 None if frames is None else np.asarray(frames, np.float32))
