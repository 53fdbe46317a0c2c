"""Synthetic media: index frames survive encoding, needles sit where asked, bad media is bad."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from longvila_jax.data.synthetic import (
    make_needle_dataset,
    needle_frame,
    read_frame_index,
    write_bad_media,
    write_haystack_video,
    write_index_video,
)
from longvila_jax.data.video import REASONS

# Roughly the drawn colours: the test only needs the nearest name to be the right one.
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def _even(rng, low: int, high: int) -> int:
    return 2 * int(rng.integers(low // 2, high // 2 + 1))


def _decode_all(path) -> np.ndarray:
    """Every frame of a video as uint8 RGB `[F, H, W, 3]`, read with plain cv2."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame[..., ::-1])
    cap.release()
    return np.array(frames)


# --- index videos -------------------------------------------------------------------------------


def test_every_index_frame_decodes_after_encoding_and_downscaling(tmp_path, rng):
    total = int(rng.integers(40, 301))
    width, height = _even(rng, 32, 320), _even(rng, 32, 240)
    path = write_index_video(tmp_path / "index.mp4", total, width=width, height=height)
    frames = _decode_all(path)
    assert frames.shape == (total, height, width, 3)
    for i, frame in enumerate(frames):
        assert read_frame_index(frame) == i
        small = cv2.resize(frame, (32, 32), interpolation=cv2.INTER_AREA)
        assert read_frame_index(small) == i
        normalised = small.astype(np.float32) / 127.5 - 1.0  # what load_frames returns
        assert read_frame_index(normalised) == i


@pytest.mark.filterwarnings("ignore:OpenCV has no")
def test_an_unavailable_codec_falls_back_to_mp4v(tmp_path, rng):
    total = int(rng.integers(2, 20))
    path = write_index_video(tmp_path / "h264.mp4", total, width=64, height=48, codec="avc1")
    assert [read_frame_index(f) for f in _decode_all(path)] == list(range(total))


def test_read_frame_index_rejects_frames_without_an_index(rng):
    grey = np.full((48, 64, 3), rng.integers(80, 176), np.uint8)
    with pytest.raises(ValueError, match="not an index frame"):
        read_frame_index(grey)
    with pytest.raises(ValueError, match="shape"):
        read_frame_index(grey[..., 0])


@pytest.mark.parametrize(
    "kwargs", [{"num_frames": 0}, {"num_frames": 2**16 + 1}, {"width": 65}, {"height": 0}]
)
def test_write_index_video_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_index_video(tmp_path / "x.mp4", **{"num_frames": 4, "width": 64, **kwargs})
    assert not (tmp_path / "x.mp4").exists()


# --- haystacks and needles ----------------------------------------------------------------------


def test_haystack_is_seeded_and_moves(tmp_path, rng):
    total = int(rng.integers(2, 30))
    width, height = _even(rng, 16, 160), _even(rng, 16, 120)
    seed = int(rng.integers(2**31))
    videos = [
        _decode_all(
            write_haystack_video(tmp_path / f"{i}.mp4", total, width=width, height=height, seed=s)
        )
        for i, s in enumerate([seed, seed, seed + 1])
    ]
    assert videos[0].shape == (total, height, width, 3)
    np.testing.assert_array_equal(videos[0], videos[1])
    assert np.abs(videos[0].astype(int) - videos[2]).mean() > 10
    assert min(np.abs(np.diff(videos[0].astype(int), axis=0)).mean(axis=(1, 2, 3))) > 1


def _fact_pixels(frame: np.ndarray) -> np.ndarray:
    """Where the frame differs from its plain background (the top-left pixel)."""
    return np.abs(frame.astype(int) - frame[0, 0]).max(axis=-1) > 60


def test_needle_facts_are_true_and_varied(rng):
    width, height = _even(rng, 64, 320), _even(rng, 64, 240)
    seeds = rng.integers(0, 2**31, 60)
    facts = set()
    for seed in seeds:
        frame, question, answer = needle_frame(width, height, seed=int(seed))
        again, *qa = needle_frame(width, height, seed=int(seed))
        np.testing.assert_array_equal(frame, again)
        assert qa == [question, answer]
        assert frame.shape == (height, width, 3) and frame.dtype == np.uint8
        assert answer and " " not in answer
        mask = _fact_pixels(frame)
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # of the bounding box
        if "colour" in question:
            colour = frame[mask].mean(axis=0)
            nearest = min(COLOURS, key=lambda name: np.abs(colour - COLOURS[name]).sum())
            assert nearest == answer
        elif "shape" in question:
            expected_fill = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[answer]
            assert abs(fill - expected_fill) < 0.06
        else:
            assert answer.isdigit() and len(answer) == 1
            assert np.median(frame[mask]) < 30  # black ink
        facts.add((question, answer))
    assert len({q for q, _ in facts}) == 3 and len(facts) >= 8


@pytest.fixture
def needle_args(rng):
    num_frames = int(rng.integers(8, 40))
    return {
        "num_videos": int(rng.integers(1, 4)),
        "num_frames": num_frames,
        "depth": float(rng.choice([0.0, 1.0, rng.uniform()])),
        "width": _even(rng, 32, 160),
        "height": _even(rng, 32, 120),
        "needle_frames": int(rng.integers(1, min(4, num_frames) + 1)),
        "seed": int(rng.integers(2**31)),
    }


def _records(jsonl) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def test_needle_dataset_records(tmp_path, needle_args):
    jsonl = make_needle_dataset(tmp_path, **needle_args)
    assert jsonl == tmp_path / "needle.jsonl"
    records = _records(jsonl)
    assert len(records) == needle_args["num_videos"]
    for i, record in enumerate(records):
        keys = {"id", "video", "conversations", "needle_index", "depth", "needle_seed"}
        assert set(record) == keys
        assert record["id"] == f"needle_{i:04d}"
        assert record["video"] == f"videos/needle_{i:04d}.mp4"
        assert (tmp_path / record["video"]).is_file()
        human, gpt = record["conversations"]
        _, question, answer = needle_frame(8, 8, seed=record["needle_seed"])
        assert human == {"from": "human", "value": "<video>\n" + question}
        assert gpt == {"from": "gpt", "value": answer}
        assert record["depth"] == needle_args["depth"]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp files left


def test_the_needle_sits_at_the_requested_depth(tmp_path, needle_args):
    records = _records(make_needle_dataset(tmp_path, **needle_args))
    total, count = needle_args["num_frames"], needle_args["needle_frames"]
    for record in records:
        frames = _decode_all(tmp_path / record["video"]).astype(float)
        assert frames.shape == (total, needle_args["height"], needle_args["width"], 3)
        needle, _, _ = needle_frame(
            needle_args["width"], needle_args["height"], seed=record["needle_seed"]
        )
        error = ((frames - needle) ** 2).mean(axis=(1, 2, 3))
        found = np.flatnonzero(error < 0.1 * np.median(error)).tolist()
        start = record["needle_index"]
        assert found == list(range(start, start + count))
        assert abs(start - needle_args["depth"] * (total - count)) <= 0.5


def test_needle_dataset_is_reproducible_from_its_seed(tmp_path, needle_args):
    same = [make_needle_dataset(tmp_path / name, **needle_args) for name in ("a", "b")]
    other = make_needle_dataset(tmp_path / "c", **{**needle_args, "seed": needle_args["seed"] + 1})
    assert same[0].read_bytes() == same[1].read_bytes()
    assert same[0].read_bytes() != other.read_bytes()
    for record in _records(same[0]):
        first, second, third = (_decode_all(j.parent / record["video"]) for j in (*same, other))
        np.testing.assert_array_equal(first, second)
        assert np.abs(first.astype(int) - third).mean() > 10


@pytest.mark.parametrize(
    "change", [{"num_videos": 0}, {"needle_frames": 0}, {"needle_frames": 10**6}, {"depth": 1.5}]
)
def test_needle_dataset_rejects_bad_arguments(tmp_path, needle_args, change):
    with pytest.raises(ValueError, match=next(iter(change))):
        make_needle_dataset(tmp_path, **{**needle_args, **change})


# --- bad media ----------------------------------------------------------------------------------


def test_bad_media_are_bad_in_the_way_they_claim(tmp_path):
    paths = write_bad_media(tmp_path)
    assert sorted(paths) == sorted(REASONS)
    assert not (tmp_path / paths["missing"]).exists()
    not_video = tmp_path / paths["not_video"]
    assert not_video.suffix == ".mp4" and not_video.read_text().strip()  # text, named as video
    truncated = cv2.VideoCapture(str(tmp_path / paths["unreadable"]))
    assert not truncated.isOpened()
    assert (tmp_path / paths["unreadable"]).read_bytes()[4:8] == b"ftyp"
    empty = cv2.VideoCapture(str(tmp_path / paths["zero_frames"]))
    assert empty.isOpened() and empty.get(cv2.CAP_PROP_FRAME_COUNT) == 0
    assert not empty.read()[0]
    short = _decode_all(tmp_path / paths["too_few_frames"])
    assert [read_frame_index(frame) for frame in short] == [0, 1, 2]
