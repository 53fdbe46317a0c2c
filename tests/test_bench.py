"""bench/host_run.sh, the eight-GPU run's script, on 8 simulated CPU devices (2 x 4 mesh).

The GPU run gets one short session, so every part must work before it starts: each part
runs here at tiny sizes (the tiny model, 64 tokens per device) and its JSON must hold the
rows the benchmark tables are built from, on the layouts the GPUs will use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {"MODEL": "tiny", "SP_TOKENS": "64", "SP_SHAPE": "28 4 16", "TRAIN_START": "2048",
        "VIDEO_FRAMES": "8", "VIDEO_SECONDS": "60"}


def host_run(part: str, out: Path, **env) -> str:
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "host_run.sh"), part, str(out)],
        env={**os.environ, **TINY, **env, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sequence_parallel_schemes_on_a_two_by_four_mesh(tmp_path):
    host_run("sp", tmp_path)
    rows = {r["scheme"]: r for r in json.loads((tmp_path / "sp_64.json").read_text())["rows"]}
    assert {name: r.get("mesh") for name, r in rows.items() if "note" in r} == {
        "ring": "8x1", "ulysses": "1x8", "2d": "2x4", "allgather": "8x1"}
    assert rows["ulysses"]["note"] == "heads padded 28 -> 32, KV 4 -> 8 copies"
    assert rows["2d"]["note"] == ""  # 28 heads split 4 ways as they are
    assert all(r["ms"] > 0 for r in rows.values())


def test_training_finds_the_longest_sequence_then_times_it(tmp_path):
    host_run("train-full", tmp_path, MEMORY_GIB="0.03")
    longest = jsonl(tmp_path / "train_longest_full.jsonl")[-1]
    assert longest["mesh"] == [1, 2, 4] and longest["seq"] >= 2048
    assert longest["next_fails"] > longest["seq"]  # the search stopped at the memory limit
    step = jsonl(tmp_path / "train_full.jsonl")[-1]
    assert (step["seq"], step["remat"], step["frames"]) == (longest["seq"], "full",
                                                           longest["seq"] // 256)
    assert step["step_s"] > 0 and step["tokens_per_s_per_gpu"] > 0


def test_longest_video_search_runs_and_stops_at_a_limit(tmp_path):
    printed = host_run("video", tmp_path, MEMORY_GIB="0.05")
    rows = jsonl(tmp_path / "video.jsonl")
    ran = [r for r in rows if "generate_s" in r]
    assert ran and ran[0]["frames"] == 8 and rows[0]["scheme"] == "2d"
    # Where it stops depends on this machine's speed (the time budget) or on memory; after
    # the first stop it tries once between the longest run and it, which may run or stop.
    stops = [r for r in rows if "stopped" in r]
    assert stops and {r["stopped"] for r in stops} <= {"memory", "time"}
    longest = max(r["frames"] for r in ran)
    assert longest < stops[0]["frames"] and rows.index(stops[0]) >= len(rows) - 2
    assert f"longest video run: {longest} frames" in printed


@pytest.mark.parametrize("part", ["nonsense"])
def test_unknown_part_is_named(tmp_path, part):
    result = subprocess.run(["bash", str(ROOT / "bench" / "host_run.sh"), part, str(tmp_path)],
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and f"unknown part '{part}'" in result.stderr
