"""Where a training step's GPU time goes, from one step traced by XLA's profiler.

  XLA_FLAGS=--xla_gpu_enable_command_buffer= python bench/train_step.py ... --profile DIR
  python bench/profile_breakdown.py DIR [--json PATH] [--top N [--part NAME]]

(Without command buffers every kernel keeps its JAX name stack, which the categories
below read; inside a CUDA graph most kernels carry only the graph's name.) Each GPU kernel
falls in the first category it matches:

  attention forward, backward   our Mosaic GPU / Triton kernels and cuDNN's, by kernel name
  rematerialised recompute      under 'rematted_computation' in the name stack
  logits and loss               under the 'logits_and_loss' scope (models/loss.py)
  vision tower                  under 'vision_tower' (parallel/mmsp.py)
  optimizer                     under 'optimizer' (train/step.py)
  collectives                   NCCL kernels; 'exposed' is the part no other kernel overlaps
  matrix products fwd / bwd     GEMM kernels, backward under 'transpose('
  other kernels                 norms, rotary, elementwise, copies, reductions
  idle                          the step's span minus the union of all kernels

Times are per GPU, averaged over the GPUs in the trace. `--top N` then lists the N
kernels of one part (default: other kernels) that took the most time, with their calls
and name stacks: the fusions to look up in an HLO dump (`--xla_dump_to`) by name.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

ATTENTION_FWD = re.compile(r"mosaic_gpu|_fwd_kernel|sdpa.*fprop|flash_fprop")
ATTENTION_BWD = re.compile(r"_bwd_(kv|q)_kernel|attention_backward_mosaic|sdpa.*bprop|flash_bprop")
GEMM = re.compile(r"nvjet|gemm|xmma|cutlass|cublas", re.I)
NCCL = re.compile(r"nccl", re.I)
SCOPES = (("rematerialised recompute", "rematted_computation"),
          ("logits and loss", "logits_and_loss"), ("vision tower", "vision_tower"),
          ("optimizer", "optimizer"))
ORDER = ("attention forward", "attention backward", "rematerialised recompute",
         "logits and loss", "vision tower", "optimizer", "collectives (exposed)",
         "collectives (hidden)", "matrix products forward", "matrix products backward",
         "other kernels", "idle")


def category(kernel: str, stack: str) -> str:
    """The category of one kernel from its name and its JAX name stack."""
    if NCCL.search(kernel):
        return "collectives"
    if ATTENTION_BWD.search(kernel):
        return "attention backward"
    if ATTENTION_FWD.search(kernel):
        return "attention forward"
    for name, scope in SCOPES:
        if scope in stack:
            return name
    if GEMM.search(kernel):
        return "matrix products backward" if "transpose(" in stack else \
            "matrix products forward"
    return "other kernels"


def _overlap(interval, merged):
    a, b = interval
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in merged)


def _merge(intervals):
    """The union of `(start, end)` intervals as sorted disjoint `[start, end]` pairs."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _per_gpu(trace: dict) -> list[list[dict]]:
    """Each GPU's kernel events (complete events under a GPU process), GPUs with none left out."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpus = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
            and "GPU" in e["args"]["name"]}
    kernels = ([e for e in events if e.get("ph") == "X" and e.get("pid") == pid]
               for pid in sorted(gpus))
    found = [k for k in kernels if k]
    if not found:
        raise SystemExit("profile_breakdown: no GPU kernels in the trace")
    return found


def breakdown(trace: dict) -> dict:
    """`{category: milliseconds per GPU}` plus 'step' (the span) from a Chrome trace."""
    per_gpu = []
    for kernels in _per_gpu(trace):
        times = defaultdict(float)
        spans = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
        compute = _merge([s for e, s in zip(kernels, spans, strict=True)
                          if not NCCL.search(e["name"])])
        for e, s in zip(kernels, spans, strict=True):
            name = category(e["name"], e.get("args", {}).get("name", ""))
            if name == "collectives":
                hidden = _overlap(s, compute)
                times["collectives (hidden)"] += hidden
                times["collectives (exposed)"] += e["dur"] - hidden
            else:
                times[name] += e["dur"]
        step = max(b for _, b in spans) - min(a for a, _ in spans)
        times["idle"] = step - sum(b - a for a, b in _merge(spans))
        times["step"] = step
        per_gpu.append(times)
    return {k: sum(t[k] for t in per_gpu) / len(per_gpu) / 1e3 for k in (*ORDER, "step")}


def largest(trace: dict, part: str, n: int) -> list[dict]:
    """The `n` kernels of `part` (a category; collectives count whole) with the most time,
    one row per kernel name and name stack: `{kernel, stack, ms, calls}` per GPU (averaged
    over the GPUs, so a kernel only some GPUs ran has fractional calls) and `us_per_call`."""
    gpus = _per_gpu(trace)
    total, calls = defaultdict(float), defaultdict(int)
    for kernels in gpus:
        for e in kernels:
            stack = e.get("args", {}).get("name", "")
            if category(e["name"], stack) == part:
                total[e["name"], stack] += e["dur"]
                calls[e["name"], stack] += 1
    top = sorted(total, key=lambda key: -total[key])[:n]
    return [{"kernel": k, "stack": s, "ms": total[k, s] / len(gpus) / 1e3,
             "calls": calls[k, s] / len(gpus), "us_per_call": total[k, s] / calls[k, s]}
            for k, s in top]


def find_trace(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.rglob("*.trace.json.gz"))
    if not found:
        raise SystemExit(f"profile_breakdown: no *.trace.json.gz under {path}")
    return found[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, help="a --profile directory or a trace.json.gz")
    parser.add_argument("--json", default=None)
    parser.add_argument("--top", type=int, default=0, metavar="N",
                        help="also list the N kernels of --part with the most time")
    parser.add_argument("--part", default="other kernels",
                        choices=sorted({*ORDER, "collectives"} - {
                            "collectives (exposed)", "collectives (hidden)", "idle"}))
    args = parser.parse_args()
    path = find_trace(args.trace)
    with gzip.open(path) as f:
        trace = json.load(f)
    result = breakdown(trace)
    step = result["step"]
    print(f"{path}\n| part | ms per GPU | share of the step |\n| --- | --- | --- |")
    for name in ORDER:
        print(f"| {name} | {result[name]:.1f} | {100 * result[name] / step:.1f} % |")
    print(f"| step (first kernel to last) | {step:.1f} | 100 % |")
    if args.top:
        print(f"\n{args.part}, largest first:\n| kernel | calls | ms per GPU | us per call "
              f"| name stack |\n| --- | --- | --- | --- | --- |")
        for row in largest(trace, args.part, args.top):
            print(f"| {row['kernel']} | {row['calls']:g} | {row['ms']:.2f} | "
                  f"{row['us_per_call']:.1f} | {row['stack'][:100]} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
