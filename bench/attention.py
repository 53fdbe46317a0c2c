"""Attention throughput: our Triton and Mosaic GPU kernels vs cuDNN vs the blockwise XLA
path, one run.

Causal GQA 32/8 heads (`--heads`), head dim 128, bf16, batch 1, sequence 4K..64K; forward and
forward+backward TFLOP/s, counting causal as half of dense and fwd+bwd as 3.5x fwd.
Then a packed case (16 documents in 32K tokens, segment ids) for our kernels against
cuDNN on the same 32K tokens as one dense causal sequence (cuDNN has no segment ids).

  python bench/attention.py [--seqs 4096,8192] [--backends triton,mosaic,cudnn,xla]
                            [--json PATH] [--sweep [--sweep-seq 32768]]
      (--sweep: first try the kernels' block configs, keep the best)
  python bench/attention.py --interleave 7 [--seqs 32768] [--backends triton,mosaic]
      (each backend and cuDNN timed alternately N times, forward and forward+backward:
       cuDNN's own time moves by ~10% between runs, so one pair is a weak basis for a ratio)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import timed  # bench/timing.py (scripts run as `python bench/NAME.py`)

from longvila_jax.kernels import AttentionSpec, Mask, flash_attention

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def functions(backend, mask):
    def attend(q, k, v):
        return flash_attention(q, k, v, mask, AttentionSpec(backend=backend))[0]

    fwd = jax.jit(attend)
    fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
    return fwd, fwd_bwd


def inputs(seq, key):
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (1, seq, HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(kk, (1, seq, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(kv, (1, seq, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    do = jax.random.normal(kd, q.shape, jnp.bfloat16)
    return q, k, v, do


def causal_fwd_flops(seq: int) -> float:
    return 4 * seq * seq * HEADS * HEAD_DIM / 2


SWEEP = {  # (kernel module, config name): configs that compile without spills or ptxas
    # serialisation warnings, or nearly; Triton (BLOCK_M, BLOCK_N, warps, stages),
    # Mosaic (block_kv, stages); which backward the mosaic backend runs
    ("triton", "FWD"): [(128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2)],
    ("triton", "BWD_KV"): [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 3)],
    ("triton", "BWD_Q"): [(128, 128, 8, 2), (64, 64, 4, 3)],
    ("mosaic", "FWD"): [(128, 2), (64, 2), (64, 3), (64, 4)],
    ("mosaic", "BACKWARD"): ["mosaic", "triton"],
}


def sweep(backends, seq=32768):
    """Time each block config of the kernels in `backends` at `seq`; leave the fastest set
    in the kernel module."""
    import importlib

    q, k, v, do = inputs(seq, jax.random.key(1))
    print(f"sweep at {seq}: Triton (BLOCK_M, BLOCK_N, warps, stages), Mosaic (block_kv, stages)")
    for (backend, name), configs in SWEEP.items():
        if backend not in backends:
            continue
        kernels = importlib.import_module(f"longvila_jax.kernels.{backend}")

        def setting(config, kernels=kernels, name=name):  # block shapes, or a backward's name
            setattr(kernels, name, kernels.Blocks(*config) if isinstance(config, tuple)
                    else config)

        best = None
        for config in configs:
            setting(config)
            fwd, fwd_bwd = functions(backend, None)
            try:
                t = timed(fwd, q, k, v, reps=3) if name == "FWD" else timed(
                    fwd_bwd, q, k, v, do, reps=2)
            except Exception as e:  # a config can exceed shared memory: report, go on
                print(f"  {backend} {name} {config}: failed ({type(e).__name__}: "
                      f"{str(e)[:80]})")
                continue
            print(f"  {backend} {name} {config}: {t * 1e3:.3f} ms", flush=True)
            best = min(best or (t, config), (t, config))
        setting(best[1])
        print(f"  -> {backend} {name} = {best[1]}")


def interleave(seq, rounds, backends):
    """Alternate each backend's timings with cuDNN's, forward and forward+backward; print
    each ratio (cuDNN time over the backend's: throughput relative to cuDNN) and the
    median."""
    q, k, v, do = inputs(seq, jax.random.key(0))
    names = [b for b in backends if b != "cudnn"]
    fns = {b: functions(b, None) for b in (*names, "cudnn")}
    ratios = {(b, d): [] for b in names for d in ("fwd", "fwd+bwd")}
    for r in range(rounds):
        t = {}
        for b, (fwd, fwd_bwd) in fns.items():
            t[b, "fwd"] = timed(fwd, q, k, v, reps=10)
            t[b, "fwd+bwd"] = timed(fwd_bwd, q, k, v, do, reps=4)
        for b, d in ratios:
            ratios[b, d].append(t["cudnn", d] / t[b, d])
        print(f"round {r}: " + ", ".join(f"{b} {d} {x * 1e3:.3f} ms" for (b, d), x in t.items()),
              flush=True)
    for (b, d), xs in ratios.items():
        print(f"{b}/cudnn {d} throughput at {seq}, median of {rounds}: "
              f"{float(np.median(xs)):.3f} (min {min(xs):.3f}, max {max(xs):.3f})")
    return ratios


def main():
    global HEADS, KV_HEADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="4096,8192,16384,32768,65536")
    parser.add_argument("--backends", default="triton,mosaic,cudnn,xla")
    parser.add_argument("--json", default=None, help="also write results here")
    parser.add_argument("--heads", default=f"{HEADS},{KV_HEADS}", metavar="Q,KV",
                        help="query and KV heads (Qwen2-1.5B: 12,2)")
    parser.add_argument("--sweep", action="store_true",
                        help="tune the kernels' block configs first")
    parser.add_argument("--sweep-seq", type=int, default=32768)
    parser.add_argument("--interleave", type=int, default=0, metavar="N",
                        help="only: N alternating timings per length, each backend against "
                             "cuDNN")
    args = parser.parse_args()
    HEADS, KV_HEADS = (int(x) for x in args.heads.split(","))
    backends = args.backends.split(",")
    if args.interleave:
        for seq in args.seqs.split(","):
            interleave(int(seq), args.interleave, backends)
        return
    if args.sweep:
        sweep(backends, args.sweep_seq)
    seqs = [int(s) for s in args.seqs.split(",")]
    rows, key = [], jax.random.key(0)
    print(f"{'seq':>6} {'backend':>7} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} {'f+b TF/s':>9}")
    for seq in seqs:
        q, k, v, do = inputs(seq, key)
        reps = max(2, min(100, int(2e12 // causal_fwd_flops(seq))))
        for backend in backends:
            fwd, fwd_bwd = functions(backend, None)
            t_f = timed(fwd, q, k, v, reps=reps)
            t_fb = timed(fwd_bwd, q, k, v, do, reps=max(1, reps // 3))
            flops = causal_fwd_flops(seq)
            row = dict(seq=seq, backend=backend, fwd_ms=t_f * 1e3, fwd_tflops=flops / t_f / 1e12,
                       fwd_bwd_ms=t_fb * 1e3, fwd_bwd_tflops=3.5 * flops / t_fb / 1e12)
            rows.append(row)
            print(f"{seq:>6} {backend:>7} {row['fwd_ms']:8.3f} {row['fwd_tflops']:9.1f} "
                  f"{row['fwd_bwd_ms']:8.3f} {row['fwd_bwd_tflops']:9.1f}", flush=True)

    seq, docs = 32768, 16
    q, k, v, do = inputs(seq, key)
    seg = jnp.asarray(np.arange(seq, dtype=np.int32) // (seq // docs))[None]
    pos = jnp.asarray(np.arange(seq, dtype=np.int32))[None]
    packed = Mask.self_attention(pos, seg)
    print(f"\npacked: {docs} documents in {seq} tokens")
    for backend, mask, label in [("triton", packed, "triton, packed (segment ids)"),
                                 ("mosaic", packed, "mosaic, packed (segment ids)"),
                                 ("cudnn", None, "cudnn, dense causal"),
                                 ("triton", None, "triton, dense causal"),
                                 ("mosaic", None, "mosaic, dense causal")]:
        if backend not in backends:
            continue
        fwd, fwd_bwd = functions(backend, mask)
        t_f, t_fb = timed(fwd, q, k, v, reps=10), timed(fwd_bwd, q, k, v, do, reps=4)
        rows.append(dict(case="packed", label=label, fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3))
        print(f"{label:>30}: fwd {t_f * 1e3:8.3f} ms   fwd+bwd {t_fb * 1e3:8.3f} ms", flush=True)

    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    print("\n" + json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
