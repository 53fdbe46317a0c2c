"""Where the Mosaic attention kernels' time goes inside each warpgroup.

XLA's profiler sees a Mosaic kernel as one opaque launch; Mosaic GPU's own profiler
(`mosaic.PROFILE`) records each warpgroup's named regions (`jax.named_scope` in the
kernels: scores, softmax terms, products, shared-memory stores, waits) with the SM clock.
This runs one forward+backward and prints, per kernel and per warpgroup role, each
region's calls, mean time and share of that role's busy span.

  python bench/mosaic_profile.py --out DIR [--seq 8192] [--heads 8,2] [--space 1024]

The traces (Perfetto JSON, one per kernel launch) stay in DIR. Profiling adds ~10-20
cycles per region boundary, so read the shares, not the absolute step time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys

ROLES = {0: "consumer", 1: "consumer", 2: "producer"}  # warpgroup index within a program


def summarise(trace: dict) -> dict[tuple[str, str], dict[str, float]]:
    """{(role, region): {calls, mean_us, share}} from one kernel's trace; share is the
    region's time over the summed busy spans (first begin to last end) of that role's
    warpgroups. Trace ids are 1 + warpgroup + 3 x program (`trace_scope` WARPGROUP)."""
    by_trace = collections.defaultdict(list)
    for event in trace["traceEvents"]:
        by_trace[event["tid"]].append(event)
    total = collections.defaultdict(float)
    calls = collections.Counter()
    span = collections.defaultdict(float)
    for tid, events in by_trace.items():
        role = ROLES[(tid - 1) % 3]
        events.sort(key=lambda e: e["ts"])
        span[role] += events[-1]["ts"] - events[0]["ts"]
        open_at = {}
        for event in events:
            if event["ph"] == "B":
                open_at[event["name"]] = event["ts"]
            else:
                total[role, event["name"]] += event["ts"] - open_at.pop(event["name"])
                calls[role, event["name"]] += 1
    return {key: dict(calls=calls[key], mean_us=total[key] / calls[key],
                      share=total[key] / span[key[0]] if span[key[0]] else 0.0)
            for key in sorted(total)}


def report(path: str) -> str:
    with open(path) as f:
        rows = summarise(json.load(f))
    lines = [f"{os.path.basename(path)}", "| role | region | calls | mean us | share |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {role} | {name} | {r['calls']} | {r['mean_us']:.3f} | {r['share']:.1%} |"
              for (role, name), r in rows.items()]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="trace directory")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", default="8,2", metavar="Q,KV")
    parser.add_argument("--space", type=int, default=360,
                        help="regions recorded per warpgroup (a program's steps x regions)")
    args = parser.parse_args()

    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import attention as bench  # bench/attention.py: the same inputs and jitted functions

    from longvila_jax.kernels import mosaic

    os.makedirs(args.out, exist_ok=True)
    bench.HEADS, bench.KV_HEADS = (int(x) for x in args.heads.split(","))
    mosaic.PROFILE = (args.space, os.path.abspath(args.out))
    # The profiler's buffers take shared memory (16 bytes per region and warpgroup), which
    # the backward's two-stage Q/dO ring leaves almost none of: profile it with one stage
    # (a slightly different kernel, so read the split, not the time).
    mosaic.BWD_STAGES = 1
    q, k, v, do = bench.inputs(args.seq, jax.random.key(0))
    jax.block_until_ready(bench.functions("mosaic", None)[1](q, k, v, do))
    for path in sorted(glob.glob(os.path.join(args.out, "*-trace.json"))):
        print(report(path) + "\n", flush=True)


if __name__ == "__main__":
    main()
