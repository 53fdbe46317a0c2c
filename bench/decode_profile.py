"""Where a decoding step's time goes, and how far it is from the memory bound.

One long prompt (a 16-token prefix, `--frames` frames of random embeddings, a 32-token
question) is prefilled with the library's engine; then `--tokens` tokens are decoded
under XLA's profiler. Every GPU kernel of the decoding module is attributed to what it
computes, by the `jax.named_scope` of `infer/decode.py` in its HLO metadata (prompt
attention, tail attention, the cross-device merge, the sampler, the output projection)
or, for the rest, by its HLO op (the decoder layers' matrix products, which read the
weights; copies and slices; everything else). The bound is one read of the LLM's
weights and the prompt's KV cache per step at the device-to-device copy bandwidth
measured in the same run.

  python bench/decode_profile.py --model qwen2_7b --frames 256 --json profile.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

DUMP = tempfile.mkdtemp(prefix="decode_hlo_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP}"
                           " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*"
                           # CUDA graphs hide their kernels from the profiler
                           " --xla_gpu_enable_command_buffer=")

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from inference import copy_bandwidth, step_bytes  # noqa: E402
from jax.profiler import ProfileData  # noqa: E402

from longvila_jax.checkpoint import build_model  # noqa: E402
from longvila_jax.configs import model_config  # noqa: E402
from longvila_jax.infer.decode import Sampling  # noqa: E402
from longvila_jax.infer.engine import InferenceEngine  # noqa: E402
from longvila_jax.parallel.mesh import make_mesh  # noqa: E402

SCOPES = ("prompt_attention", "tail_attention", "merge", "sample", "logits")


def hlo_ops(dump: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (its HLO text, metadata op_name) of the optimized decode modules."""
    ops = {}
    for path in glob.glob(f"{dump}/*decode*after_optimizations.txt"):
        for line in Path(path).read_text().splitlines():
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
            if m:
                name = re.search(r'op_name="([^"]*)"', line)
                ops[m.group(1)] = (m.group(2), name.group(1) if name else "")
    return ops


def category(op: str, text: str, op_name: str) -> str:
    for scope in SCOPES:
        if f"/{scope}/" in op_name or op_name.endswith(f"/{scope}"):
            return scope
    if re.match(r"(loop_)?(dynamic_slice|slice|copy|pad)", op) or " copy(" in text:
        return "copies, slices and pads"
    if "gemm" in op or "__cublas" in text or op_name.endswith("dot_general"):
        return "layer matmuls (weights)"
    return "other (norms, RoPE, elementwise)"


def kernel_times(trace_dir: str) -> dict[str, float]:
    """Total GPU time (s) per HLO op of modules whose name holds 'decode'."""
    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    times = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name in ("XLA Modules", "XLA Ops", "Steps", "Source code", "Framework Ops"):
                continue
            for event in line.events:
                stats = {name: value for name, value in event.stats}
                if "decode" in str(stats.get("hlo_module", "")) and "hlo_op" in stats:
                    times[stats["hlo_op"]] += event.duration_ns * 1e-9
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_7b")
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--mesh", default="1,1,1")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    config = model_config(args.model)
    config.model.update(dtype="bfloat16", param_dtype="bfloat16")
    engine = InferenceEngine(build_model(config),
                             mesh=make_mesh(*map(int, args.mesh.split(","))))
    model = engine.model
    media = model.media_token_id
    rows = args.frames * engine.tokens_per_frame
    ids = np.concatenate([rng.integers(0, media - 1, 16), np.full(rows, media),
                          rng.integers(0, media - 1, 32)]).astype(np.int32)
    table = jnp.asarray(rng.normal(size=(rows, engine.hidden)) * 0.02, engine.dtype)
    n = args.tokens + 1
    engine.generate_ids([ids], table, sampling=Sampling(n))  # compile
    one = time.perf_counter()
    engine.generate_ids([ids], table, sampling=Sampling(1))
    one = time.perf_counter() - one
    start = time.perf_counter()
    engine.generate_ids([ids], table, sampling=Sampling(n))
    per_token = (time.perf_counter() - start - one) / args.tokens
    trace = tempfile.mkdtemp(prefix="decode_trace_")
    with jax.profiler.trace(trace):
        engine.generate_ids([ids], table, sampling=Sampling(n))
    ops, times = hlo_ops(DUMP), kernel_times(trace)
    for folder in (DUMP, trace):  # read: the dumps and the trace are not kept
        shutil.rmtree(folder, ignore_errors=True)
    by_category = collections.Counter()
    for op, seconds in times.items():
        by_category[category(op, *ops.get(op, ("", "")))] += seconds
    bandwidth = copy_bandwidth()
    bound = step_bytes(config, len(ids), engine.group) / bandwidth
    device = f"{jax.device_count()}x {jax.devices()[0].device_kind}"
    result = {"bench": "decode_profile", "device": device, "jax": jax.__version__,
              "model": args.model, "frames": args.frames, "prompt_tokens": len(ids),
              "ms_per_token": per_token * 1e3, "tokens_per_s": 1 / per_token,
              "bound_ms": bound * 1e3, "bound_tokens_per_s": 1 / bound,
              "copy_gb_s": bandwidth / 1e9,
              "gpu_ms_per_token": {k: v * 1e3 / args.tokens for k, v in by_category.items()},
              "top_ops": [(op, s * 1e3 / args.tokens, ops.get(op, ("?", ""))[0][:200])
                          for op, s in times.most_common(25)]}
    print(f"{device}, jax {jax.__version__}: {len(ids)}-token prompt, {per_token * 1e3:.2f} "
          f"ms/token ({1 / per_token:.1f} tok/s); bound {bound * 1e3:.2f} ms (weights and "
          f"cache read once at {bandwidth / 1e9:.0f} GB/s)")
    gpu_total = sum(by_category.values()) * 1e3 / args.tokens
    for name, seconds in by_category.most_common():
        print(f"  {name:<36} {seconds * 1e3 / args.tokens:7.3f} ms/token")
    print(f"  {'GPU busy':<36} {gpu_total:7.3f}   (host and gaps: "
          f"{per_token * 1e3 - gpu_total:.3f})")
    for op, ms, text in result["top_ops"][:15]:
        print(f"    {ms:7.3f} ms  {op}: {text[:150]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
