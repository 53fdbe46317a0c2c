"""Seeded synthetic videos: frame-index videos, needle-in-a-haystack datasets, broken media.

Tests need videos whose every frame is known; the demo and the needle-in-a-haystack eval need
long videos hiding one fact at a chosen depth. Everything here is drawn with numpy and cv2 from
a seed and written with cv2.VideoWriter, so a dataset is reproducible from its arguments alone
and nothing is downloaded.

Videos are MPEG-4 Part 2 ("mp4v") in .mp4 because the opencv-python wheels ship no H.264
encoder; a codec argument may ask for another fourcc, and falls back to mp4v when OpenCV cannot
open an encoder for it. Frame sizes must be even: the encoder silently crops odd ones.

An index frame carries its number as 16 bits in a 4x4 grid of black or white cells covering the
frame: cells that large keep their value through lossy compression and resizing down to 32x32.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from longvila_jax.atomic import atomic_file

INDEX_BITS = 16
_GRID = 4  # cells per side; _GRID**2 == INDEX_BITS

_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 30),
}
_SHAPES = ("circle", "square", "triangle")
_QUESTIONS = {
    "colour": "What colour is the shape shown in the video?",
    "shape": "What shape is shown in the video?",
    "digit": "What digit is written in the video?",
}
_KINDS = tuple(_QUESTIONS)
_BACKGROUND = 235


def _check_size(width: int, height: int) -> None:
    if width < 2 or height < 2 or width % 2 or height % 2:
        raise ValueError(f"width and height must be even and >= 2, got {width}x{height}")


def _open_writer(path: Path, codec: str, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size)
    if not writer.isOpened() and codec != "mp4v":
        warnings.warn(f"OpenCV has no {codec!r} encoder here; writing mp4v", stacklevel=3)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter cannot write {path}")
    return writer


def _write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    *,
    width: int,
    height: int,
    fps: float,
    codec: str = "mp4v",
) -> Path:
    """Write uint8 RGB `[height, width, 3]` frames; the file appears only once complete."""
    _check_size(width, height)
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = _open_writer(tmp, codec, fps, (width, height))
        try:
            for frame in frames:
                writer.write(np.ascontiguousarray(frame[..., ::-1]))
        finally:
            writer.release()
    return path


def _cell_bounds(size: int) -> np.ndarray:
    return np.round(np.linspace(0, size, _GRID + 1)).astype(int)


def index_frame(index: int, width: int, height: int) -> np.ndarray:
    """A uint8 RGB `[height, width, 3]` frame showing `index` in binary (see `read_frame_index`)."""
    frame = np.zeros((height, width, 3), np.uint8)
    rows, cols = _cell_bounds(height), _cell_bounds(width)
    for bit in range(INDEX_BITS):
        if index >> bit & 1:
            r, c = divmod(bit, _GRID)
            frame[rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = 255
    return frame


def write_index_video(
    path: str | os.PathLike,
    num_frames: int,
    *,
    width: int = 320,
    height: int = 240,
    fps: float = 24.0,
    codec: str = "mp4v",
) -> Path:
    """Write a video whose frame i shows i in binary (see `read_frame_index`)."""
    if not 1 <= num_frames <= 2**INDEX_BITS:
        raise ValueError(f"num_frames must be in [1, {2**INDEX_BITS}], got {num_frames}")
    frames = (index_frame(i, width, height) for i in range(num_frames))
    return _write_video(path, frames, width=width, height=height, fps=fps, codec=codec)


def _central_half(bounds: np.ndarray, i: int) -> slice:
    """Cell i's middle, away from the edges that compression and resizing blur."""
    margin = (bounds[i + 1] - bounds[i]) // 4
    return slice(bounds[i] + margin, bounds[i + 1] - margin)


def read_frame_index(frame: np.ndarray) -> int:
    """The index drawn by `write_index_video`, from a frame `[H, W, 3]` of any size >= 32x32.

    The frame is uint8 RGB, or float as `load_frames` returns it (mean = std = 0.5). Raises
    ValueError when a cell is neither clearly black nor clearly white: not an index frame.
    """
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected a frame [H, W, 3], got shape {frame.shape}")
    pixels = frame.astype(np.float32)
    if np.issubdtype(frame.dtype, np.floating):
        pixels = (pixels * 0.5 + 0.5) * 255.0
    height, width = frame.shape[:2]
    rows, cols = _cell_bounds(height), _cell_bounds(width)
    index = 0
    for bit in range(INDEX_BITS):
        r, c = divmod(bit, _GRID)
        level = pixels[_central_half(rows, r), _central_half(cols, c)].mean()
        if 64 < level < 192:
            raise ValueError(f"cell {bit} has mean level {level:.0f}: not an index frame")
        index |= int(level >= 192) << bit
    return index


def _haystack_frames(num_frames: int, width: int, height: int, seed: int) -> Iterator[np.ndarray]:
    """A scrolling random texture with coloured discs drifting across it, wrapping at the edges."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    texture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    scroll = rng.choice([-2, -1, 1, 2], 2)  # never still, so every frame differs
    num_discs = 4
    colours = rng.integers(0, 256, (num_discs, 3))
    radii = (rng.uniform(0.05, 0.2, num_discs) * min(width, height)).astype(int) + 1
    starts = rng.uniform(0, 1, (num_discs, 2)) * (width, height)
    velocities = rng.uniform(-4, 4, (num_discs, 2))
    for t in range(num_frames):
        frame = np.roll(texture, tuple(scroll * t), axis=(0, 1))
        centres = (starts + velocities * t) % (width, height)
        for colour, radius, centre in zip(colours, radii, centres, strict=True):
            x, y = (int(v) for v in centre)
            cv2.circle(frame, (x, y), int(radius), tuple(int(v) for v in colour), -1, cv2.LINE_AA)
        yield frame


def write_haystack_video(
    path: str | os.PathLike,
    num_frames: int,
    *,
    width: int,
    height: int,
    fps: float = 24.0,
    seed: int = 0,
    codec: str = "mp4v",
) -> Path:
    """Write a moving textured scene of any length: the haystack a needle hides in."""
    frames = _haystack_frames(num_frames, width, height, seed)
    return _write_video(path, frames, width=width, height=height, fps=fps, codec=codec)


def _draw_shape(frame: np.ndarray, shape: str, colour: tuple[int, int, int]) -> None:
    height, width = frame.shape[:2]
    half = int(0.3 * min(width, height))
    cx, cy = width // 2, height // 2
    if shape == "circle":
        cv2.circle(frame, (cx, cy), half, colour, -1, cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(frame, (cx - half, cy - half), (cx + half, cy + half), colour, -1)
    else:
        corners = np.array([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)])
        cv2.fillPoly(frame, [corners.astype(np.int32)], colour, cv2.LINE_AA)


def _draw_digit(frame: np.ndarray, digit: str) -> None:
    height, width = frame.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    (_, unit_height), _ = cv2.getTextSize(digit, font, 1.0, 2)
    scale = 0.6 * min(width, height) / unit_height
    thickness = max(2, int(scale * 2))
    (text_width, text_height), _ = cv2.getTextSize(digit, font, scale, thickness)
    origin = ((width - text_width) // 2, (height + text_height) // 2)
    cv2.putText(frame, digit, origin, font, scale, (0, 0, 0), thickness, cv2.LINE_AA)


def needle_fact(seed: int) -> dict[str, str]:
    """What `needle_frame(..., seed=seed)` shows, without drawing it.

    `{"kind": "digit", "digit": "7"}` or `{"kind": "colour" | "shape", "colour": "red",
    "shape": "circle"}`; the question's answer is `fact[fact["kind"]]`.
    """
    rng = np.random.default_rng(seed)
    kind = _KINDS[rng.integers(len(_KINDS))]
    if kind == "digit":
        return {"kind": kind, "digit": str(rng.integers(10))}
    colour = list(_COLOURS)[rng.integers(len(_COLOURS))]
    return {"kind": kind, "colour": colour, "shape": _SHAPES[rng.integers(len(_SHAPES))]}


def needle_answers(kind: str) -> tuple[str, ...]:
    """Every answer a needle of `kind` ("colour", "shape", "digit") can have: the options
    of a multiple-choice question about it."""
    return {"colour": tuple(_COLOURS), "shape": _SHAPES,
            "digit": tuple(str(d) for d in range(10))}[kind]


def needle_frame(width: int, height: int, *, seed: int) -> tuple[np.ndarray, str, str]:
    """A uint8 RGB `[height, width, 3]` frame showing one fact, and a (question, answer) about it.

    The fact is a coloured shape (asked for its colour or its shape) or a black digit, on a plain
    light-grey background; answers are one word or one digit.
    """
    fact = needle_fact(seed)
    frame = np.full((height, width, 3), _BACKGROUND, np.uint8)
    if fact["kind"] == "digit":
        _draw_digit(frame, fact["digit"])
    else:
        _draw_shape(frame, fact["shape"], _COLOURS[fact["colour"]])
    return frame, _QUESTIONS[fact["kind"]], fact[fact["kind"]]


def write_needle_video(
    path: str | os.PathLike,
    num_frames: int,
    *,
    needle_index: int,
    needle_seed: int,
    haystack_seed: int,
    width: int,
    height: int,
    fps: float = 24.0,
    needle_frames: int = 1,
    codec: str = "mp4v",
) -> tuple[str, str]:
    """Write a haystack video whose frames from `needle_index` on (`needle_frames` of them) are
    `needle_frame(..., seed=needle_seed)`; returns the needle's (question, answer)."""
    if not 0 <= needle_index <= num_frames - needle_frames:
        raise ValueError(
            f"needle_index must be in [0, {num_frames - needle_frames}] for {needle_frames} "
            f"needle frame(s) in {num_frames}, got {needle_index}"
        )
    needle, question, answer = needle_frame(width, height, seed=needle_seed)
    frames = (
        needle if needle_index <= t < needle_index + needle_frames else frame
        for t, frame in enumerate(_haystack_frames(num_frames, width, height, haystack_seed))
    )
    _write_video(path, frames, width=width, height=height, fps=fps, codec=codec)
    return question, answer


def make_needle_dataset(
    root: str | os.PathLike,
    *,
    num_videos: int,
    num_frames: int,
    depth: float,
    width: int = 320,
    height: int = 240,
    fps: float = 24.0,
    seed: int = 0,
    needle_frames: int = 1,
    codec: str = "mp4v",
) -> Path:
    """Write `num_videos` haystack videos with a needle at `depth`, and their questions.

    Writes `root/videos/needle_{i:04d}.mp4` and `root/needle.jsonl` (LLaVA conversation records,
    paths relative to `root`) and returns the JSONL path. The needle's `needle_frames` frames
    replace haystack frames from `needle_index = round(depth * (num_frames - needle_frames))`;
    each record's `needle_seed` regenerates its needle with `needle_frame`.
    """
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    if not 1 <= needle_frames <= num_frames:
        raise ValueError(
            f"needle_frames must be in [1, num_frames={num_frames}], got {needle_frames}"
        )
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    root = Path(root)
    start = round(depth * (num_frames - needle_frames))
    records = []
    for i in range(num_videos):
        haystack_seed, needle_seed = (
            int(s) for s in np.random.SeedSequence([seed, i]).generate_state(2)
        )
        name = f"needle_{i:04d}"
        video = f"videos/{name}.mp4"
        question, answer = write_needle_video(
            root / video, num_frames, needle_index=start, needle_seed=needle_seed,
            haystack_seed=haystack_seed, width=width, height=height, fps=fps,
            needle_frames=needle_frames, codec=codec,
        )
        records.append(
            {
                "id": name,
                "video": video,
                "conversations": [
                    {"from": "human", "value": "<video>\n" + question},
                    {"from": "gpt", "value": answer},
                ],
                "needle_index": start,
                "depth": depth,
                "needle_seed": needle_seed,
            }
        )
    jsonl = root / "needle.jsonl"
    with atomic_file(jsonl) as tmp:
        tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
    return jsonl


def write_bad_media(root: str | os.PathLike) -> dict[str, str]:
    """Write one file under `root` for each `MediaError` reason; returns {reason: relative path}.

    "unreadable" is an mp4 cut after 200 bytes, so its index (the moov box, written last) is
    gone. "zero_frames" is an AVI: an mp4 closed with no frames has no track and does not open.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "clip.mp4").write_text("a text file with a video's name\n")
    truncated = write_index_video(root / "truncated.mp4", 8, width=64, height=64)
    truncated.write_bytes(truncated.read_bytes()[:200])
    _write_video(root / "empty.avi", [], width=64, height=64, fps=24.0, codec="MJPG")
    write_index_video(root / "short.mp4", 3, width=64, height=64)
    return {
        "missing": "missing.mp4",
        "not_video": "clip.mp4",
        "unreadable": "truncated.mp4",
        "zero_frames": "empty.avi",
        "too_few_frames": "short.mp4",
    }
