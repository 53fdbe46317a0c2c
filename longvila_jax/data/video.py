"""Video and image decoding with OpenCV, from a file path to normalised frames for the vision tower.

This runs inside grain worker processes, so it is plain numpy and cv2 (no jax), and it returns
float32 `[frames, size, size, 3]` RGB arrays normalised as `(x / 255 - mean) / std`.

Frame n of a video is the one that decodes after n others, whatever its timestamp. Frames are
chosen before anything is decoded (`sample_indices`), so a long video costs only the frames it
contributes: the reader seeks across long gaps and `grab()`s (decodes without colour conversion)
across short ones, and resizes each kept frame as soon as it is read, so memory holds the output
and one source frame, never the whole video.

Seeking is the fragile part. OpenCV seeks by time: it turns frame n into the time n / fps (fps
being the container's average rate), jumps to the keyframe before that, and counts frames on
from the keyframe's timestamp times fps. That finds frame n only where every frame sits at
t0 + k / fps. On a variable-frame-rate file (phone and screen recordings) it finds another frame,
and OpenCV still reports position n. So the reader seeks only on a stream that keeps to that
constant-rate grid: it decodes the first `PROBE_FRAMES` frames before any seek, and checks the
timestamp of every frame it decodes (before and after each seek, and the frame after each one
it keeps) against the grid, to within `GRID_SLACK_MS`. A frame off the grid, a failed seek, or a
read failing after a seek make it start again from the first frame and decode forward without
seeking, counting frames itself: exact on any stream, and slow only on the files that need it.
The check sees only the frames the reader decodes: a stream on the grid at every one of those,
whose frames are held or dropped by whole periods only in between, can still mislead a seek
(OpenCV exposes no frame table to check against).

fps mode samples presentation time: it takes the frame on screen at 0, 1 / fps, 2 / fps, ...
seconds. On the grid that is a frame index computed from the rate; off it, one decoding pass
reads every frame's timestamp first.

Container headers also lie about frame counts. Decoding that ends before a frame the sampling
needs (uniform), or before a sample time (fps), raises `too_few_frames`; it is never papered
over with repeated or missing frames.

Every bad input raises `MediaError` with one reason from `REASONS`, so a pipeline can count and
skip bad samples by cause instead of losing a worker to a cv2 traceback. FFmpeg's and OpenCV's
own lines about a broken file are silenced (`_silence_decoder_logs`), so that error is the only
report of it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator

import cv2
import numpy as np

REASONS = ("missing", "not_video", "unreadable", "zero_frames", "too_few_frames")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Across a shorter gap, grabbing forward beats a seek, which decodes from a keyframe anyway.
SEEK_MIN_GAP = 32
# Frames decoded from the start before the first seek: enough to show the irregular cadence of a
# phone or a screen recorder before the constant-rate grid is trusted.
PROBE_FRAMES = 16
# A constant-rate stream's timestamps sit on the grid to within their rounding, half a
# millisecond at worst (containers counting in milliseconds); a frame further off is off the grid.
GRID_SLACK_MS = 1.0

# mp4/mov boxes that open a file at offset 4; other signatures open it at offset 0.
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free")
_SIGNATURES = (
    b"RIFF",  # avi, webp
    b"\x1a\x45\xdf\xa3",  # mkv, webm (EBML)
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # jpeg
    b"BM",  # bmp
)


class MediaError(Exception):
    """A media file that cannot give the frames asked for; `reason` is one of `REASONS`."""

    def __init__(self, path: str, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown MediaError reason {reason!r} (expected one of {REASONS})")
        # All three go to Exception so the error pickles back intact from a grain worker.
        super().__init__(path, reason, detail)
        self.path, self.reason, self.detail = path, reason, detail

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}: {self.detail}"


def _require_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")


def _spread(count: int, num: int) -> np.ndarray:
    """`num` positions in `range(count)`: the ones holding the centres of `num` equal segments."""
    return np.floor((np.arange(num) + 0.5) * count / num).astype(np.int64)


def _on_screen(times: np.ndarray, duration: float, num_frames: int, fps: float) -> np.ndarray:
    """Sorted indices of the frames on screen at 0, 1 / fps, 2 / fps, ... seconds before
    `duration`, each once, thinned evenly to `num_frames` when there are more.

    `times`: each frame's presentation time in seconds, increasing from 0. A frame is on screen
    from its time until the next frame's (the last one until `duration`).
    """
    # Sample k is in frame i when starts[i] <= k < ends[i], counted in sample steps. The epsilon
    # (a millionth of a frame) keeps a sample at exactly a frame's time in that frame.
    eps = 1e-6 * fps * duration / len(times)
    starts = times * fps - eps
    ends = np.append(times[1:], duration) * fps - eps
    candidates = np.flatnonzero(np.ceil(starts) < ends)
    if len(candidates) > num_frames:
        candidates = candidates[_spread(len(candidates), num_frames)]
    return candidates


def sample_indices(
    total_frames: int, native_fps: float, num_frames: int, fps: float | None = None
) -> np.ndarray:
    """Sorted int64 indices of the frames to keep from a constant-rate video of `total_frames`.

    With `fps=None`, `num_frames` frames spread uniformly over the whole video (the frame under
    the centre of each of `num_frames` equal segments). With `fps`, the frame on screen every
    `1 / fps` seconds from the start (frame i showing from `i / native_fps`), thinned evenly to
    `num_frames` when there are more. Indices are unique unless more frames are asked than exist.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames!r}")
    if fps is None:
        return _spread(total_frames, num_frames)
    _require_positive("fps", fps)
    _require_positive("native_fps", native_fps)
    times = np.arange(total_frames) / native_fps
    return _on_screen(times, total_frames / native_fps, num_frames, fps)


def _known_rate(fps: float) -> bool:
    return math.isfinite(fps) and fps > 0


def _looks_like_media(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    return head[4:8] in _MP4_BOXES or head.startswith(_SIGNATURES)


def _undecodable(path: str, detail: str) -> MediaError:
    """The error for a file OpenCV cannot read: corrupt media, or not media at all."""
    if _looks_like_media(path):
        return MediaError(path, "unreadable", detail)
    return MediaError(path, "not_video", f"{detail}; no known image or video signature")


def _to_model_input(bgr: np.ndarray, image_size: int, mean: float, std: float) -> np.ndarray:
    """One uint8 BGR frame -> float32 `[image_size, image_size, 3]` RGB, normalised."""
    height, width = bgr.shape[:2]
    enlarging = image_size > height and image_size > width
    interpolation = cv2.INTER_CUBIC if enlarging else cv2.INTER_AREA
    resized = cv2.resize(bgr, (image_size, image_size), interpolation=interpolation)
    rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
    return (rgb.astype(np.float32) / 255.0 - mean) / std


def frame_to_model_input(
    rgb: np.ndarray, *, image_size: int, mean: float = 0.5, std: float = 0.5
) -> np.ndarray:
    """One uint8 RGB `[H, W, 3]` frame -> float32 `[image_size, image_size, 3]`, prepared
    exactly as `load_frames` prepares a decoded frame (for frames made in memory)."""
    return _to_model_input(np.ascontiguousarray(rgb[..., ::-1]), image_size, mean, std)


def _silence_decoder_logs() -> None:
    """Keep FFmpeg's and OpenCV's own lines about broken media off the terminal: the
    `MediaError` reports each file once, where a run over bad files printed thousands of lines.

    OpenCV reads `OPENCV_FFMPEG_LOGLEVEL` anew at every capture it opens, so setting it in the
    environment covers this process and every worker process it starts, forked or spawned.
    OpenCV reads `OPENCV_LOG_LEVEL` once, when it starts: this process's OpenCV has started and
    is told directly, spawned workers read the environment. A level already set in the
    environment (to debug a file) is kept.
    """
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    if "OPENCV_LOG_LEVEL" not in os.environ:
        os.environ["OPENCV_LOG_LEVEL"] = "SILENT"
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


_silence_decoder_logs()


@contextlib.contextmanager
def _capture(path: str) -> Iterator[cv2.VideoCapture]:
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise _undecodable(path, "OpenCV cannot open it as a video")
        yield cap
    finally:
        cap.release()


def _timestamps(path: str) -> np.ndarray:
    """Presentation time (seconds) of each frame that decodes, in order, by decoding (not
    converting) them all."""
    times = []
    with _capture(path) as cap:
        while cap.grab():
            times.append(cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
    return np.asarray(times)


class _Grid:
    """Where a constant-rate stream shows frame i: at the first frame's time + i / fps."""

    def __init__(self, fps: float):
        self._period = 1000.0 / fps
        self._slack = min(GRID_SLACK_MS, self._period / 4)
        self._origin: float | None = None

    def holds(self, cap: cv2.VideoCapture, index: int) -> bool:
        """Whether frame `index`, just decoded by `cap`, is where the grid puts it (the first
        call is for frame 0: reading starts at the first frame)."""
        ms = cap.get(cv2.CAP_PROP_POS_MSEC)
        if self._origin is None:
            self._origin = ms
        return abs(ms - self._origin - index * self._period) <= self._slack


def _read(
    cap: cv2.VideoCapture, indices: np.ndarray, keep: Callable[[int, np.ndarray], None],
    grid: _Grid | None,
) -> int | None:
    """Decode the frames at sorted unique `indices` from a capture at frame 0, in order, calling
    `keep(n, frame)` for each; returns how many were read before the stream ended.

    Without a grid every frame is decoded: exact on any stream. With one, gaps longer than
    `SEEK_MIN_GAP` are crossed by seeking once `PROBE_FRAMES` frames have decoded, and every
    frame decoded must be on the grid, the one after each kept frame included (its start ends
    the kept frame's time on screen, which fps mode's samples rely on). Returns None when one is
    not, a seek fails, or the stream ends after a seek: the frames kept are then not known to be
    the ones named, nor the end real.
    """
    position = 0  # the index of the frame the next grab() decodes
    seeked = False
    for n, index in enumerate(indices):
        while position <= index:
            if grid is not None and position >= PROBE_FRAMES and index - position > SEEK_MIN_GAP:
                if not cap.set(cv2.CAP_PROP_POS_FRAMES, int(index)):
                    return None
                position, seeked = int(index), True
            if not cap.grab():
                return None if seeked else n
            if grid is not None and not grid.holds(cap, position):
                return None
            position += 1
        ok, frame = cap.retrieve()
        if not ok:
            return None if seeked else n
        keep(n, frame)
        if grid is not None and cap.grab():  # the next frame, when there is one
            if not grid.holds(cap, position):
                return None
            position += 1
    return len(indices)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise MediaError(path, "missing", "no such file")
    if not os.path.isfile(path):
        raise MediaError(path, "not_video", "not a regular file")


def _header(path: str, cap: cv2.VideoCapture) -> tuple[int, float]:
    """(frame count, fps) from an open capture; the count by decoding when the container gives
    none, the rate 0.0 when unknown."""
    total = round(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if total <= 0:
        total = len(_timestamps(path))
    return total, cap.get(cv2.CAP_PROP_FPS)


def video_info(path: str | os.PathLike) -> tuple[int, float]:
    """(frame count, frames per second) of a video as its container states them."""
    path = os.fspath(path)
    _check_file(path)
    with _capture(path) as cap:
        return _header(path, cap)


def _timed_indices(
    path: str, total: int, native_fps: float, num_frames: int, fps: float
) -> np.ndarray:
    """fps mode's indices from the frames' own timestamps, for a stream off the grid.

    The video lasts `total / native_fps`, or, without a rate in the container, as long as its
    timestamps say. A stream whose timestamps do not increase has none to use: its frames are
    then taken as evenly spaced, one sample step apart when there is no rate either.
    """
    times = _timestamps(path)
    if len(times) == 0:
        raise _undecodable(path, f"the container lists {total} frames but none decodes")
    times -= times[0]
    increasing = bool(np.all(np.diff(times) > 0))
    if not _known_rate(native_fps):
        native_fps = (len(times) - 1) / times[-1] if increasing and len(times) > 1 else fps
    if not increasing:
        times = np.arange(len(times)) / native_fps
    duration = total / native_fps
    # Decoding stopped early: the frame on screen after the last one that decoded is unknown.
    after_last = (math.floor(times[-1] * fps + 1e-6) + 1) / fps
    if len(times) < total and after_last < duration:
        raise MediaError(path, "too_few_frames", f"decoding stopped after {len(times)} of "
                         f"{total} frames, before the sample at {after_last:.3f} s")
    return _on_screen(times, duration, num_frames, fps)


def _decode(
    cap: cv2.VideoCapture, indices: np.ndarray, grid: _Grid | None, image_size: int,
    mean: float, std: float,
) -> tuple[np.ndarray, int | None]:
    """`_read` into a float32 `[len(indices), image_size, image_size, 3]` array."""
    out = np.empty((len(indices), image_size, image_size, 3), np.float32)

    def keep(n: int, frame: np.ndarray) -> None:
        out[n] = _to_model_input(frame, image_size, mean, std)

    return out, _read(cap, indices, keep, grid)


def _load_video(
    path: str, num_frames: int, fps: float | None, image_size: int, mean: float, std: float
) -> np.ndarray:
    # One capture serves the header and the first decoding pass (each open parses the
    # container's index again).
    with _capture(path) as cap:
        total, native_fps = _header(path, cap)
        if total == 0:
            raise MediaError(path, "zero_frames", "the video opens but holds no frames")
        if fps is None and total < num_frames:
            raise MediaError(path, "too_few_frames", f"{total} frames, {num_frames} requested")
        read = None
        if _known_rate(native_fps):
            indices = sample_indices(total, native_fps, num_frames, fps)
            out, read = _decode(cap, indices, _Grid(native_fps), image_size, mean, std)
    if read is None:
        # Off the constant-rate grid, or no rate to draw one: count frames from the first.
        if fps is None:
            indices = sample_indices(total, native_fps, num_frames)
        else:
            indices = _timed_indices(path, total, native_fps, num_frames, fps)
        with _capture(path) as cap:
            out, read = _decode(cap, indices, None, image_size, mean, std)
    if read == 0:
        raise _undecodable(path, f"the container lists {total} frames but none decodes")
    if read < len(indices):
        raise MediaError(
            path, "too_few_frames", f"decoding stopped before frame {indices[read]} of {total}"
        )
    return out


def load_frames(
    path: str | os.PathLike,
    num_frames: int,
    *,
    image_size: int,
    fps: float | None = None,
    mean: float = 0.5,
    std: float = 0.5,
) -> np.ndarray:
    """Decode a video (or an image, as one frame) to float32 `[F, image_size, image_size, 3]`.

    Frames are picked as `sample_indices` picks them, by the frames' own timestamps on a
    variable-frame-rate video: F = `num_frames` with `fps=None`; with `fps`, at most
    `num_frames`. Frames are resized to a square without cropping and normalised as
    `(x / 255 - mean) / std`. Raises `MediaError` for any file that cannot give them.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size!r}")
    _require_positive("std", std)
    path = os.fspath(path)
    _check_file(path)
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return _load_video(path, num_frames, fps, image_size, mean, std)
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise _undecodable(path, "OpenCV cannot decode it as an image")
    return _to_model_input(image, image_size, mean, std)[None]
