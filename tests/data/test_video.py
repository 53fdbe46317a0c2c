"""Video decoding: exactly the sampled frames, the sampling rules, image input, bad media."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from tokenizers import Tokenizer, models

from longvila_jax.data import video
from longvila_jax.data.pipeline import SampleSpec, Source, _Load
from longvila_jax.data.synthetic import (
    index_frame,
    read_frame_index,
    write_bad_media,
    write_index_video,
)
from longvila_jax.data.video import REASONS, MediaError, load_frames, sample_indices, video_info

NATIVE_FPS = 24.0


def _even(rng, low: int, high: int) -> int:
    return 2 * int(rng.integers(low // 2, high // 2 + 1))


@pytest.fixture
def index_video(tmp_path, rng):
    """An index video of random length and resolution: (path, frame count)."""
    total = int(rng.integers(40, 301))
    width, height = _even(rng, 64, 200), _even(rng, 48, 160)
    path = write_index_video(tmp_path / "index.mp4", total, width=width, height=height)
    return path, total


@pytest.fixture
def long_video(tmp_path, rng):
    """An index video long enough that sampling a few frames seeks: (path, frame count)."""
    total = int(rng.integers(300, 600))
    path = write_index_video(tmp_path / "long.mp4", total, width=64, height=48)
    return path, total


def _indices(frames: np.ndarray) -> list[int]:
    return [read_frame_index(frame) for frame in frames]


def _fake_capture(monkeypatch, *, get=None, set_=None, grab=None):
    """Make cv2.VideoCapture misbehave: each hook takes (real capture, *args).

    The fake wraps a real capture: a Python subclass of cv2.VideoCapture crashes when collected.
    """
    real = cv2.VideoCapture
    hooks = {"get": get, "set": set_, "grab": grab}

    class Fake:
        def __init__(self, *args):
            self.real = real(*args)

        def __getattr__(self, name):
            if hooks.get(name) is None:
                return getattr(self.real, name)
            return lambda *args: hooks[name](self.real, *args)

    monkeypatch.setattr(video.cv2, "VideoCapture", Fake)


# --- exact frames -------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [64, 384])
def test_uniform_mode_returns_exactly_the_sampled_frames(index_video, rng, image_size):
    path, total = index_video
    num_frames = int(rng.integers(1, min(total, 40) + 1))
    frames = load_frames(path, num_frames, image_size=image_size)
    assert frames.shape == (num_frames, image_size, image_size, 3)
    assert frames.dtype == np.float32
    assert _indices(frames) == sample_indices(total, NATIVE_FPS, num_frames).tolist()


@pytest.mark.parametrize("image_size", [64, 384])
@pytest.mark.parametrize("fps", [0.5, 2.0, 7.0])
def test_fps_mode_returns_exactly_the_sampled_frames(index_video, rng, fps, image_size):
    path, total = index_video
    num_frames = int(rng.integers(1, 40))
    frames = load_frames(path, num_frames, image_size=image_size, fps=fps)
    expected = sample_indices(total, NATIVE_FPS, num_frames, fps).tolist()
    assert frames.shape == (len(expected), image_size, image_size, 3)
    assert _indices(frames) == expected


def test_a_long_video_is_not_decoded_frame_by_frame(long_video, rng, monkeypatch):
    path, total = long_video
    num_frames = int(rng.integers(2, 7))
    grabs = []
    _fake_capture(monkeypatch, grab=lambda cap: grabs.append(1) or cap.grab())
    frames = load_frames(path, num_frames, image_size=32)
    assert _indices(frames) == sample_indices(total, NATIVE_FPS, num_frames).tolist()
    assert len(grabs) <= num_frames * (video.SEEK_MIN_GAP + 1) < total


@pytest.mark.parametrize(
    "broken",
    [
        {"set_": lambda cap, prop, value: False},
        # A seek that lands one frame late (and says so).
        {"set_": lambda cap, prop, value: cap.set(prop, value + 1)},
        # One that lands late and reports the frame asked for, as OpenCV does on a VFR file.
        {
            "set_": lambda cap, prop, value: cap.set(prop, value + 1),
            "get": lambda cap, prop: cap.get(prop) - (prop == cv2.CAP_PROP_POS_FRAMES),
        },
    ],
    ids=["seek-fails", "seek-lands-wrong", "seek-lands-wrong-silently"],
)
def test_failed_seeks_fall_back_to_decoding_from_the_start(long_video, rng, monkeypatch, broken):
    path, total = long_video
    num_frames = int(rng.integers(2, 6))
    _fake_capture(monkeypatch, **broken)
    frames = load_frames(path, num_frames, image_size=32)
    assert _indices(frames) == sample_indices(total, NATIVE_FPS, num_frames).tolist()


def test_a_header_that_overcounts_frames(index_video, rng, monkeypatch):
    path, total = index_video
    extra = int(rng.integers(total // 2, 2 * total))
    overcount = lambda cap, prop: cap.get(prop) + extra * (prop == cv2.CAP_PROP_FRAME_COUNT)
    _fake_capture(monkeypatch, get=overcount)
    num_frames = int(rng.integers(4, 30))
    for fps in (None, NATIVE_FPS / 3):  # fps mode too: its sample times run to the end
        with pytest.raises(MediaError) as info:
            load_frames(path, num_frames, image_size=32, fps=fps)
        assert info.value.reason == "too_few_frames"


def test_a_header_without_counts_is_counted_by_decoding(index_video, rng, monkeypatch):
    path, total = index_video
    unknown = (cv2.CAP_PROP_FRAME_COUNT, cv2.CAP_PROP_FPS)
    _fake_capture(monkeypatch, get=lambda cap, prop: 0.0 if prop in unknown else cap.get(prop))
    assert video_info(path) == (total, 0.0)
    num_frames = int(rng.integers(1, 30))
    frames = load_frames(path, num_frames, image_size=32)
    assert _indices(frames) == sample_indices(total, NATIVE_FPS, num_frames).tolist()
    # Without a frame rate, fps mode goes by the frames' own timestamps.
    frames = load_frames(path, num_frames, image_size=32, fps=2.0)
    assert _indices(frames) == sample_indices(total, NATIVE_FPS, num_frames, 2.0).tolist()


def test_video_info_reads_the_container(index_video):
    path, total = index_video
    assert video_info(path) == (total, NATIVE_FPS)


# --- variable frame rate -----------------------------------------------------------------------


def _write_timed_index_video(path, durations_ms, rng, *, width=64, height=48):
    """An MPEG-4 index video whose frame i lasts `durations_ms[i]` (cv2.VideoWriter writes only
    constant rates), with noise on every frame so the file is big enough to damage (`_damage`).

    Returns each frame's presentation time and the video's duration, in seconds.
    """
    starts = np.concatenate([[0], np.cumsum(durations_ms)[:-1]]).astype(int)
    lasting = dict(zip(starts.tolist(), durations_ms, strict=True))
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=1000)  # a millisecond time base
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = 12  # keyframes every 12 frames: seeks land between them
    stream.bit_rate = 3_000_000

    def mux(packets):
        for packet in packets:
            packet.duration = lasting[packet.pts]  # else the muxer guesses the last frame's
            container.mux(packet)

    for i, start in enumerate(starts):
        noisy = index_frame(i, width, height) + rng.integers(-40, 41, (height, width, 1))
        frame = av.VideoFrame.from_ndarray(np.clip(noisy, 0, 255).astype(np.uint8), "rgb24")
        frame.pts, frame.time_base = int(start), Fraction(1, 1000)
        mux(stream.encode(frame))
    mux(stream.encode())
    container.close()
    return starts / 1000, sum(durations_ms) / 1000


# Frame durations in ms for `count` frames (even).
_RATES = {
    "alternating": lambda count, rng: [40, 80] * (count // 2),  # the clip in the issue
    "irregular": lambda count, rng: rng.choice([20, 40, 80], count).tolist(),  # screen capture
    # Steady at the average rate well past the probe, then alternating: only the checks after
    # each seek can tell.
    "late": lambda count, rng: [60] * 100 + [40, 80] * (count // 2 - 50),
}


@pytest.fixture(params=list(_RATES))
def vfr_video(request, tmp_path, rng):
    """A variable-frame-rate index video: (path, each frame's time in s, duration in s)."""
    count = 2 * int(rng.integers(260, 320))
    durations = _RATES[request.param](count, rng)
    path = tmp_path / "vfr.mp4"
    return path, *_write_timed_index_video(path, durations, rng)


def test_uniform_mode_takes_the_nth_decoded_frames_of_a_vfr_video(vfr_video):
    path, times, _ = vfr_video
    for num_frames in (3, 5, 8, 16):
        frames = load_frames(path, num_frames, image_size=384)
        expected = sample_indices(len(times), NATIVE_FPS, num_frames).tolist()
        assert _indices(frames) == expected, f"num_frames={num_frames}"


@pytest.mark.parametrize("fps", [0.5, 2.0, 7.0, 30.0])
def test_fps_mode_samples_a_vfr_video_by_presentation_time(vfr_video, rng, fps):
    path, times, duration = vfr_video
    # The frame on screen at each sample time: the last one to start at or before it.
    samples = np.arange(math.ceil(duration * fps)) / fps
    shown = np.searchsorted(times, samples[samples < duration] + 1e-9, side="right") - 1
    every = np.unique(shown)
    num_frames = int(rng.integers(1, len(every) + 5))
    # More than num_frames: thinned evenly, as sample_indices thins.
    expected = every[sample_indices(len(every), 1.0, min(num_frames, len(every)))]
    assert _indices(load_frames(path, num_frames, image_size=64, fps=fps)) == expected.tolist()


# --- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".png", ".PNG", ".bmp"])
def test_an_image_is_one_frame_resized_by_area_and_normalised(tmp_path, rng, extension):
    size = _even(rng, 16, 64)
    fy, fx = (int(f) for f in rng.integers(1, 3, 2))
    rgb = rng.integers(0, 256, (size * fy, size * fx, 3), dtype=np.uint8)
    path = tmp_path / f"photo{extension}"
    assert cv2.imwrite(str(path), rgb[..., ::-1])
    mean, std = rng.uniform(0.2, 0.8), rng.uniform(0.2, 1.0)
    frames = load_frames(path, 8, image_size=size, fps=2.0, mean=mean, std=std)
    # Shrinking by a whole factor with INTER_AREA averages fy x fx blocks (rounded to uint8).
    blocks = rgb.reshape(size, fy, size, fx, 3).mean(axis=(1, 3))
    expected = (blocks / 255 - mean) / std
    assert frames.shape == (1, size, size, 3)
    np.testing.assert_allclose(frames[0], expected, atol=0.5 / 255 / std + 1e-5, rtol=0)


def test_a_small_image_is_enlarged_without_cropping(tmp_path, rng):
    left, right = rng.integers(0, 256, (2, 3))
    rgb = np.empty((8, 12, 3), np.uint8)
    rgb[:, :6], rgb[:, 6:] = left, right
    path = tmp_path / "tiny.webp"
    assert cv2.imwrite(str(path), rgb[..., ::-1], [cv2.IMWRITE_WEBP_QUALITY, 101])  # lossless
    frame = load_frames(path, 1, image_size=48)[0]
    # Each half of the source fills half of the square output; away from the seam it is exact.
    np.testing.assert_allclose(
        frame[:, :16], np.broadcast_to(left / 127.5 - 1, (48, 16, 3)), atol=1e-6
    )
    np.testing.assert_allclose(
        frame[:, 32:], np.broadcast_to(right / 127.5 - 1, (48, 16, 3)), atol=1e-6
    )


# --- bad media ----------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", REASONS)
def test_each_bad_medium_raises_its_reason(tmp_path, reason):
    paths = write_bad_media(tmp_path)
    path = tmp_path / paths[reason]
    with pytest.raises(MediaError) as info:
        load_frames(path, 8, image_size=32)
    err = info.value
    assert (err.path, err.reason) == (str(path), reason)
    assert str(err) == f"{path}: {reason}: {err.detail}"
    assert err.detail and "\n" not in str(err)


def test_fps_mode_takes_what_a_short_video_has(tmp_path):
    paths = write_bad_media(tmp_path)
    frames = load_frames(tmp_path / paths["too_few_frames"], 8, image_size=32, fps=NATIVE_FPS)
    assert _indices(frames) == [0, 1, 2]


def _directory(tmp_path):
    return tmp_path


def _text_named_jpg(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("not an image")
    return path


def _broken_png(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return path


def _zeroed_mp4(tmp_path):
    """An mp4 whose container is intact and lists frames, but whose payload is all zeros."""
    path = write_index_video(tmp_path / "zeroed.mp4", 20, width=64, height=64)
    data = bytearray(path.read_bytes())
    start, end = data.find(b"mdat") + 4, data.find(b"moov") - 4
    data[start:end] = bytes(end - start)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, reason",
    [
        (_directory, "not_video"),
        (_text_named_jpg, "not_video"),
        (_broken_png, "unreadable"),
        (_zeroed_mp4, "unreadable"),
    ],
)
def test_other_bad_inputs(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(MediaError) as info:
        load_frames(path, 4, image_size=32)
    assert info.value.reason == reason


def test_media_error_survives_pickling():
    err = MediaError("/data/a.mp4", "zero_frames", "no frames")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, back.detail, str(back)) == (
        err.path,
        err.reason,
        err.detail,
        str(err),
    )
    with pytest.raises(ValueError, match="reason"):
        MediaError("/data/a.mp4", "broken", "no such reason")


def _damage(path, rng):
    """Overwrite 64 KiB in the middle of a file with random bytes: decoding stops there."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 2**15 : middle + 2**15] = rng.bytes(2**16)
    path.write_bytes(data)


@pytest.mark.parametrize("rate", ["constant", "alternating"])  # on the grid, and off it
def test_a_file_damaged_midway_raises_too_few_frames_in_both_modes(tmp_path, rng, rate):
    count = 2 * int(rng.integers(260, 320))
    durations = [40] * count if rate == "constant" else _RATES[rate](count, rng)
    path = tmp_path / "damaged.mp4"
    _write_timed_index_video(path, durations, rng)
    _damage(path, rng)
    # Every frame (uniform) or every sample time (fps), so some are past the damage.
    for num_frames, fps in [(count, None), (10**6, 2.0)]:
        with pytest.raises(MediaError) as info:
            load_frames(path, num_frames, image_size=32, fps=fps)
        assert info.value.reason == "too_few_frames"


def test_bad_media_prints_nothing_of_ffmpeg_or_opencv(tmp_path, rng):
    """Decoding bad files in a fresh process (as a spawned grain worker starts) leaves stdout and
    stderr empty: the MediaError is the only report."""
    bad = [str(tmp_path / path) for path in write_bad_media(tmp_path).values()]
    damaged = tmp_path / "damaged.mp4"
    _write_timed_index_video(damaged, [40, 80] * 150, rng)
    _damage(damaged, rng)
    script = (
        "import sys\n"
        "from longvila_jax.data.video import MediaError, load_frames\n"
        "for path in sys.argv[1:]:\n"
        "    for fps in (None, 2.0):\n"
        "        try:\n"
        "            load_frames(path, 8, image_size=32, fps=fps)\n"
        "        except MediaError:\n"
        "            pass\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    result = subprocess.run([sys.executable, "-c", script, str(damaged), *bad], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")


def test_the_pipeline_decodes_a_bad_file_once_and_skips_it_every_epoch(tmp_path, monkeypatch):
    # Here rather than in test_pipeline.py: `_Load` is the pipeline's one call into this module.
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "<image>": 1}, unk_token="[UNK]"))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    spec = SampleSpec(family="qwen2", media_token_id=1, tokens_per_frame=2, num_frames=4,
                      image_size=32)
    load = _Load([Source("bad", str(tmp_path / "bad.jsonl"), str(tmp_path))], spec,
                 str(tmp_path / "tokenizer.json"))
    bad = write_bad_media(tmp_path)
    records = [
        {"video": path, "conversations": [{"from": "human", "value": "<video>\nWhat?"},
                                          {"from": "gpt", "value": "x"}]}
        for path in bad.values()
    ]
    opened = []
    real = cv2.VideoCapture
    monkeypatch.setattr(video.cv2, "VideoCapture", lambda *args: opened.append(args) or real(*args))

    def markers():
        ids = np.zeros((1, 5), np.int64)  # source 0
        return [{k: v for k, v in load.map((ids, record)).items() if k != "sample_ids"}
                for record in records]

    first = markers()
    assert [marker["message"].split(": ")[1] for marker in first] == list(bad)
    assert opened
    opened.clear()
    for _ in range(2):  # later epochs: the same skip markers (so counted again), nothing opened
        assert markers() == first
    assert opened == []


# --- sample_indices -----------------------------------------------------------------------------


def test_uniform_indices_take_the_centre_of_equal_segments(rng):
    for _ in range(300):
        total = int(rng.integers(1, 5000))
        num = int(rng.integers(1, total + 1))
        idx = sample_indices(total, rng.uniform(1, 60), num)
        assert idx.dtype == np.int64 and len(idx) == num
        assert np.all(np.diff(idx) > 0)
        centres = (np.arange(num) + 0.5) * total / num
        assert np.all((idx <= centres) & (centres < idx + 1))


def test_uniform_indices_repeat_frames_only_when_asked_for_more_than_exist(rng):
    total = int(rng.integers(1, 20))
    idx = sample_indices(total, NATIVE_FPS, total + int(rng.integers(1, 50)))
    assert np.all(np.diff(idx) >= 0)
    assert set(idx.tolist()) == set(range(total))


def test_fps_indices_step_through_time(rng):
    for _ in range(300):
        native = rng.uniform(5, 60)
        fps = rng.uniform(0.1, native)
        total = int(rng.integers(1, 3000))
        idx = sample_indices(total, native, 10**9, fps)
        assert idx[0] == 0 and idx[-1] < total and np.all(np.diff(idx) > 0)
        # Samples every 1/fps seconds, up to frame rounding, and none missing at the end.
        np.testing.assert_allclose(np.diff(idx) / native, 1 / fps, atol=1.01 / native)
        assert (idx[-1] + 1) / native + 1 / fps >= total / native - 1e-9
        expected = total * fps / native
        assert math.floor(expected) <= len(idx) <= math.ceil(expected)


def test_fps_indices_are_thinned_evenly_to_num_frames(rng):
    for _ in range(300):
        native, total = rng.uniform(5, 60), int(rng.integers(1, 3000))
        fps = rng.uniform(0.1, 2 * native)
        every = sample_indices(total, native, 10**9, fps)
        num = int(rng.integers(1, 2 * len(every) + 1))
        idx = sample_indices(total, native, num, fps)
        if num >= len(every):
            np.testing.assert_array_equal(idx, every)
            continue
        assert len(idx) == num
        positions = np.searchsorted(every, idx)
        np.testing.assert_array_equal(every[positions], idx)
        np.testing.assert_array_equal(positions, sample_indices(len(every), 1.0, num))


def test_fps_indices_by_hand():
    np.testing.assert_array_equal(sample_indices(240, 24.0, 100, 2.0), np.arange(0, 240, 12))
    np.testing.assert_array_equal(sample_indices(240, 24.0, 5, 2.0), [24, 72, 120, 168, 216])
    np.testing.assert_array_equal(sample_indices(10, 24.0, 100, 60.0), np.arange(10))
    np.testing.assert_array_equal(sample_indices(30, 30.0, 100, 1.0), [0])
    # 30 frames at 29.97 fps last 1.001 s, so a sample at t = 1 s (frame 29) exists.
    np.testing.assert_array_equal(sample_indices(30, 29.97, 100, 1.0), [0, 29])


@pytest.mark.parametrize(
    "args, name",
    [
        ((0, 24.0, 8), "total_frames"),
        ((10, 24.0, 0), "num_frames"),
        ((10, 24.0, 8, 0.0), "fps"),
        ((10, 24.0, 8, -2.0), "fps"),
        ((10, 24.0, 8, math.nan), "fps"),
        ((10, 0.0, 8, 2.0), "native_fps"),
        ((10, math.inf, 8, 2.0), "native_fps"),
    ],
)
def test_sample_indices_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        sample_indices(*args)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"num_frames": 0}, "num_frames"), ({"image_size": 0}, "image_size"), ({"std": 0.0}, "std")],
)
def test_load_frames_rejects_bad_arguments(index_video, kwargs, name):
    path, _ = index_video
    with pytest.raises(ValueError, match=f"^{name} "):
        load_frames(path, **{"num_frames": 4, "image_size": 32, **kwargs})
