"""Writes that appear whole or not at all: a temporary name beside the target, then a rename.

A reader (or a resumed run) never sees a half-written file or folder, whatever kills the
writer; the temporary is removed when the write fails, and what a kill left behind is
removed by the next write of the same target (`atomic_folder`) or by the next command that
owns the folder (`remove_temporaries`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _temporary(target: Path, suffix: str = "") -> Path:
    return target.with_name(f".{target.name.removesuffix(suffix)}.tmp-"
                            f"{uuid.uuid4().hex[:8]}{suffix}")


def remove_temporaries(folder, target: str = "*") -> list[Path]:
    """Delete the temporaries that killed writers of `target` (a name or pattern; default
    every one) left in `folder` (not below it); returns them. Only for what the caller
    alone writes: a live writer's temporary would go too."""
    removed = sorted(Path(folder).glob(f".{target}.tmp-*"))
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


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
    remove_temporaries(dst.parent, dst.name)
    tmp = _temporary(dst)
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
    tmp = _temporary(path, path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
