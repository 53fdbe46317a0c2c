"""Video embeddings computed once and reused: in memory, and on disk across runs.

Encoding is the vision tower and projector over every frame, the part of a long-video
prompt that does not depend on the question; LongVILA-R1's MR-SP caches it so that many
samples and log-prob passes over one video pay for it once. The key is a content hash of
what decides the embeddings: the video file (resolved path, size, modification time), the
sampling (frame count, frame rate, image size) and the model (a hash of the vision tower,
projector and newline-embedding parameters), so an edited video or another checkpoint
never reads a stale entry.

On disk an entry is one `.npz` (written to a temp name, then renamed) holding the
embeddings as raw bits plus their dtype name, since numpy has no bfloat16.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from flax import nnx

from longvila_jax.atomic import atomic_file
from longvila_jax.data.video import load_frames
from longvila_jax.infer.engine import InferenceEngine
from longvila_jax.models.longvila import LongVILA


def model_fingerprint(model: LongVILA) -> str:
    """SHA-256 over the parameters that map frames to embeddings (tower, projector, and the
    newline token's embedding row), in path order."""
    digest = hashlib.sha256()
    parts = {"vision_tower": model.vision_tower, "projector": model.projector}
    for name, module in parts.items():
        for path, value in sorted(nnx.to_flat_state(nnx.state(module, nnx.Param))):
            digest.update(f"{name}/{'/'.join(map(str, path))}".encode())
            digest.update(np.ascontiguousarray(np.asarray(value[...])).tobytes())
    if model.newline_token_id is not None:
        row = np.asarray(model.llm.embed_tokens[...][model.newline_token_id])
        digest.update(row.tobytes())
    return digest.hexdigest()


class VideoEmbeddingCache:
    """`get(video, num_frames, fps)` -> embeddings `[F, media_tokens_per_frame, hidden]`.

    Misses are decoded with OpenCV (`load_frames`) and encoded by `engine` with the frames
    spread over its devices. Up to `memory_entries` results stay on device; with
    `directory`, every result is also kept there as `<key>.npz` and read back by later
    runs. `hits`/`misses` count where results came from (memory, disk, or encoding).
    """

    def __init__(self, engine: InferenceEngine, model: LongVILA, *,
                 directory: str | os.PathLike | None = None, memory_entries: int = 8):
        if model.vision_tower is None:
            raise ValueError("VideoEmbeddingCache: the model has no vision tower")
        self.engine = engine
        self.image_size = model.vision_tower.image_size
        self.fingerprint = model_fingerprint(model)
        self.directory = None if directory is None else Path(directory)
        self.memory_entries = memory_entries
        self._memory: OrderedDict[str, jax.Array] = OrderedDict()
        self.hits = {"memory": 0, "disk": 0}
        self.misses = 0

    def key(self, video: str | os.PathLike, num_frames: int, fps: float | None) -> str:
        """The entry's content hash (see the module docstring)."""
        path = Path(video).resolve()
        stat = path.stat()
        description = {
            "video": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "num_frames": int(num_frames), "fps": fps, "image_size": self.image_size,
            "model": self.fingerprint,
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()

    def get(self, video: str | os.PathLike, num_frames: int, fps: float | None = None):
        """The video's embeddings, `num_frames` frames sampled evenly (with `fps`: at that
        rate, at most `num_frames`)."""
        if not Path(video).is_file():
            raise FileNotFoundError(f"{video}: no such video file")
        key = self.key(video, num_frames, fps)
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits["memory"] += 1
            return self._memory[key]
        embeddings = self._read(key)
        if embeddings is not None:
            self.hits["disk"] += 1
        else:
            self.misses += 1
            frames = load_frames(video, num_frames, image_size=self.image_size, fps=fps)
            embeddings = self.engine.encode(frames)
            self._write(key, embeddings)
        self._memory[key] = embeddings
        while len(self._memory) > self.memory_entries:
            self._memory.popitem(last=False)
        return embeddings

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def _read(self, key: str):
        if self.directory is None or not self._path(key).exists():
            return None
        with np.load(self._path(key)) as entry:
            dtype = np.dtype(str(entry["dtype"]))
            return jax.numpy.asarray(entry["bits"].view(dtype))

    def _write(self, key: str, embeddings) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        host = np.asarray(embeddings)
        bits = host.view(np.dtype(f"u{host.dtype.itemsize}"))
        with atomic_file(self._path(key)) as tmp, open(tmp, "wb") as f:
            np.savez(f, bits=bits, dtype=np.asarray(host.dtype.name))
