"""Sequence-parallel attention on one host's GPUs: ring, Ulysses, 2D vs the usual baselines.

Fixed tokens per GPU (default 32K), GQA 28/4 heads, head dim 128, bf16, causal, zigzag
layout; forward+backward time and per-GPU TFLOP/s (causal = half of dense, fwd+bwd = 3.5x
fwd) for each scheme, against (a) one GPU attending over its local length, with cuDNN
(what `auto` picks for plain causal attention) and with our Triton kernel (what every
ring step runs, given positions), and (b) all-gather-KV context parallelism (every GPU
gathers all K/V; MaxText's default). Ulysses over more devices than the heads split evenly
pads them (`parallel.ulysses.head_layout`: Qwen2-7B's 28/4 over 8 become 32/8); TF/s count
the real heads only. Efficiency divides per-GPU TFLOP/s by (a), per
kernel. With --hlo DIR, the compiled ring step's HLO is written there and its async
collective-permute pairs are counted (overlap needs XLA's latency-hiding scheduler,
which this script turns on). With --longest, the ring's fwd+bwd is compiled at doubling
total lengths and XLA's compiled memory analysis says which fit in device memory (not
run there: one step at millions of tokens takes many minutes; the time is estimated
from the ring's measured TFLOP/s).

  python bench/sequence_parallel.py [--tokens-per-gpu 32768] [--schemes ring,ulysses,2d,allgather]
                                    [--hlo DIR] [--longest] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_gpu_enable_latency_hiding_scheduler=true").strip()

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from timing import timed  # bench/timing.py (scripts run as `python bench/NAME.py`)

from longvila_jax.kernels import AttentionSpec, Mask, Tokens, flash_attention
from longvila_jax.memory import planned_bytes
from longvila_jax.parallel import (
    head_layout,
    layout_permutation,
    make_mesh,
    resolve_scheme,
    ring_attention,
    sequence_parallel_attention,
    zigzag_permutation,
)
from longvila_jax.parallel.mesh import SEQUENCE_AXES
from longvila_jax.parallel.schemes import ulysses_degree


def allgather_attention(q, k, v, mask, spec, *, axis_name):
    """Context parallelism by gathering every K/V block: simple, O(sequence) memory."""
    def gather(x):
        return jax.lax.all_gather(x, axis_name, axis=1, tiled=True)

    return flash_attention(q, gather(k), gather(v),
                           Mask(mask.q, mask.kv.all_gather(axis_name)), spec)


def scheme(name, n):
    """(mesh (node, local), local attention function) for a scheme on n GPUs."""
    if name == "allgather":
        return (n, 1), lambda q, k, v, mask: allgather_attention(q, k, v, mask, AttentionSpec(),
                                                                 axis_name="node")
    node = {"ring": n, "ulysses": 1, "2d": 2 if n % 2 == 0 and n > 2 else 1}[name]
    resolved = resolve_scheme(name, node, n // node)
    return (node, n // node), lambda q, k, v, mask: sequence_parallel_attention(
        q, k, v, mask, AttentionSpec(), scheme=resolved)


def inputs(seq, heads, kv_heads, head_dim, key):
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (1, seq, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(kk, (1, seq, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(kv, (1, seq, kv_heads, head_dim), jnp.bfloat16)
    return q, k, v, jax.random.normal(kd, q.shape, jnp.bfloat16)


def fwd_bwd(attend):
    return jax.jit(lambda q, k, v, do, *masks: jax.vjp(
        lambda q, k, v: attend(q, k, v, *masks)[0], q, k, v)[1](do))


def ring_kernel_floor(n, local, shape, key):
    """Seconds of the ring's attention kernels alone, run back to back on one GPU.

    Zigzag over n ranks gives each rank, per fwd+bwd, one diagonal step (two causal and one
    full (local/2)^2 piece) and n-1 steps of two full pieces. Timing exactly those calls
    without any ring separates the kernels' cost at half-chunk size from what the ring adds
    (communication left exposed, merges, accumulation, control flow).
    """
    half = local // 2
    q, k, v, do = inputs(half, *shape, key)
    pos = jnp.arange(half, dtype=jnp.int32)[None]
    seg = jnp.zeros_like(pos)

    def piece(causal, offset):
        mask = Mask(Tokens(pos + offset, seg), Tokens(pos, seg))
        return fwd_bwd(lambda q, k, v, causal=causal, mask=mask: flash_attention(
            q, k, v, mask, AttentionSpec(causal)))

    diagonal = timed(piece(True, 0), q, k, v, do)
    full = timed(piece(True, half), q, k, v, do)  # every key precedes every query
    return 2 * diagonal + full + (n - 1) * 2 * full


def ring_step(n, total):
    """(jitted ring fwd+bwd on an (n, 1) mesh, its arguments) at `total` tokens."""
    mesh = make_mesh(1, n, 1)
    seq, lse = P(None, SEQUENCE_AXES), P(None, None, SEQUENCE_AXES)
    sharded = jax.shard_map(
        lambda q, k, v, p, s: ring_attention(q, k, v, Mask.self_attention(p, s),
                                             AttentionSpec()),
        mesh=mesh, in_specs=(seq,) * 5, out_specs=(seq, lse))
    return fwd_bwd(sharded), NamedSharding(mesh, seq)


def longest_ring(n, shape, start, limit, tflops):
    """Double the total length from `start` until the ring's fwd+bwd no longer fits in
    `limit` bytes per device by XLA's compiled memory analysis; estimate one step's time
    at the longest that fits from `tflops` per GPU."""
    heads, kv_heads, head_dim = shape
    fits, total = None, start
    while True:
        step, sharding = ring_step(n, total)
        spec = [jax.ShapeDtypeStruct((1, total, h, head_dim), jnp.bfloat16, sharding=sharding)
                for h in (heads, kv_heads, kv_heads, heads)]
        ids = jax.ShapeDtypeStruct((1, total), jnp.int32, sharding=sharding)
        need = planned_bytes(step.lower(*spec, ids, ids).compile())
        print(f"  ring fwd+bwd at {total} tokens: {need / 2**30:.2f} GiB per GPU of "
              f"{limit / 2**30:.2f}", flush=True)
        if need > limit:
            break
        fits, total = total, total * 2
    seconds = 3.5 * 4 * fits**2 * heads * head_dim / 2 / n / (tflops * 1e12)
    print(f"longest ring fwd+bwd that fits: {fits} tokens ({fits // n} per GPU); one step "
          f"would take ~{seconds:.0f} s at the ring's measured {tflops:.0f} TF/s per GPU")
    return dict(scheme="ring, longest that fits", tokens=fits, estimated_step_s=seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-gpu", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--schemes", default="ring,ulysses,2d,allgather")
    parser.add_argument("--hlo", default=None, help="folder for the ring step's compiled HLO")
    parser.add_argument("--longest", action="store_true",
                        help="find the longest total sequence the ring's fwd+bwd fits")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="memory per device for --longest (default: what the device has)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n = jax.device_count()
    local, total = args.tokens_per_gpu, args.tokens_per_gpu * n
    shape = (args.heads, args.kv_heads, args.head_dim)
    per_gpu_flops = 3.5 * 4 * total**2 * args.heads * args.head_dim / 2 / n
    key = jax.random.key(0)

    q, k, v, do = inputs(local, *shape, key)
    rows, base = [], {}
    print(f"{n} x {jax.devices()[0].device_kind}; {local} tokens per GPU, {total} in all")
    print(f"{'scheme':>26} {'mesh':>6} {'f+b ms':>9} {'TF/s/GPU':>9} {'/cuDNN':>7} {'/ours':>6}")
    gpu = jax.default_backend() == "gpu"  # elsewhere (a CPU smoke run) both are XLA's
    for kernel in ("cudnn", "triton"):
        t = timed(fwd_bwd(lambda q, k, v, kernel=kernel: flash_attention(
            q, k, v, None, AttentionSpec(backend=kernel if gpu else "xla"))), q, k, v, do)
        base[kernel] = 3.5 * 4 * local**2 * args.heads * args.head_dim / 2 / t / 1e12
        name = f"one GPU, local ({kernel})"
        rows.append(dict(scheme=name, mesh="1", ms=t * 1e3, tflops=base[kernel]))
        print(f"{name:>26} {'1':>6} {t * 1e3:9.2f} {base[kernel]:9.1f}", flush=True)

    q, k, v, do = inputs(total, *shape, key)
    for name in args.schemes.split(","):
        (node, local_deg), attend = scheme(name, n)
        # Each scheme's own token layout: zigzag over its ring, natural order for Ulysses.
        perm = (zigzag_permutation(total, n) if name == "allgather" else
                layout_permutation(total, resolve_scheme(name, node, local_deg), node,
                                   local_deg))
        pos = jnp.asarray(perm, jnp.int32)[None]
        seg = jnp.zeros_like(pos)
        mesh = make_mesh(1, node, local_deg)
        seq, lse = P(None, SEQUENCE_AXES), P(None, None, SEQUENCE_AXES)
        sharded = jax.shard_map(lambda q, k, v, p, s, attend=attend: attend(
            q, k, v, Mask.self_attention(p, s)),
                                mesh=mesh, in_specs=(seq,) * 5, out_specs=(seq, lse))
        step = fwd_bwd(sharded)
        operands = [x[:, perm] for x in (q, k, v, do)]
        if name == "ring" and args.hlo:
            text = step.lower(*operands, pos, seg).compile().as_text()
            os.makedirs(args.hlo, exist_ok=True)
            with open(os.path.join(args.hlo, "ring_fwd_bwd.hlo.txt"), "w") as f:
                f.write(text)
            starts = len(re.findall(r"collective-permute-start", text))
            print(f"ring HLO: {starts} async collective-permute-start ops "
                  f"({'async: overlap possible' if starts else 'synchronous permutes'})")
        t = timed(step, *operands, pos, seg)
        tflops = per_gpu_flops / t / 1e12  # useful FLOPs: padded heads count as waste
        degree = ulysses_degree(resolve_scheme(name, node, local_deg), node, local_deg) \
            if name != "allgather" else 1
        layout = head_layout(args.heads, args.kv_heads, degree)
        note = (f"heads padded {args.heads} -> {layout.query_heads}, KV {args.kv_heads} -> "
                f"{layout.kv_heads * layout.repeat} copies" if layout.padded else "")
        rows.append(dict(scheme=name, mesh=f"{node}x{local_deg}", ms=t * 1e3, tflops=tflops,
                         vs_cudnn=tflops / base["cudnn"], vs_ours=tflops / base["triton"],
                         note=note))
        print(f"{name:>26} {node}x{local_deg:<4} {t * 1e3:9.2f} {tflops:9.1f} "
              f"{tflops / base['cudnn']:7.2f} {tflops / base['triton']:6.2f}  {note}",
              flush=True)
    if "ring" in args.schemes.split(",") and jax.default_backend() == "gpu":
        floor = ring_kernel_floor(n, local, shape, key)
        ring = next(r for r in rows if r["scheme"] == "ring")
        print(f"ring's kernels alone (one GPU, same calls): {floor * 1e3:.2f} ms; the ring adds "
              f"{ring['ms'] - floor * 1e3:.2f} ms ({1 - floor * 1e3 / ring['ms']:.1%} of its time)")
        rows.append(dict(scheme="ring kernels alone", ms=floor * 1e3))
    if args.longest:
        stats = jax.devices()[0].memory_stats() or {}
        limit = args.memory_gib * 2**30 if args.memory_gib else stats["bytes_limit"]
        ring = [r["tflops"] for r in rows if r["scheme"] == "ring"]
        if not ring:
            parser.error("--longest needs the ring scheme measured (in --schemes)")
        rows.append(longest_ring(n, shape, total, limit, ring[0]))
    meta = dict(devices=n, device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=time.strftime("%Y-%m-%d"), tokens_per_gpu=local)
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
