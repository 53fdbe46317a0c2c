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


def media_rows(input_ids: np.ndarray, media_token_id: int) -> np.ndarray:
    """`[b, s]` int32: for the j-th media position (batch-major order) j, else -1 -- the row
    of the flattened frame embeddings `[frames * tokens_per_frame, hidden]` it takes."""
    is_media = input_ids == media_token_id
    return np.where(is_media, np.cumsum(is_media.reshape(-1)).reshape(is_media.shape) - 1,
                    -1).astype(np.int32)
