"""Media placeholders in token sequences, on the host: the label that is never scored, the
expansion of each placeholder to its frames' positions, and the table row each position
takes."""

from __future__ import annotations

import numpy as np

# Labels that the loss skips (Hugging Face's convention: prompts, media, padding).
IGNORE_INDEX = -100


def expand_media_tokens(input_ids, media_token_id: int, tokens_per_frame: int,
                        frames_per_media) -> np.ndarray:
    """Host-side: repeat each media placeholder to the positions its frames take.

    `frames_per_media[k]` is the frame count of the k-th placeholder (1 for an image).
    Raises if the placeholder count and `frames_per_media` disagree.
    """
    ids = [int(t) for t in input_ids]
    spots = [i for i, t in enumerate(ids) if t == media_token_id]
    if len(spots) != len(frames_per_media):
        raise ValueError(f"expand_media_tokens: {len(spots)} media placeholders in the text "
                         f"but {len(frames_per_media)} media items given")
    out, last = [], 0
    for spot, frames in zip(spots, frames_per_media, strict=True):
        out += ids[last:spot] + [media_token_id] * (frames * tokens_per_frame)
        last = spot + 1
    return np.asarray(out + ids[last:], np.int32)


def media_rows(input_ids, media_token_id: int, offsets=None):
    """`[..., s]` int32: j at a row's j-th media position, else -1 -- the row of that row's
    frame embeddings `[frames * tokens_per_frame, hidden]` it takes (frames in the order
    their positions appear); with `offsets` `[...]`, `offsets[r] + j` (several rows' videos
    in one table). Plain operators only, so numpy on the host and jax in a jitted model
    compute it alike."""
    is_media = (input_ids == media_token_id).astype(np.int32)
    rows = is_media.cumsum(-1) * is_media - 1
    if offsets is not None:
        rows = rows + is_media * offsets[..., None]
    return rows.astype(np.int32)
