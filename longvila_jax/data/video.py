"""Video and image decoding with OpenCV, from a file path to normalised frames for the vision tower.

This runs inside grain worker processes, so it is plain numpy and cv2 (no jax), and it returns
float32 `[frames, size, size, 3]` RGB arrays normalised as `(x / 255 - mean) / std`.

Frames are chosen before anything is decoded (`sample_indices`), so a long video costs only the
frames it contributes: the reader seeks across long gaps and `grab()`s (decodes without colour
conversion) across short ones, and resizes each kept frame as soon as it is read, so memory holds
the output and one source frame, never the whole video.

Seeking is the fragile part. OpenCV seeks to the keyframe before the target and walks forward by
timestamps, which can miss or fail on badly muxed or variable-frame-rate files, while decoding
every frame from the start is exact but slow. So the reader seeks optimistically, checks the
position OpenCV reports after each seek, and if a seek or a read after one fails, decodes the
frames not yet read again from the start without seeking. Container headers also lie about frame
counts; running out of frames early is reported, never papered over with repeated frames.

Every bad input raises `MediaError` with one reason from `REASONS`, so a pipeline can count and
skip bad samples by cause instead of losing a worker to a cv2 traceback.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import cv2
import numpy as np

REASONS = ("missing", "not_video", "unreadable", "zero_frames", "too_few_frames")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Across a shorter gap, grabbing forward beats a seek, which decodes from a keyframe anyway.
SEEK_MIN_GAP = 32

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


def sample_indices(
    total_frames: int, native_fps: float, num_frames: int, fps: float | None = None
) -> np.ndarray:
    """Sorted int64 indices of the frames to keep from a video of `total_frames` frames.

    With `fps=None`, `num_frames` frames spread uniformly over the whole video (the frame under
    the centre of each of `num_frames` equal segments). With `fps`, one frame every `1 / fps`
    seconds from the start (`native_fps` converts seconds to frames), thinned evenly to
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
    # Frames per sample; below one frame every frame is a sample, so cap the candidate count.
    step = max(native_fps / fps, 1.0)
    # The epsilon keeps k * step from landing just under an exact integer.
    candidates = np.floor(np.arange(math.ceil(total_frames / step)) * step + 1e-6)
    candidates = np.unique(candidates[candidates < total_frames].astype(np.int64))
    if len(candidates) > num_frames:
        candidates = candidates[_spread(len(candidates), num_frames)]
    return candidates


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


def _open(path: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise _undecodable(path, "OpenCV cannot open it as a video")
    return cap


def _count_by_decoding(path: str) -> int:
    """Frames in a video whose container does not say, by decoding (not converting) them all."""
    cap = _open(path)
    count = 0
    while cap.grab():
        count += 1
    cap.release()
    return count


def _read(
    cap: cv2.VideoCapture, indices: np.ndarray, keep: Callable[[int, np.ndarray], None], *,
    seek: bool,
) -> tuple[int, bool]:
    """Decode the frames at sorted unique `indices` from a capture at frame 0, in order,
    calling `keep(n, frame)` for each.

    Returns how many indices were read before the video ended or failed, and whether a seek may
    be to blame for stopping early.
    """
    position = 0  # the frame the next grab() returns
    seeked = False
    for n, index in enumerate(indices):
        if seek and index - position > SEEK_MIN_GAP:
            seeked = True
            if not cap.set(cv2.CAP_PROP_POS_FRAMES, int(index)):
                return n, True
            if round(cap.get(cv2.CAP_PROP_POS_FRAMES)) != index:
                return n, True
            position = int(index)
        while position <= index:
            if not cap.grab():
                return n, seeked
            position += 1
        ok, frame = cap.retrieve()
        if not ok:
            return n, seeked
        keep(n, frame)
    return len(indices), False


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
        total = _count_by_decoding(path)
    return total, cap.get(cv2.CAP_PROP_FPS)


def video_info(path: str | os.PathLike) -> tuple[int, float]:
    """(frame count, frames per second) of a video as its container states them."""
    path = os.fspath(path)
    _check_file(path)
    cap = _open(path)
    try:
        return _header(path, cap)
    finally:
        cap.release()


def _load_video(
    path: str, num_frames: int, fps: float | None, image_size: int, mean: float, std: float
) -> np.ndarray:
    # One capture serves the header and the first decoding pass (each open parses the
    # container's index again).
    cap = _open(path)
    try:
        total, native_fps = _header(path, cap)
        if total == 0:
            raise MediaError(path, "zero_frames", "the video opens but holds no frames")
        if fps is None and total < num_frames:
            raise MediaError(path, "too_few_frames", f"{total} frames, {num_frames} requested")
        if fps is not None and not (math.isfinite(native_fps) and native_fps > 0):
            native_fps = fps  # no frame rate in the container: every frame is one sample step
        indices = sample_indices(total, native_fps, num_frames, fps)
        out = np.empty((len(indices), image_size, image_size, 3), np.float32)

        def keep(n: int, frame: np.ndarray) -> None:
            out[n] = _to_model_input(frame, image_size, mean, std)

        read, seek_suspect = _read(cap, indices, keep, seek=True)
    finally:
        cap.release()
    if seek_suspect:
        retry = _open(path)
        try:
            more, _ = _read(retry, indices[read:], lambda n, f: keep(read + n, f), seek=False)
        finally:
            retry.release()
        read += more
    if read == 0:
        raise _undecodable(path, f"the container lists {total} frames but none decodes")
    if read < len(indices) and fps is None:
        raise MediaError(
            path, "too_few_frames", f"decoding stopped before frame {indices[read]} of {total}"
        )
    return out[:read]


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

    Frames are picked by `sample_indices`: F = `num_frames` with `fps=None`; with `fps`, at most
    `num_frames`, and fewer when the video ends before the container said it would. Frames are
    resized to a square without cropping and normalised as `(x / 255 - mean) / std`.
    Raises `MediaError` for any file that cannot give them.
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
