"""Safetensors reading (tensor by tensor) and sharded writing, with errors that name files.

Reading goes through `safetensors.safe_open(framework="np")`; importing `ml_dtypes`
first lets numpy name bfloat16, so bf16 checkpoints stream without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder is unusable; the message names the file and key."""


class SafetensorsFolder:
    """All tensors of one Hugging Face model folder (single file or sharded with an index)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
            self.key_to_file = {k: self.folder / f for k, f in weight_map.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.folder}: no *.safetensors files and no {INDEX_NAME}")
            self.key_to_file = {}
            for file in files:
                for key in self._open(file, None).keys():
                    self.key_to_file[key] = file
        for key, file in self.key_to_file.items():
            if not file.is_file():
                raise CheckpointError(f"{file}: missing shard (listed in {index.name} for '{key}')")
        self._handles = {}

    def _open(self, file: Path, key: str | None):
        try:
            return safe_open(str(file), framework="np")
        except (SafetensorError, OSError) as e:
            what = f" (reading '{key}')" if key else ""
            raise CheckpointError(f"{file}: unreadable safetensors file{what}: {e}") from None

    def keys(self):
        return self.key_to_file.keys()

    def get(self, key: str) -> np.ndarray:
        """Load one tensor; raises `CheckpointError` naming the file and key."""
        if key not in self.key_to_file:
            raise CheckpointError(f"{self.folder}: missing tensor '{key}'")
        file = self.key_to_file[key]
        if file not in self._handles:
            self._handles[file] = self._open(file, key)
        try:
            return self._handles[file].get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: cannot read '{key}': {e}") from None


def write_sharded(tensors, folder, *, max_shard_bytes: int, metadata=None):
    """Write `(key, array)` pairs as `model.safetensors` or numbered shards plus an index.

    Tensors are consumed one at a time and a shard is flushed once it would exceed
    `max_shard_bytes`, so at most one shard is held in memory.
    """
    folder = Path(folder)
    shards, current, size, total = [], {}, 0, 0
    for key, array in tensors:
        array = np.ascontiguousarray(array)
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(_flush(current, folder, len(shards), metadata))
            current, size = {}, 0
        current[key] = array
        size += array.nbytes
        total += array.nbytes
    shards.append(_flush(current, folder, len(shards), metadata))
    if len(shards) == 1:
        shards[0][0].rename(folder / "model.safetensors")
        return
    weight_map = {}
    for n, (path, keys) in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        path.rename(folder / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def _flush(tensors, folder: Path, n: int, metadata):
    path = folder / f"shard-{n}.tmp"
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    return path, list(tensors)
