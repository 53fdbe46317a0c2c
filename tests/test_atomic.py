"""Writes that appear whole or not at all, and the temporaries a killed writer leaves
behind removed by the next write of the same target or the folder's owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from longvila_jax.atomic import atomic_file, atomic_folder, remove_temporaries

KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys
    from longvila_jax.atomic import atomic_file, atomic_folder
    with atomic_folder(sys.argv[1]) as tmp:
        (tmp / "half").write_text("x")
        with atomic_file(sys.argv[2]) as f:
            f.write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.fixture
def killed(tmp_path):
    """What SIGKILL during a folder's and a file's write leaves in `tmp_path`."""
    child = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(tmp_path / "final"),
                            str(tmp_path / "result.json")], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(name.startswith(".") for name in left), left
    return tmp_path


def test_the_next_write_of_a_folder_removes_what_a_killed_one_left(killed):
    with atomic_folder(killed / "final") as tmp:
        (tmp / "whole").write_text("y")
    assert (killed / "final" / "whole").read_text() == "y"
    assert [p.name for p in killed.glob(".final.tmp-*")] == []
    assert len(list(killed.glob(".result.tmp-*.json"))) == 1  # another target's: kept


def test_the_owner_of_a_folder_removes_every_temporary(killed):
    (killed / "keep.txt").write_text("z")
    removed = remove_temporaries(killed)
    assert len(removed) == 2
    assert sorted(os.listdir(killed)) == ["keep.txt"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "b") as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError
    assert os.listdir(tmp_path) == []
