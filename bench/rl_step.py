"""One GRPO step on long videos, phase by phase, with MR-SP's reuse and without.

B prompts (a 16-token prefix, F random-pixel frames, a 32-token question), G answers of
`--answer-tokens` tokens each (sampled at temperature 1 with no stop, so every answer has
that length), then the update over the B x G rows prompt + answer, one row per minibatch
(a 50K-token row's activations are what fits), as `rl/loop.py` runs it:

- encode: each video through the vision tower and projector once (frames over the devices);
- rollout: each prompt prefilled once, G answers sampled from its shared cache, with the
  sampler's log-probabilities (`InferenceEngine.generate_ids_and_logprobs`);
- reference: the reference policy's log-probabilities of every row (a frozen copy);
- update: the GRPO loss's forward and backward and AdamW per row (`rl/policy_batch.py`).

`--shared` (one device or Ulysses) times the update and the reference pass as `rl/loop.py`
runs them there by default: each question's prompt computed once beside its G answers
(`rl/shared_prompt.py`), one question per minibatch. Without it, the rows prompt + answer
(`rl.shared_prompt=False`, and the only way under ring or 2D attention).
`--naive` times instead what a loop without MR-SP does: every
answer encodes its video and prefills its prompt again (G separate generations of one
answer per prompt), and every log-probability pass runs the vision tower on the frames
again instead of reusing the step's embeddings. The weights are the library's random ones
in `--dtype` (bfloat16: a 7B model's parameters, Adam moments, the reference and, during
the rollout only, the engine's copy fit one H200).

Each phase's first call compiles; phases made of repeated calls (rows, answers) are timed
over every call but the first and scaled to all of them, and say so (`*_timed_calls`).

  python bench/rl_step.py --model qwen2_7b --frames 256 --json r.jsonl
  python bench/rl_step.py --model qwen2_7b --frames 256 --shared --json r.jsonl
  python bench/rl_step.py --model qwen2_7b --frames 256 --mesh 1,1,2 --shared --json r.jsonl
  python bench/rl_step.py --model qwen2_7b --frames 256 --naive --json r.jsonl
  python bench/rl_step.py --model qwen2_7b --frames 256 --mesh 1,1,2 --json r.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from longvila_jax.checkpoint import build_model
from longvila_jax.configs import model_config
from longvila_jax.infer.decode import Sampling
from longvila_jax.infer.engine import InferenceEngine
from longvila_jax.parallel import fsdp, resolve_scheme
from longvila_jax.parallel.layout import Layout
from longvila_jax.parallel.mesh import make_mesh
from longvila_jax.parallel.mmsp import logprobs_fn
from longvila_jax.rl.grpo import LossConfig
from longvila_jax.rl.policy_batch import answer_rows, grpo_loss_fn, place
from longvila_jax.rl.shared_prompt import SCHEMES, shared_batch, shared_logprobs_fn, shared_loss_fn
from longvila_jax.train.step import make_optimizer_state, make_train_step, trainable_filter


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def repeated(calls):
    """(seconds for all `calls` estimated from all but the first, which compiles; the
    number timed): each call is a zero-argument function."""
    times = [timed(call)[0] for call in calls]
    rest = times[1:] or times
    return float(np.mean(rest)) * len(calls), len(rest)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_7b")
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--answers", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=256)
    parser.add_argument("--mesh", default="1,1,1", help="data,node,local (data must be 1)")
    parser.add_argument("--dtype", default="bfloat16", help="parameter dtype")
    parser.add_argument("--naive", action="store_true", help="no reuse (see the docstring)")
    parser.add_argument("--shared", action="store_true",
                        help="each prompt once per pass, a question per minibatch")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.shared and args.naive:
        parser.error("--shared: with reuse (not --naive)")

    rng = np.random.default_rng(0)
    config = model_config(args.model)
    config.model.update(dtype="bfloat16", param_dtype=args.dtype, remat="full")
    config.optim.update(learning_rate=1e-6, warmup_steps=0, total_steps=100)
    shape = tuple(int(x) for x in args.mesh.split(","))
    mesh = make_mesh(*shape)
    llm = config.model.llm
    scheme = resolve_scheme("auto", shape[1], shape[2], (llm.num_heads, llm.num_kv_heads))
    if args.shared and scheme not in SCHEMES:
        parser.error(f"--shared: the mesh's scheme {scheme!r} is not one of {SCHEMES}")
    layout = Layout(scheme, *shape)
    row = {"bench": "rl_step", "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
           "jax": jax.__version__, "model": args.model, "mesh": args.mesh, "scheme": scheme,
           "frames": args.frames, "prompts": args.prompts, "answers": args.answers,
           "answer_tokens": args.answer_tokens, "naive": args.naive, "shared": args.shared,
           "dtype": args.dtype}
    began = time.perf_counter()
    model = build_model(config)
    trainable = trainable_filter("^llm/")
    optimizer = make_optimizer_state(model, config.optim, trainable)
    fsdp.place(model, optimizer, mesh)
    reference = build_model(config)
    fsdp.place(reference, None, mesh)
    engine = InferenceEngine(model, mesh=mesh, scheme=scheme)
    engine.update_weights(model)  # a copy: the update donates the model's buffers
    row["setup_s"] = time.perf_counter() - began
    print(f"{row['device']}, scheme {scheme}, setup {row['setup_s']:.0f} s", flush=True)

    size = config.model.vision.image_size
    videos = [rng.uniform(-1, 1, (args.frames, size, size, 3)).astype(np.float32)
              for _ in range(args.prompts)]
    media = engine.media_token_id
    prompts = [np.concatenate([rng.integers(0, media - 1, 16),
                               np.full(args.frames * engine.tokens_per_frame, media),
                               rng.integers(0, media - 1, 32)]).astype(np.int32)
               for _ in range(args.prompts)]
    n = args.answers
    sampling = Sampling(args.answer_tokens, n, temperature=1.0, seed=1)
    try:
        if args.naive:  # every answer: encode, prefill, one answer
            single = dataclasses.replace(sampling, n=1)
            calls = [lambda p=p, j=j: engine.generate_ids_and_logprobs(
                [prompts[p]], engine.encode(videos[p]),
                sampling=dataclasses.replace(single, seed=j))
                for p in range(args.prompts) for j in range(n)]
            row["rollout_s"], row["rollout_timed_calls"] = repeated(calls)
            _, (ids, sampler) = timed(lambda: engine.generate_ids_and_logprobs(
                prompts, jax.numpy.concatenate([engine.encode(v) for v in videos]),
                [p * args.frames * engine.tokens_per_frame for p in range(args.prompts)],
                sampling=sampling))
            table = None
        else:
            row["encode_s"], tables = timed(lambda: [engine.encode(v) for v in videos])
            row["encode_s"], tables = timed(lambda: [engine.encode(v) for v in videos])
            table = jax.numpy.concatenate([t.reshape(-1, t.shape[-1]) for t in tables])
            offsets = [p * args.frames * engine.tokens_per_frame for p in range(args.prompts)]
            generate = lambda: engine.generate_ids_and_logprobs(
                prompts, table, offsets, sampling=sampling)
            timed(generate)  # compiles
            row["rollout_s"], (ids, sampler) = timed(generate)
        row["rollout_tokens_per_s"] = sum(len(a) for a in ids) / row["rollout_s"]
        print(f"rollout {row['rollout_s']:.1f} s", flush=True)
        engine.release_weights()  # as `rl/loop.py` does: the update holds one copy

        offsets = [p * args.frames * engine.tokens_per_frame for p in range(args.prompts)]
        if args.shared:
            batches, inputs = _shared_batches(prompts, ids, sampler, n, media, offsets, table,
                                              layout.group, rng)
            logprobs = jax.jit(shared_logprobs_fn(mesh, scheme))
            loss = shared_loss_fn(mesh, scheme, LossConfig())
        else:
            batches, inputs = _row_batches(prompts, ids, sampler, n, media, offsets, table,
                                           videos, layout, mesh, rng)
            logprobs = jax.jit(logprobs_fn(mesh, scheme))
            loss = grpo_loss_fn(mesh, scheme, LossConfig())
        refs = []
        row["reference_s"], row["reference_timed_calls"] = repeated(
            [lambda b=b: refs.append(logprobs(reference, *inputs(b))) or refs[-1]
             for b in batches])
        batches = [dataclasses.replace(b, ref_logprobs=r) for b, r in zip(batches, refs,
                                                                         strict=True)]
        print(f"reference {row['reference_s']:.1f} s", flush=True)
        step = make_train_step(loss, trainable)
        row["update_s"], row["update_timed_calls"] = repeated(
            [lambda b=b: step(model, optimizer, b) for b in batches])
        print(f"update {row['update_s']:.1f} s", flush=True)
        row["step_s"] = sum(row.get(k, 0.0) for k in ("encode_s", "rollout_s", "reference_s",
                                                       "update_s"))
        peak = [d.memory_stats() or {} for d in jax.local_devices()]
        row["peak_gib"] = max(p.get("peak_bytes_in_use", 0) for p in peak) / 2**30
    except Exception as err:  # out of memory included: recorded as a result
        row["error"] = str(err).splitlines()[0][:300]
    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


def _row_batches(prompts, ids, sampler, n, media, offsets, table, videos, layout, mesh, rng):
    """One row prompt + answer per minibatch (`rl/policy_batch.py`); with no `table`, the
    frames go through the tower in every pass."""
    batches = []
    for r in range(len(ids)):
        rows = answer_rows([prompts[r // n]], [ids[r]], 1, 2 * layout.group, media,
                           [offsets[r // n]] if table is not None else None)
        if table is None:
            rows = dataclasses.replace(rows, batch=dataclasses.replace(
                rows.batch, frames=videos[r // n][None]))
        batches.append(place(rows, layout, mesh, table, rows.per_token([sampler[r]]),
                             rng.normal(size=1)))
    return batches, lambda b: (b.tokens, b.table)


def _shared_batches(prompts, ids, sampler, n, media, offsets, table, group, rng):
    """One question per minibatch, its prompt once beside its n answers
    (`rl/shared_prompt.py`)."""
    batches = [shared_batch([prompt], [ids[q * n: (q + 1) * n]], [sampler[q * n: (q + 1) * n]],
                            [rng.normal(size=n)], media, [offsets[q]], table, group)
               for q, prompt in enumerate(prompts)]
    return batches, lambda b: (b.rows, b.table)


if __name__ == "__main__":
    main()
