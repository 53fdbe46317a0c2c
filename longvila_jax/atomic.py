"""Writes that appear whole or not at all: a temporary name beside the target, then a rename.

A reader (or a resumed run) never sees a half-written file or folder, whatever kills the
writer; the temporary is removed when the write fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def ensure_new_path(dst):
    """Fail early (before minutes of conversion) if `dst` is taken."""
    if Path(dst).exists():
        raise FileExistsError(f"{Path(dst).absolute()}: already exists; remove it or choose "
                              "another path")


@contextlib.contextmanager
def atomic_folder(dst) -> Iterator[Path]:
    """Yield a temporary folder that becomes `dst` only if the block succeeds."""
    dst = Path(dst).absolute()
    ensure_new_path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path that replaces `path` only if the block succeeds.

    The temporary keeps `path`'s suffix, because OpenCV and matplotlib pick the format from
    it. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
