"""`Layout.lay_out`: tokens in the scheme's order with their global positions, frames padded
per row to the sequence group, rows that must split over `data`."""

from __future__ import annotations

import numpy as np
import pytest

from longvila_jax.data.batch import from_rows
from longvila_jax.parallel.layout import Layout
from longvila_jax.parallel.schemes import layout_permutation


@pytest.mark.parametrize("scheme,node,local", [("ring", 4, 1), ("ulysses", 1, 4),
                                               ("2d", 2, 2)])
def test_lay_out_permutes_tokens_and_pads_frames(rng, scheme, node, local):
    rows, length = 2, 16 * int(rng.integers(1, 4))
    ids = rng.integers(0, 50, (rows, length)).astype(np.int32)
    frames = rng.normal(size=(rows, 5, 4, 4, 3)).astype(np.float32)
    batch = from_rows(ids, ids, frames, media_token_id=49)
    laid = Layout(scheme, 2, node, local).lay_out(batch)
    perm = layout_permutation(length, scheme, node, local)
    for name in ("input_ids", "targets", "positions", "segment_ids", "media_rows"):
        np.testing.assert_array_equal(getattr(laid, name), getattr(batch, name)[:, perm])
    assert laid.frames.shape[1] % (node * local) == 0 and laid.frames.shape[1] >= 5
    np.testing.assert_array_equal(laid.frames[:, :5], frames)
    assert (laid.frames[:, 5:] == 0).all()


def test_lay_out_rejects_what_cannot_split():
    """Rows are laid out one by one (a process's share of them may be any number); a row's
    length must split over the sequence group's zigzag chunks."""
    batch = from_rows(np.zeros((3, 8), np.int32), np.zeros((3, 8), np.int32), media_token_id=1)
    assert Layout("ring", 2, 2, 1).lay_out(batch).input_ids.shape == (3, 8)
    with pytest.raises(ValueError, match="multiple of 2 x node x local"):
        Layout("ring", 1, 8, 1).lay_out(batch)
