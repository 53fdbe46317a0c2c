"""Video decoding throughput of the data pipeline's loader, per worker process.

Writes synthetic haystack clips at 480p and 720p (`data/synthetic.py`, MPEG-4 Part 2:
OpenCV's pip wheels cannot encode H.264) and re-encodes them to H.264 with PyAV's libx264
(the `av` package, in the dev extras), since H.264 is what real datasets hold and costs
more to decode. Then times `video.load_frames` sampling 8, 64 and 256 frames uniformly over
each clip at the tower's input size. One process = one grain worker: rates are per worker.

  python bench/data.py [--seconds 60] [--fps 30] [--image-size 384] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import cv2
import numpy as np

from longvila_jax.data.synthetic import write_haystack_video
from longvila_jax.data.video import load_frames

SIZES = {"480p": (854, 480), "720p": (1280, 720)}


def to_h264(src: str, dst: str, fps: float) -> str:
    """Re-encode `src` as H.264 (libx264, yuv420p) with PyAV."""
    import av  # dev extra: only this benchmark needs an H.264 encoder

    cap = cv2.VideoCapture(src)
    with av.open(dst, "w") as out:
        stream = None
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if stream is None:
                stream = out.add_stream("libx264", rate=round(fps))
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        out.mux(stream.encode())
    cap.release()
    return dst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--frames", default="8,64,256")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    print(f"{'clip':>11} {'frames':>6} {'s/sample':>9} {'frames/s':>9} {'samples/s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        clips = {}
        for size, (width, height) in SIZES.items():
            mpeg4 = write_haystack_video(os.path.join(tmp, f"{size}.mp4"),
                                         int(args.seconds * args.fps), width=width,
                                         height=height, fps=args.fps, seed=0)
            clips[f"{size} h264"] = to_h264(str(mpeg4), os.path.join(tmp, f"{size}_h264.mp4"),
                                            args.fps)
            clips[f"{size} mpeg4"] = str(mpeg4)
        for name, path in clips.items():
            for count in (int(n) for n in args.frames.split(",")):
                load_frames(path, count, image_size=args.image_size)  # warm the file cache
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    load_frames(path, count, image_size=args.image_size)
                    times.append(time.perf_counter() - start)
                t = float(np.median(times))
                rows.append(dict(clip=name, frames=count, seconds_per_sample=t,
                                 frames_per_s=count / t, samples_per_s=1 / t))
                print(f"{name:>11} {count:>6} {t:9.3f} {count / t:9.1f} {1 / t:10.2f}",
                      flush=True)
    meta = dict(opencv=cv2.__version__, cpu=platform.processor() or platform.machine(),
                python=platform.python_version(), date=time.strftime("%Y-%m-%d"),
                clip_seconds=args.seconds, clip_fps=args.fps, image_size=args.image_size)
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
