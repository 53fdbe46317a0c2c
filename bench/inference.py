"""Long-video inference benchmark: encoding, sequence-parallel prefill, cached decoding.

For each frame count (random pixels; 196 + 1 tokens per frame at 384 px for the 7B config) one
prompt is a 16-token text prefix, the video, and a 32-token question. Measured with the
library's own engine (`infer/engine.py`) on the devices given by `--mesh`:

- encode: vision tower + projector over every frame, frames spread over the devices;
- prefill: the whole prompt through the LLM (KV cache kept, sharded), first token sampled;
- decode, `--decode-tokens` tokens after the first, in three shapes: one answer (greedy);
  n = 8 sampled answers sharing the prompt's cache; B = 4 prompts (four videos' worth of
  cache) x n = 8 answers. Tokens/s over all answers, and the fraction of the memory bound:
  each step reads the LLM's weights and the prompts' KV caches once, at the device-to-device
  copy bandwidth measured in the same run;
- with `--questions Q`, at the first frame count only: answering Q questions (16 new tokens
  each) about one video with the embeddings cached (encode once) and without (encode per
  question).

`--hf-dir DIR` also writes the model's LLM as a Hugging Face folder (`interop.write_hf`,
the same random weights) and the first frame count's prompt embeddings there; `--hf DIR`,
run next as its own process (so that torch has the GPU's memory), times Hugging Face
transformers `generate` from those embeddings, batch 1 greedy and 8 sampled answers
(`num_return_sequences`), the baseline a PyTorch user would pick.

Each phase runs once to compile and is then timed once (a 2048-frame prefill on one GPU
takes minutes). Rows are appended to `--json` as they finish, so a run cut short keeps what
it measured. Run one `--mesh` per process (JAX keeps the first engine's memory).

`--longest SECONDS` looks instead for the longest video whose prefill + one decoded token
runs: from the last `--frames` count it doubles (then bisects once) while XLA's compiled
memory analysis of the prefill fits `--memory-gib` per device, and runs each count that fits
(encode, prefill, one decode step; first call, compilation included) while the next run,
extrapolated quadratically from the last, still ends within SECONDS. It stops at whichever
limit comes first and says which.

  python bench/inference.py --model qwen2_7b --frames 256,1024 --json r.jsonl --hf-dir hf
  python bench/inference.py --hf hf --json r.jsonl
  python bench/inference.py --model qwen2_7b --frames 256,1024,2048 --mesh 1,1,4 --json r.jsonl
  python bench/inference.py --model qwen2_7b --frames 2048 --mesh 1,2,4 --longest 480
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longvila_jax.checkpoint import build_model
from longvila_jax.configs import model_config
from longvila_jax.data.media import media_rows
from longvila_jax.infer.decode import Sampling
from longvila_jax.infer.engine import InferenceEngine
from longvila_jax.interop.hf_export import write_hf
from longvila_jax.models.longvila import splice_media
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


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy on one device (a read and a write per byte): 4 GiB
    on a GPU, far past its caches; 64 MiB elsewhere (tests on CPU)."""
    gib = 4.0 if jax.default_backend() == "gpu" else 1 / 16
    x = jnp.ones((int(gib * GIB) // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + 1)
    jax.block_until_ready(copy(x))
    start = time.perf_counter()
    for _ in range(5):
        y = copy(x)
    jax.block_until_ready(y)
    return 2 * x.nbytes * 5 / (time.perf_counter() - start)


def step_bytes(config, tokens: int, group: int) -> float:
    """Bytes one decoding step reads per device: the LLM's weights (bf16; the embedding
    table only a row per token, so not counted) and its share of `tokens` cached tokens."""
    llm = config.model.llm
    attention = llm.hidden_size * (llm.num_heads + 2 * llm.num_kv_heads) * llm.head_dim \
        + llm.num_heads * llm.head_dim * llm.hidden_size
    mlp = 3 * llm.hidden_size * llm.intermediate_size
    head = 0 if llm.tie_embeddings else llm.hidden_size * llm.vocab_size
    weights = 2 * (llm.num_layers * (attention + mlp) + head)
    cache = 2 * 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * tokens / group
    return weights + cache


def decoding(engine, config, ids, prefilled, tokens: int, n: int, bandwidth):
    """Tokens/s of `n` answers to each prompt of `prefilled` (from one prefill), and the
    fraction of the bound: the time of `tokens + 1` new tokens less that of 1 (the first
    comes from the prefill)."""
    prompts = prefilled[0].shape[0]
    times = [once(lambda new=new: engine.generate_ids_after(
        prefilled, sampling=Sampling(new, n, temperature=float(n > 1))))[0]
        for new in (1, tokens + 1)]
    rate = prompts * n * tokens / (times[1] - times[0])
    bound = prompts * n * bandwidth / step_bytes(config, prompts * len(ids), engine.group)
    return {f"decode_{prompts}x{n}_tokens_per_s": rate,
            f"decode_{prompts}x{n}_of_bound": rate / bound}


def measure(engine, config, frames: int, args, questions: int, rng, bandwidth) -> dict:
    """One frame count's row (an error, out of memory included, is recorded as a result)."""
    size = config.model.vision.image_size
    pixels = rng.uniform(-1, 1, (frames, size, size, 3)).astype(np.float32)
    ids = prompt(config, engine, frames, rng)
    row = {"frames": frames, "tokens": len(ids)}
    try:
        row["encode_s"], table = once(lambda: engine.encode(pixels))
        row["prefill_s"], _ = once(lambda: engine.generate_ids([ids], table, sampling=Sampling(1)))
        if args.decode_tokens:
            # B = 4 prompts, each reading its own copy of the video's embedding rows.
            rows = table.shape[0] * table.shape[1]
            for prompts, answers in ((1, (1, 8)), (4, (8,))):
                prefilled = engine.prefill([ids] * prompts, jnp.concatenate([table] * prompts),
                                           [i * rows for i in range(prompts)])
                for n in answers:
                    row.update(decoding(engine, config, ids, prefilled, args.decode_tokens, n,
                                        bandwidth))
                del prefilled
        if questions:
            asked = [prompt(config, engine, frames, rng) for _ in range(questions)]

            def answer(cached: bool):
                shared = engine.encode(pixels) if cached else None
                for q in asked:
                    out = engine.generate_ids([q], shared if cached else engine.encode(pixels),
                                              sampling=Sampling(16))
                return out

            row["questions"] = questions
            row["cached_s"], _ = once(lambda: answer(True))
            row["uncached_s"], _ = once(lambda: answer(False))
    except Exception as err:
        row["error"] = str(err).splitlines()[0][:200]
    return row, ids, (table if "encode_s" in row else None)


def hf_baseline(folder: Path, tokens: int) -> list[dict]:
    """Hugging Face transformers `generate` from the saved embeddings: batch 1 greedy and 8
    sampled answers, decode tokens/s after the prefill (each timed on its second call)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder / "export" / "llm", dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    embeds = torch.from_numpy(np.load(folder / "prompt_embeds.npy")).to("cuda", torch.bfloat16)
    with torch.inference_mode():  # CUDA and cuBLAS set-up, outside the timings
        model.generate(inputs_embeds=embeds[:, :64], max_new_tokens=2, pad_token_id=0)
    rows = []
    for n in (1, 8):
        def run(new, n=n):
            with torch.inference_mode():
                model.generate(inputs_embeds=embeds, max_new_tokens=new, min_new_tokens=new,
                               do_sample=n > 1, temperature=1.0, top_p=1.0,
                               num_return_sequences=n, eos_token_id=None, pad_token_id=0)
            torch.cuda.synchronize()

        row = {"bench": "inference_hf", "device": torch.cuda.get_device_name(),
               "transformers": transformers.__version__, "torch": torch.__version__,
               "tokens": embeds.shape[1], "answers": n}
        try:  # one timed call each (a batch-8 prefill of a long prompt takes many seconds)
            timings = []
            for new in (1, tokens + 1):
                start = time.perf_counter()
                run(new)
                timings.append(time.perf_counter() - start)
            row["decode_tokens_per_s"] = n * tokens / (timings[1] - timings[0])
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        except torch.OutOfMemoryError as err:
            row["error"] = str(err).splitlines()[0][:200]
        torch.cuda.empty_cache()
        print(f"transformers {transformers.__version__}, {row['tokens']} tokens, {n} answers: "
              + (f"{row['decode_tokens_per_s']:.1f} tok/s" if "error" not in row
                 else row["error"]), flush=True)
        rows.append(row)
    return rows


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
    engine.generate_ids([ids], table, sampling=Sampling(2))
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
    parser.add_argument("--hf-dir", type=Path, default=None,
                        help="write the HF baseline's weights and prompt here")
    parser.add_argument("--hf", type=Path, default=None,
                        help="time transformers generate from an --hf-dir folder (only)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    def record(rows):
        if args.json:
            with open(args.json, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    if args.hf is not None:
        record(hf_baseline(args.hf, args.decode_tokens))
        return
    rng = np.random.default_rng(0)
    config = model_config(args.model)
    config.model.update(dtype="bfloat16", param_dtype="bfloat16")
    mesh = make_mesh(*map(int, args.mesh.split(",")))
    model = build_model(config)
    if args.hf_dir is not None:  # the stacked weights, as checkpoints hold them
        args.hf_dir.mkdir(parents=True, exist_ok=True)
        write_hf(config, {path: np.asarray(value) for path, value in
                          nnx.to_flat_state(nnx.state(model, nnx.Param))},
                 args.hf_dir / "export", progress=False)
    engine = InferenceEngine(model, mesh=mesh, scheme=args.attention)
    model = engine.model  # one copy of the layers' weights on the device, the engine's
    device = f"{jax.device_count()}x {jax.devices()[0].device_kind}"
    bandwidth = copy_bandwidth()
    print(f"{device}, jax {jax.__version__}, scheme {engine.scheme}, mesh {args.mesh}, "
          f"copy {bandwidth / 1e9:.0f} GB/s")
    meta = {"bench": "inference", "device": device, "jax": jax.__version__,
            "model": args.model, "mesh": args.mesh, "scheme": engine.scheme,
            "copy_gb_s": bandwidth / 1e9, "decode_tokens": args.decode_tokens}
    if args.longest is not None:
        print(f"{'frames':>7} {'tokens':>9} {'prefill memory':>14}")
        record([{**meta, "longest": True, **r} for r in longest(engine, config, args, rng)])
        return
    counts = [int(f) for f in args.frames.split(",")]
    for frames in counts:
        row, ids, table = measure(engine, config, frames, args,
                                  args.questions if frames == counts[0] else 0, rng, bandwidth)
        row = {**meta, **row}
        if args.hf_dir is not None and frames == counts[0] and table is not None:
            embeds = splice_media(model.llm.embed(jnp.asarray(ids)[None]),
                                  table.reshape(-1, table.shape[-1]),
                                  jnp.asarray(media_rows(ids[None], model.media_token_id)))
            np.save(args.hf_dir / "prompt_embeds.npy", np.asarray(embeds, np.float32))
        decode = "  ".join(f"{p}x{n}: {row[f'decode_{p}x{n}_tokens_per_s']:.1f} tok/s "
                           f"({row[f'decode_{p}x{n}_of_bound']:.0%} of bound)"
                           for p, n in ((1, 1), (1, 8), (4, 8))
                           if f"decode_{p}x{n}_tokens_per_s" in row)
        print(f"{frames:>7} frames {row['tokens']:>8} tokens  encode "
              f"{row.get('encode_s', float('nan')):.2f} s  prefill "
              f"{row.get('prefill_s', float('nan')):.2f} s  {decode}"
              + (f"  {args.questions} questions: cached {row['cached_s']:.1f} s, uncached "
                 f"{row['uncached_s']:.1f} s" if "cached_s" in row else "")
              + (f"  {row['error']}" if "error" in row else ""), flush=True)
        record([row])


if __name__ == "__main__":
    main()
