"""Training-step benchmark: step time, tokens/s/GPU, MFU and peak memory per remat policy.

The step is the library's own (`train.loop.setup`: MM-SP loss, FSDP over the whole mesh,
AdamW, bf16 compute with float32 parameters), on a synthetic packed batch of one sequence:
`--frames` video frames (random pixels, 196 + 1 tokens each at 384 px) after a short text
prefix, random text after them. MFU counts model FLOPs (`train/flops.py`: linear layers and
causal attention, 3x the forward; rematerialisation not counted) over the dense bf16 peak.

`--longest` doubles the sequence from `--seq` while XLA's compiled memory analysis of the
step fits `--memory-gib`, then bisects `--bisect` times between the longest fit and the
first failure, with the given remat policies (compiles only, no run).
`--torch` times, instead, the baseline a PyTorch user would pick for a text-only LLM step:
a Hugging Face transformers Qwen2 with SDPA attention, gradient checkpointing, bf16
autocast and fused AdamW, on one GPU (a separate process: JAX holds most GPU memory).
Several `--remat` policies run one per child process: the device's peak-memory counter
only grows within a process (a later policy would report an earlier one's peak), and a
policy that ran out of memory leaves nothing behind for the next (`--json` appends).

  python bench/train_step.py --model qwen2_1_5b --seq 32768 --remat none,selective,dots \
      --json out.jsonl
  python bench/train_step.py --model qwen2_1_5b --seq 32768 --torch --json out.jsonl
  python bench/train_step.py --model qwen2_7b --seq 131072 --frames 512 --mesh 1,1,4 \
      --remat full --longest full
  XLA_FLAGS=--xla_gpu_enable_command_buffer= python bench/train_step.py ... --profile DIR
      (then `python bench/profile_breakdown.py DIR`: where the step's GPU time goes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

import jax
import numpy as np

from longvila_jax.configs import model_config
from longvila_jax.data.batch import from_rows
from longvila_jax.memory import planned_bytes
from longvila_jax.train import flops
from longvila_jax.train.loop import setup, to_model_batch

GIB = 1 << 30
LONGEST_STEP = 16384  # --longest's bisection granularity (tokens)


def bench_config(args, remat: str, seq: int):
    config = model_config(args.model)
    config.model.update(remat=remat, dtype="bfloat16", param_dtype="float32",
                        attention_backend=args.kernel, scan_layers=not args.unroll)
    data, node, local = args.mesh
    config.parallel.update(data=data, node=node, local=local, attention=args.attention)
    config.train.update(seq_len=seq, max_frames=max(args.frames, 1), batch_size=data,
                        trainable=".*")
    config.optim.update(total_steps=1000, warmup_steps=10)
    return config


def synthetic_batch(config, rows: int, seq: int, frames: int, tokens_per_frame: int, rng):
    """A packed batch: `rows` sequences of `seq` tokens, each one document with `frames`
    frames after a 64-token prefix."""
    media = config.model.media.media_token_id
    ids = rng.integers(0, min(media, config.model.llm.vocab_size) - 1, (rows, seq))
    span = frames * tokens_per_frame
    if span + 64 > seq:
        raise SystemExit(f"--frames {frames} take {span} tokens: more than --seq {seq}")
    ids[:, 64:64 + span] = media
    labels = np.where(ids == media, -100, ids)
    size = config.model.vision.image_size
    pixels = rng.standard_normal((rows, frames, size, size, 3)).astype(np.float32) \
        if frames else None
    batch = dataclasses.asdict(from_rows(ids, labels, pixels, segment_ids=np.ones_like(ids),
                                         media_token_id=media))
    if frames:
        batch["frame_segment_ids"] = np.ones((rows, frames), np.int32)
    return batch


def peak_bytes() -> int:
    return max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())


def measure(args, remat: str, rng) -> dict:
    config = bench_config(args, remat, args.seq)
    run = setup(config)
    tokens_per_frame = run.model.media_tokens_per_frame
    packed = synthetic_batch(config, args.mesh[0], args.seq, args.frames, tokens_per_frame, rng)
    batch = to_model_batch(run, packed)
    began = time.perf_counter()
    jax.block_until_ready(run.step_fn(run.model, run.optimizer, batch))
    compile_s = time.perf_counter() - began
    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        jax.block_until_ready(run.step_fn(run.model, run.optimizer, batch))
        times.append(time.perf_counter() - began)
    step = float(np.median(times))
    if args.profile:  # one more step under XLA's profiler (bench/profile_breakdown.py reads it)
        with jax.profiler.trace(f"{args.profile}/{args.model}-{args.seq}-{remat}-{args.kernel}"):
            jax.block_until_ready(run.step_fn(run.model, run.optimizer, batch))
    devices = run.mesh.devices.size
    model_flops = flops.train_step_flops(config.model, packed["segment_ids"], args.frames
                                         * args.mesh[0])
    peak = flops.peak_tflops(jax.devices()[0].device_kind)
    return {"model": args.model, "remat": remat, "unrolled": args.unroll, "seq": args.seq,
            "frames": args.frames, "mesh": list(args.mesh), "kernel": args.kernel,
            "step_s": step, "compile_s": compile_s,
            "tokens_per_s_per_gpu": args.seq * args.mesh[0] / step / devices,
            "model_tflops_per_gpu": model_flops / step / devices / 1e12,
            "mfu": model_flops / step / devices / (peak * 1e12) if peak else None,
            "peak_gib": peak_bytes() / GIB}


def fits(args, remat: str, seq: int, rng) -> tuple[bool, float]:
    """Whether the compiled step at `seq` tokens fits `--memory-gib` per device, and its
    footprint (GiB, `memory.planned_bytes`: the step donates the model and optimizer like
    the library's own), by XLA's memory analysis."""
    from flax import nnx

    config = bench_config(args, remat, seq)
    run = setup(config)
    frames = min(args.frames * seq // args.seq, (seq - 64) // run.model.media_tokens_per_frame)
    packed = synthetic_batch(config, args.mesh[0], seq, frames,
                             run.model.media_tokens_per_frame, rng)
    batch = to_model_batch(run, packed)
    graphdef, state = nnx.split((run.model, run.optimizer))

    def pure(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        out = run.step_fn(model, optimizer, batch)
        return nnx.state((model, optimizer)), out

    try:
        compiled = jax.jit(pure, donate_argnums=0).lower(state, batch).compile()
    except Exception as e:  # XLA reports an impossible allocation at compile time
        if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
            return False, float("inf")
        raise
    used = planned_bytes(compiled) / GIB
    return used <= args.memory_gib, used


def torch_baseline(args) -> dict:
    """HF transformers Qwen2 (same shapes), one GPU, text only."""
    import torch
    import transformers

    llm = model_config(args.model).model.llm
    cfg = transformers.Qwen2Config(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        max_position_embeddings=max(args.seq, llm.max_position_embeddings),
        rope_theta=llm.rope_theta, tie_word_embeddings=llm.tie_embeddings,
        attn_implementation="sdpa")
    model = transformers.Qwen2ForCausalLM(cfg).cuda()
    model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, llm.vocab_size - 2, (1, args.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    try:
        step()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.steps):
            began = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
    except torch.OutOfMemoryError:
        return {"model": f"{args.model} (torch)", "seq": args.seq, "error": "out of memory"}
    seconds = float(np.median(times))
    cfg_model = model_config(args.model).model
    cfg_model.vision.enabled = False
    model_flops = flops.train_step_flops(cfg_model, np.ones((1, args.seq)), 0)
    peak = flops.peak_tflops(torch.cuda.get_device_name())
    return {"model": f"{args.model} (torch)", "remat": "full", "seq": args.seq, "frames": 0,
            "mesh": [1, 1, 1], "step_s": seconds, "tokens_per_s_per_gpu": args.seq / seconds,
            "model_tflops_per_gpu": model_flops / seconds / 1e12,
            "mfu": model_flops / seconds / (peak * 1e12) if peak else None,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_1_5b")
    parser.add_argument("--seq", type=int, default=32768, help="tokens per sequence")
    parser.add_argument("--frames", type=int, default=0, help="video frames per sequence")
    parser.add_argument("--mesh", default="1,1,1", help="data,node,local")
    parser.add_argument("--attention", default="auto", help="sequence-parallel scheme")
    parser.add_argument("--kernel", default="auto", help="model.attention_backend")
    parser.add_argument("--remat", default="none,selective,dots,full",
                        help="policies to time: none, selective, dots, offload, full")
    parser.add_argument("--unroll", action="store_true",
                        help="model.scan_layers = False: layers unrolled, not scanned")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--longest", default="", help="remat policies to find the longest for")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="per-device budget for --longest (default: device memory)")
    parser.add_argument("--bisect", type=int, default=1,
                        help="--longest: bisection steps after doubling")
    parser.add_argument("--torch", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also trace one step with XLA's profiler into DIR")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.mesh = tuple(int(x) for x in args.mesh.split(","))
    rng = np.random.default_rng(0)
    rows = []
    policies = [r for r in args.remat.split(",") if r]
    if not args.child:
        print("| model | remat | tokens | frames | mesh | step s | tok/s/GPU | TF/s/GPU | MFU | "
              "peak GiB | compile s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- "
              "| --- | --- |", flush=True)
    if len(policies) > 1 and not args.torch:
        # Before this process touches a device: it would hold memory the children need.
        failed = []
        for remat in policies:
            # This command line with the later options overriding: one policy, no search.
            child = [sys.executable, __file__, *sys.argv[1:], "--child", "--remat", remat,
                     "--longest", ""]
            if subprocess.run(child).returncode:  # out of memory is a row, not a failure
                failed.append(remat)
        if failed:
            raise SystemExit(f"failed (see above): --remat {','.join(failed)}")
        if not args.longest:
            return
        policies = []

    def show(r):
        if "error" in r:
            print(f"| {r['model']} | | {r['seq']} | | | {r['error']} | | | | |", flush=True)
            return
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        remat = r["remat"] + (" unrolled" if r.get("unrolled") else "")
        compile_s = f"{r['compile_s']:.0f}" if "compile_s" in r else "-"  # torch: none
        print(f"| {r['model']} | {remat} | {r['seq']} | {r['frames']} | "
              f"{'x'.join(map(str, r['mesh']))} | {r['step_s']:.3f} | "
              f"{r['tokens_per_s_per_gpu']:.0f} | {r['model_tflops_per_gpu']:.1f} | {mfu} | "
              f"{r['peak_gib']:.1f} | {compile_s} |", flush=True)

    if args.torch:
        rows.append(torch_baseline(args))
        show(rows[-1])
        return _save(args, rows)
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}"
          f", attention kernel {args.kernel}")
    if args.memory_gib is None:
        stats = jax.local_devices()[0].memory_stats() or {}
        args.memory_gib = stats.get("bytes_limit", 16 * GIB) / GIB
    for remat in policies:
        try:
            rows.append(measure(args, remat, rng))
        except Exception as e:  # an out-of-memory policy is a result, not a crash
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            rows.append({"model": args.model, "seq": args.seq, "remat": remat,
                         "error": f"{remat}: out of memory"})
        show(rows[-1])
    for remat in [r for r in args.longest.split(",") if r]:
        seq, best, failed, halvings = args.seq, None, None, 0
        while True:
            ok, used = fits(args, remat, seq, rng)
            print(f"longest ({remat}): {seq} tokens -> {used:.2f} GiB per device "
                  f"({'fits' if ok else 'does not fit'} {args.memory_gib:.2f})", flush=True)
            best, failed = (seq, failed) if ok else (best, seq)
            if failed is None:
                seq *= 2
                continue
            # Bisect between the longest fit and the first failure, in LONGEST_STEP units.
            mid = (best + failed) // 2 // LONGEST_STEP * LONGEST_STEP if best else 0
            if halvings == args.bisect or mid <= (best or 0):
                break
            seq, halvings = mid, halvings + 1
        rows.append({"longest": remat, "seq": best, "next_fails": failed,
                     "mesh": list(args.mesh)})
    _save(args, rows)


def _save(args, rows):
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
