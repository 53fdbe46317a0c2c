"""Long-video inference benchmark: encoding, sequence-parallel prefill, cached decoding.

For each frame count (random pixels; 196 + 1 tokens per frame at 384 px for the 7B config) one
prompt is a 16-token text prefix, the video, and a 32-token question. Measured with the
library's own engine (`infer/engine.py`) on the devices given by `--mesh`:

- encode: vision tower + projector over every frame, frames spread over the devices;
- prefill: the whole prompt through the LLM (KV cache kept, sharded), first token sampled;
- decode: tokens/s of greedy cached decoding after that prompt (batch 1);
- with `--questions Q`, at the first frame count only: answering Q questions (16 new tokens
  each) about one video with the embeddings cached (encode once) and without (encode per
  question).

Each phase runs once to compile and is then timed once (a 2048-frame prefill on one GPU
takes minutes). Rows are appended to `--json` as they finish, so a run cut short keeps what
it measured. Run one `--mesh` per process (JAX keeps the first engine's memory).

`--longest SECONDS` looks instead for the longest video whose prefill + one decoded token
runs: from the last `--frames` count it doubles (then bisects once) while XLA's compiled
memory analysis of the prefill fits `--memory-gib` per device, and runs each count that fits
(encode, prefill, one decode step; first call, compilation included) while the next run,
extrapolated quadratically from the last, still ends within SECONDS. It stops at whichever
limit comes first and says which.

  python bench/inference.py --model qwen2_7b --frames 256,1024,2048 --mesh 1,1,4 --json r.jsonl
  CUDA_VISIBLE_DEVICES=0 python bench/inference.py --model qwen2_7b --frames 256,1024,2048 \
      --mesh 1,1,1 --json r.jsonl
  python bench/inference.py --model qwen2_7b --frames 2048 --mesh 1,2,4 --longest 480
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from longvila_jax.checkpoint import build_model
from longvila_jax.configs import model_config
from longvila_jax.infer.engine import InferenceEngine
from longvila_jax.parallel.mesh import make_mesh

GIB = 1 << 30


def once(fn):
    """(seconds, result) of one call after a warm-up call that compiles."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return time.perf_counter() - start, result


def prompt(config, engine, frames: int, rng) -> np.ndarray:
    media = config.model.media.media_token_id
    text = [rng.integers(0, media - 1, n) for n in (16, 32)]
    return np.concatenate([text[0], np.full(frames * engine.tokens_per_frame, media),
                           text[1]]).astype(np.int32)


def measure(engine, config, frames: int, args, questions: int, rng) -> dict:
    """One frame count's row (an error, out of memory included, is recorded as a result)."""
    size = config.model.vision.image_size
    pixels = rng.uniform(-1, 1, (frames, size, size, 3)).astype(np.float32)
    ids = prompt(config, engine, frames, rng)
    row = {"frames": frames, "tokens": len(ids)}
    try:
        row["encode_s"], table = once(lambda: engine.encode(pixels))
        row["prefill_s"], _ = once(lambda: engine.generate_ids([ids], table, max_new_tokens=1))
        if args.decode_tokens:
            n = args.decode_tokens + 1
            total, _ = once(lambda: engine.generate_ids([ids], table, max_new_tokens=n))
            row["decode_tokens_per_s"] = args.decode_tokens / (total - row["prefill_s"])
        if questions:
            asked = [prompt(config, engine, frames, rng) for _ in range(questions)]

            def answer(cached: bool):
                shared = engine.encode(pixels) if cached else None
                for q in asked:
                    out = engine.generate_ids([q], shared if cached else engine.encode(pixels),
                                              max_new_tokens=16)
                return out

            row["questions"] = questions
            row["cached_s"], _ = once(lambda: answer(True))
            row["uncached_s"], _ = once(lambda: answer(False))
    except Exception as err:
        row["error"] = str(err).splitlines()[0][:200]
    return row


def run_once(engine, config, ids: np.ndarray, frames: int, rng) -> dict:
    """Encode `frames` frames and generate two tokens after prompt `ids` (prefill, then one
    decode step), each timed on its first call; 64 random frames are tiled to save host time
    and memory."""
    size = config.model.vision.image_size
    block = rng.uniform(-1, 1, (min(frames, 64), size, size, 3)).astype(np.float32)
    pixels = np.resize(block, (frames, size, size, 3))
    start = time.perf_counter()
    table = jax.block_until_ready(engine.encode(pixels))
    encoded = time.perf_counter()
    engine.generate_ids([ids], table, max_new_tokens=2)
    return {"encode_s": encoded - start, "generate_s": time.perf_counter() - encoded}


def longest(engine, config, args, rng) -> list[dict]:
    """Rows of the longest-video search (see the module docstring)."""
    limit = args.memory_gib * GIB if args.memory_gib else \
        jax.local_devices()[0].memory_stats()["bytes_limit"]
    began, frames, rows = time.perf_counter(), int(args.frames.split(",")[-1]), []
    ran, failed, bisected = None, None, False  # (frames, s) of the longest run; first failure
    while True:
        ids = prompt(config, engine, frames, rng)
        tokens = len(ids)
        need = engine.prefill_bytes(tokens, frames * engine.tokens_per_frame)
        row = {"frames": frames, "tokens": tokens, "prefill_gib": need / GIB,
               "limit_gib": limit / GIB}
        predicted = ran[1] * (frames / ran[0]) ** 2 if ran else 0.0
        if need > limit:
            row["stopped"] = "memory"
        elif time.perf_counter() - began + predicted > args.longest:
            row.update(stopped="time", predicted_s=predicted)
        else:
            try:
                row.update(run_once(engine, config, ids, frames, rng))
                ran = (frames, row["encode_s"] + row["generate_s"])
            except Exception as err:  # out of memory at run time despite the analysis
                row.update(stopped="error", error=str(err).splitlines()[0][:200])
        rows.append(row)
        print(f"{frames:>7} {tokens:>9} {need / GIB:>8.2f} GiB of {limit / GIB:.2f}  " + (
            f"encode {row['encode_s']:.1f} s, prefill + 1 decode step {row['generate_s']:.1f} s"
            if "generate_s" in row else {
                "memory": "does not fit", "error": row.get("error"),
                "time": f"not run: predicted {predicted:.0f} s would pass --longest"}[
                    row["stopped"]]), flush=True)
        if "stopped" in row:
            failed, reason = frames, row["stopped"]
        if failed is None:
            frames *= 2
        elif ran and not bisected and (ran[0] + failed) // 2 > ran[0]:
            frames, bisected = (ran[0] + failed) // 2, True
        else:
            break
    print(f"longest video run: {ran[0] if ran else 'none'} frames"
          + (f" (not run: {failed}, stopped by {reason})" if failed else ""))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_7b")
    parser.add_argument("--frames", default="256,1024,2048")
    parser.add_argument("--mesh", default="1,1,1", help="data,node,local (data must be 1)")
    parser.add_argument("--attention", default="auto", help="scheme: auto|ring|ulysses|2d")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--questions", type=int, default=0)
    parser.add_argument("--longest", type=float, default=None, metavar="SECONDS",
                        help="find the longest video that runs within SECONDS")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="per-device budget for --longest (default: device memory)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    config = model_config(args.model)
    config.model.update(dtype="bfloat16", param_dtype="bfloat16")
    mesh = make_mesh(*map(int, args.mesh.split(",")))
    engine = InferenceEngine(build_model(config), mesh=mesh, scheme=args.attention)
    device = f"{jax.device_count()}x {jax.devices()[0].device_kind}"
    print(f"{device}, jax {jax.__version__}, scheme {engine.scheme}, mesh {args.mesh}")
    meta = {"bench": "inference", "device": device, "jax": jax.__version__,
            "model": args.model, "mesh": args.mesh, "scheme": engine.scheme}
    if args.longest is not None:
        print(f"{'frames':>7} {'tokens':>9} {'prefill memory':>14}")
        rows = [{**meta, "longest": True, **r} for r in longest(engine, config, args, rng)]
        if args.json:
            with open(args.json, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        return
    print(f"{'frames':>7} {'tokens':>8} {'encode s':>9} {'prefill s':>10} {'decode tok/s':>13}")
    counts = [int(f) for f in args.frames.split(",")]
    for frames in counts:
        row = {**meta, **measure(engine, config, frames, args,
                         args.questions if frames == counts[0] else 0, rng)}
        print(f"{frames:>7} {row['tokens']:>8} {row.get('encode_s', float('nan')):>9.2f} "
              f"{row.get('prefill_s', float('nan')):>10.2f} "
              f"{row.get('decode_tokens_per_s', float('nan')):>13.1f}"
              + (f"  {args.questions} questions: cached {row['cached_s']:.1f} s, uncached "
                 f"{row['uncached_s']:.1f} s" if "cached_s" in row else "")
              + (f"  {row['error']}" if "error" in row else ""), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
