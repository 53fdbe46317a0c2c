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


@pytest.mark.slow
def test_several_remat_policies_run_one_process_each(tmp_path):
    """Each policy in its own process (the device's peak-memory counter only grows within
    one): one table header, a row per policy, both rows in --json."""
    out = tmp_path / "steps.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_step.py"), "--model", "tiny", "--seq",
         "128", "--remat", "none,full", "--steps", "1", "--json", str(out)],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}, capture_output=True,
        text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| model | remat |") == 1
    rows = jsonl(out)
    assert [r["remat"] for r in rows] == ["none", "full"]
    assert all(r["step_s"] > 0 and r["seq"] == 128 for r in rows)


@pytest.mark.parametrize("part", ["nonsense"])
def test_unknown_part_is_named(tmp_path, part):
    result = subprocess.run(["bash", str(ROOT / "bench" / "host_run.sh"), part, str(tmp_path)],
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and f"unknown part '{part}'" in result.stderr


def test_profile_breakdown_sorts_kernels_and_finds_idle_and_exposed_time(tmp_path):
    """A made-up two-GPU trace: each kernel lands in its category by name and name stack;
    idle is the gap between kernels; a collective counts as exposed only where no other
    kernel runs beside it."""
    import gzip

    sys.path.insert(0, str(ROOT / "bench"))
    from profile_breakdown import breakdown, find_trace, largest

    def kernel(pid, start, dur, name, stack=""):
        return {"ph": "X", "pid": pid, "tid": 1, "ts": start, "dur": dur, "name": name,
                "args": {"name": stack}}

    events = [{"ph": "M", "name": "process_name", "pid": p, "args": {"name": n}}
              for p, n in ((1, "/device:GPU:0"), (2, "/device:GPU:1"), (3, "/host:CPU"))]
    for pid in (1, 2):
        events += [
            kernel(pid, 0, 1000, "attention_forward_mosaic_gpu_kernel",
                   "jit(step)/jvp()/mpmd_map"),
            kernel(pid, 1000, 2000, "nvjet_sm90_tst_128x160", "jit(step)/jvp()/dot_general"),
            kernel(pid, 3000, 500, "ncclDevKernel_AllGather", "jit(step)/all_gather"),
            kernel(pid, 3000, 300, "loop_add_fusion", "jit(step)/jvp()/add"),
            kernel(pid, 4000, 1500, "_bwd_kv_kernel", "transpose(jvp())/triton_kernel_call"),
            kernel(pid, 5500, 1500, "attention_backward_mosaic_gpu_kernel",
                   "transpose(jvp())/mpmd_map"),
            kernel(pid, 7000, 1000, "nvjet_sm90_tst_256x128", "transpose(jvp())/dot_general"),
            kernel(pid, 8000, 1000, "nvjet_sm90_tst_128x160",
                   "transpose(jvp())/checkpoint/rematted_computation/dot_general"),
            kernel(pid, 9000, 500, "nvjet_sm90_tss_128x256",
                   "jit(step)/jvp()/logits_and_loss/dot_general"),
            kernel(pid, 9500, 500, "loop_select_fusion", "jit(step)/optimizer/select_n"),
        ]
    events.append(kernel(3, 0, 99_000, "host work"))
    path = tmp_path / "prof" / "plugins" / "vm.trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert find_trace(tmp_path / "prof") == path
    got = breakdown({"traceEvents": events})
    want = {"attention forward": 1.0, "matrix products forward": 2.0,
            "collectives (hidden)": 0.3, "collectives (exposed)": 0.2, "other kernels": 0.3,
            "attention backward": 3.0, "matrix products backward": 1.0,
            "rematerialised recompute": 1.0, "logits and loss": 0.5, "optimizer": 0.5,
            "vision tower": 0.0, "idle": 0.5, "step": 10.0}
    assert got == pytest.approx(want)
    # The largest kernels of a part, per GPU, largest first; a kernel one GPU of two ran
    # counts half a call. The forward GEMM's kernel name also ran as recompute, another
    # part, which its forward row leaves out.
    events += [kernel(pid, 10_000, 700, "loop_add_fusion", "jit(step)/jvp()/add")
               for pid in (1, 2)]
    events += [kernel(1, 11_000, 100, "loop_multiply_fusion", "jit(step)/jvp()/mul")]
    top = largest({"traceEvents": events}, "other kernels", 5)
    assert top == [{"kernel": "loop_add_fusion", "stack": "jit(step)/jvp()/add",
                    "ms": pytest.approx(1.0), "calls": 2, "us_per_call": pytest.approx(500)},
                   {"kernel": "loop_multiply_fusion", "stack": "jit(step)/jvp()/mul",
                    "ms": pytest.approx(0.05), "calls": 0.5,
                    "us_per_call": pytest.approx(100)}]
    forward = largest({"traceEvents": events}, "matrix products forward", 5)
    assert [(row["kernel"], row["ms"]) for row in forward] == \
        [("nvjet_sm90_tst_128x160", pytest.approx(2.0))]


def test_attention_benchmark_runs_end_to_end_on_cpu(tmp_path):
    """The GPU session cannot afford a script that fails on its arguments: run the table
    path at a tiny length with the XLA backend and check the JSON rows."""
    out = tmp_path / "attention.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "attention.py"), "--seqs", "256", "--heads", "4,2",
         "--backends", "xla", "--json", str(out)],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["seq"] == 256 and row["backend"] == "xla"
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0


def test_mosaic_profile_sums_regions_per_warpgroup_role():
    """bench/mosaic_profile.py's summary of a Mosaic GPU trace: two programs, each with two
    consumers and a producer; shares are over each role's summed busy spans."""
    sys.path.insert(0, str(ROOT / "bench"))
    from mosaic_profile import summarise

    events = []
    for program in range(2):
        for wg in range(3):
            tid = 1 + wg + 3 * program
            name = "wait_free" if wg == 2 else "scores"
            for start, stop in ((0.0, 1.0), (2.0, 4.0)):
                events += [dict(name=name, ph="B", ts=start, tid=tid, pid=1),
                           dict(name=name, ph="E", ts=stop, tid=tid, pid=1)]
            if wg < 2:
                events += [dict(name="grads", ph="B", ts=4.0, tid=tid, pid=1),
                           dict(name="grads", ph="E", ts=8.0, tid=tid, pid=1)]
    rows = summarise({"traceEvents": events})
    assert rows["consumer", "scores"] == dict(calls=8, mean_us=1.5, share=12.0 / 32.0)
    assert rows["consumer", "grads"] == dict(calls=4, mean_us=4.0, share=16.0 / 32.0)
    assert rows["producer", "wait_free"] == dict(calls=4, mean_us=1.5, share=6.0 / 8.0)
