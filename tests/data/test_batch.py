"""The data side's batch: targets shifted within packed samples, media rows per row."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from longvila_jax.data.batch import from_rows, next_tokens
from longvila_jax.data.media import IGNORE_INDEX, media_rows


def test_next_tokens_stay_inside_each_sample(rng):
    rows, length = 3, int(rng.integers(8, 40))
    labels = rng.integers(0, 100, (rows, length)).astype(np.int32)
    segments = np.sort(rng.integers(0, 4, (rows, length)), 1).astype(np.int32)
    want = np.full((rows, length), IGNORE_INDEX)
    for r in range(rows):
        for t in range(length - 1):  # a position predicts the next one of its own sample
            if segments[r, t + 1] == segments[r, t]:
                want[r, t] = labels[r, t + 1]
    np.testing.assert_array_equal(next_tokens(labels, segments), want)


def test_media_rows_count_each_rows_media_positions(rng):
    ids = rng.integers(0, 5, (4, 30)).astype(np.int32)  # media id 3
    got = media_rows(ids, 3)
    for r in range(4):
        media = ids[r] == 3
        np.testing.assert_array_equal(got[r][media], np.arange(media.sum()))
        assert (got[r][~media] == -1).all()
    # The model computes it in a jitted function alike.
    np.testing.assert_array_equal(np.asarray(media_rows(jnp.asarray(ids), 3)), got)
    offsets = rng.integers(0, 100, 4).astype(np.int32)  # videos sharing one table
    np.testing.assert_array_equal(media_rows(ids, 3, offsets),
                                  np.where(got >= 0, got + offsets[:, None], -1))


def test_from_rows_fills_defaults(rng):
    ids = rng.integers(0, 9, (2, 6)).astype(np.int32)
    batch = from_rows(ids, ids, media_token_id=8)
    np.testing.assert_array_equal(batch.positions, np.tile(np.arange(6), (2, 1)))
    assert (batch.segment_ids == 0).all() and batch.frames is None
    np.testing.assert_array_equal(batch.targets[:, :-1], ids[:, 1:])
    np.testing.assert_array_equal(batch.media_rows, media_rows(ids, 8))
