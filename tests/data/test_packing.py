"""Packing invariants on random sample streams: samples intact, apart, and in their own segment."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.data.packing import PackStats, pack, pad_to_multiple

VOCAB = 1000
TAG = 10_000  # input_ids[0] = TAG + sample index: finds a sample in a row without segment ids
FRAME_SHAPE = (2, 3, 3)


def _sample(rng, index: int, length: int, frames: int | None) -> dict:
    ids = rng.integers(0, VOCAB, length).astype(np.int32)
    ids[0] = TAG + index
    labels = np.where(rng.random(length) < 0.5, ids, IGNORE_INDEX).astype(np.int32)
    sample = {"input_ids": ids, "labels": labels, "id": f"sample-{index}"}
    if frames is not None:
        sample["frames"] = rng.random((frames, *FRAME_SHAPE), dtype=np.float32)
    return sample


def _stream(rng, count: int, tokens: int, frames: int) -> tuple[list[dict], dict[str, set]]:
    """Random samples, some over the token or frame budget; also which index goes where."""
    samples, fate = [], {"kept": set(), "too_many_tokens": set(), "too_many_frames": set()}
    for index in range(count):
        kind = rng.choice(list(fate), p=[0.8, 0.1, 0.1] if frames else [0.85, 0.15, 0.0])
        length = int(
            rng.integers(tokens + 1, 2 * tokens + 1)
            if kind == "too_many_tokens"
            else rng.integers(1, tokens + 1)
        )
        count_frames = int(
            rng.integers(frames + 1, frames + 4)
            if kind == "too_many_frames"
            else rng.integers(0, frames + 1)
        )
        samples.append(_sample(rng, index, length, count_frames if frames else None))
        fate[kind].add(index)
    return samples, fate


def _rows(samples, **kwargs) -> tuple[list[dict], PackStats]:
    stats = PackStats()
    dataset = grain.MapDataset.source(samples).to_iter_dataset()
    return list(pack(dataset, stats=stats, **kwargs)), stats


def _check_row(row: dict, samples: list[dict], tokens: int, frames: int, pad_id: int) -> list:
    """Asserts one row's invariants; returns the sample indices it holds."""
    ids, labels = row["input_ids"], row["labels"]
    segments, positions = row["segment_ids"], row["positions"]
    for name in ("input_ids", "labels", "segment_ids", "positions"):
        assert row[name].shape == (tokens,) and row[name].dtype == np.int32, name

    starts = np.flatnonzero(ids >= TAG)
    held = [int(ids[start]) - TAG for start in starts]
    owner = np.full(tokens, -1)  # which sample each position holds, found from the tokens alone
    offset = np.zeros(tokens, int)
    seen_segments = set()
    for start, index in zip(starts, held, strict=True):
        sample = samples[index]
        n = len(sample["input_ids"])
        span = slice(start, start + n)
        assert np.all(owner[span] == -1)
        owner[span], offset[span] = index, np.arange(n)
        np.testing.assert_array_equal(ids[span], sample["input_ids"])
        np.testing.assert_array_equal(labels[span], sample["labels"])
        np.testing.assert_array_equal(positions[span], np.arange(n))
        segment = segments[start]
        assert segment > 0 and segment not in seen_segments
        assert np.all(segments[span] == segment)
        seen_segments.add(segment)
        if frames:
            np.testing.assert_array_equal(
                row["frames"][row["frame_segment_ids"] == segment], sample["frames"]
            )

    pad = owner == -1
    assert np.all(segments[pad] == 0) and np.all(labels[pad] == IGNORE_INDEX)
    assert np.all(ids[pad] == pad_id)
    if frames:
        assert row["frames"].shape == (frames, *FRAME_SHAPE)
        frame_pad = row["frame_segment_ids"] == 0
        assert set(row["frame_segment_ids"][~frame_pad]) <= seen_segments
        assert np.all(row["frames"][frame_pad] == 0)

    # The mask the attention builds from segment ids and positions ...
    mask = (segments[:, None] == segments[None, :]) & (positions[None, :] <= positions[:, None])
    # ... is the block-diagonal causal mask of the original samples; pads see only pads.
    same = owner[:, None] == owner[None, :]
    expected = same & (offset[None, :] <= offset[:, None]) & ~pad[:, None]
    np.testing.assert_array_equal(mask[~pad], expected[~pad])
    assert not mask[pad][:, ~pad].any()
    assert np.all(np.diagonal(mask))  # no empty attention row
    return held


@pytest.mark.parametrize("with_frames", [False, True])
def test_pack_invariants(rng, with_frames):
    tokens = int(rng.integers(8, 64))
    frames = int(rng.integers(1, 6)) if with_frames else 0
    pad_id = int(rng.integers(0, VOCAB))
    samples, fate = _stream(rng, int(rng.integers(40, 80)), tokens, frames)
    rows, stats = _rows(
        samples,
        tokens=tokens,
        frames=frames,
        num_bins=int(rng.integers(1, 5)),
        seed=int(rng.integers(1000)),
        pad_id=pad_id,
    )

    keys = {"input_ids", "labels", "segment_ids", "positions"}
    assert rows[0].keys() == keys | ({"frames", "frame_segment_ids"} if frames else set())
    held = [index for row in rows for index in _check_row(row, samples, tokens, frames, pad_id)]
    assert sorted(held) == sorted(fate["kept"])  # each kept sample exactly once
    assert stats == PackStats(**{kind: len(indices) for kind, indices in fate.items()})


def test_frames_without_budget_are_dropped(rng):
    samples = [_sample(rng, 0, 5, frames=2), _sample(rng, 1, 5, frames=0), _sample(rng, 2, 5, None)]
    rows, stats = _rows(samples, tokens=16)
    assert stats == PackStats(kept=2, too_many_frames=1)
    assert sorted(int(i) - TAG for row in rows for i in row["input_ids"] if i >= TAG) == [1, 2]


def test_frame_budget_needs_frames_in_every_sample(rng):
    samples = [_sample(rng, 0, 5, frames=1), _sample(rng, 1, 5, None)]
    with pytest.raises(ValueError, match="'frames'"):
        _rows(samples, tokens=16, frames=4)


def test_mismatched_labels_raise(rng):
    sample = _sample(rng, 0, 6, None)
    sample["labels"] = sample["labels"][:-1]
    with pytest.raises(ValueError, match="6 input_ids but 5 labels"):
        _rows([sample], tokens=16)


def test_pad_to_multiple(rng):
    tokens, multiple = int(rng.integers(8, 40)), int(rng.integers(1, 17))
    samples, _ = _stream(rng, 20, tokens, frames=3)
    rows, _ = _rows(samples, tokens=tokens, frames=3, pad_id=7)
    length = -(-tokens // multiple) * multiple
    fills = {"input_ids": 7, "labels": IGNORE_INDEX, "segment_ids": 0, "positions": 0}
    for batch in (rows[0], {k: np.stack([r[k] for r in rows]) for k in rows[0]}):
        padded = pad_to_multiple(batch, multiple, pad_id=7)
        assert padded.keys() == batch.keys()
        for name, fill in fills.items():
            assert padded[name].shape[-1] == length and padded[name].dtype == batch[name].dtype
            np.testing.assert_array_equal(padded[name][..., :tokens], batch[name])
            assert np.all(padded[name][..., tokens:] == fill)
        for name in ("frames", "frame_segment_ids"):
            assert padded[name] is batch[name]
