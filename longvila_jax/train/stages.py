"""LongVILA's five training stages as configs: what each trains, on what, for how long.

| stage | trains | data | LongVILA's setting kept here |
| --- | --- | --- | --- |
| 1 align | projector | image / short-video captions | lr 1e-3 (VILA's align script) |
| 2 pretrain | projector + LLM | interleaved captions | lr 5e-5 |
| 3 sft | everything | image + short-video instructions | lr 2e-5 |
| 4 context | LoRA (q/k/v/o), embeddings, norms | long text | lr 2e-5, r=8, alpha=16, theta |
| 5 long_sft | everything | long-video instructions, MM-SP | lr 2e-5, 256-2048 frames |

Stage 4's settings are the paper's (arXiv 2408.10188, Sec. 3.2 and Table 7: LongLoRA-style
training with trainable embeddings and norms, theta 15.3M for 64K, 207M for 256K); stage 5
uses lr 2e-5 (the paper's range is 2e-5 to 5e-5) and 256 frames (up to 2048).
Warmup 3 % then cosine and weight decay 0 follow VILA's Hugging Face Trainer settings.

`stage_config(stage, model)` builds one stage's config; `model` is a config in `configs/`
(`tiny`, `demo`, `qwen2_1_5b`, `qwen2_7b`, `llama3_8b`). `tiny` and `demo` (the demo's
model) shrink lengths and step counts to what a laptop CPU trains in minutes. Data sources
are placeholders (`data/<stage>.jsonl`) to be replaced by the user's files.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from longvila_jax.config import load_file
from longvila_jax.parallel.schemes import host_degrees

STAGES = ("align", "pretrain", "sft", "context", "long_sft")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Regular expressions over parameter paths (`train.trainable`).
PROJECTOR = "^projector/"
LLM = "^llm/"
EVERYTHING = ".*"
LORA_EMBED_NORMS = "^llm/.*lora_,^llm/embed_tokens,^llm/.*norm"

_RECIPE = {
    # stage: (trainable, learning rate, data kind)
    "align": (PROJECTOR, 1e-3, "conversations"),
    "pretrain": (f"{PROJECTOR},{LLM}", 5e-5, "conversations"),
    "sft": (EVERYTHING, 2e-5, "conversations"),
    "context": (LORA_EMBED_NORMS, 2e-5, "text"),
    "long_sft": (EVERYTHING, 2e-5, "conversations"),
}

# Real scale: tokens per row, frames per video, frames per row, steps, rows per step.
_REAL = {
    "align": dict(seq_len=4096, num_frames=8, max_frames=64, total_steps=2000, batch_size=256),
    "pretrain": dict(seq_len=4096, num_frames=8, max_frames=64, total_steps=5000,
                     batch_size=256),
    "sft": dict(seq_len=8192, num_frames=8, max_frames=64, total_steps=5000, batch_size=128),
    "context": dict(seq_len=65536, num_frames=1, max_frames=0, total_steps=1000,
                    batch_size=32),
    "long_sft": dict(seq_len=262144, num_frames=256, max_frames=1024, total_steps=1000,
                     batch_size=32),
}

# Models trained at the miniature scale `_TINY` rather than `_REAL`.
MINIATURES = ("tiny", "demo")

# The demo's miniature (configs/demo.py, data.demo_corpus): 2 CPU cores, minutes in all.
# Everything starts from random weights, so the vision path is learnt in pretrain (every
# caption token depends on the image), the question-dependent answer in sft, and finding
# one frame among 32 in long_sft, which needs ~600 steps to still find it among 64 (V-NIAH
# at 64 frames after 400 steps: 83-89%; after 600: 100%).
_TINY = {
    "align": dict(seq_len=256, num_frames=4, max_frames=16, total_steps=30, batch_size=4,
                  learning_rate=3e-3),
    "pretrain": dict(seq_len=256, num_frames=4, max_frames=16, total_steps=200, batch_size=4,
                     learning_rate=1e-3),
    "sft": dict(seq_len=256, num_frames=4, max_frames=16, total_steps=400, batch_size=4,
                learning_rate=1e-3),
    "context": dict(seq_len=1024, num_frames=1, max_frames=0, total_steps=30, batch_size=2,
                    learning_rate=1e-3),
    "long_sft": dict(seq_len=512, num_frames=32, max_frames=64, total_steps=600, batch_size=2,
                     learning_rate=5e-4),
}

# Stage 4's RoPE theta by the positions it extends to (64K, 256K). The miniature's 1K-token
# extension raises theta a hundredfold: with tenfold, needles far before the question in
# videos longer than long_sft's were missed (V-NIAH at 128 frames 83%, hundredfold 97%).
CONTEXT_ROPE_THETA = {65536: 15_300_000.0, 262144: 207_100_000.0, 1024: 1_000_000.0}


def model_config(name: str) -> ml_collections.ConfigDict:
    """`configs/<name>.py`'s `get_config()`."""
    path = CONFIGS / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.py"))
        raise ValueError(f"stage config: unknown model {name!r}; known: {known}")
    return load_file(str(path))


def stage_config(stage: str, model: str = "qwen2_7b") -> ml_collections.ConfigDict:
    """One stage's full config (model, parallel, optim, train, data)."""
    if stage not in STAGES:
        raise ValueError(f"stage config: unknown stage {stage!r}; stages: {STAGES}")
    config = model_config(model)
    trainable, lr, kind = _RECIPE[stage]
    scale = _TINY if model in MINIATURES else _REAL
    sizes = dict(scale[stage])
    lr = sizes.pop("learning_rate", lr)
    steps = sizes.pop("total_steps")
    config.train.update(stage=stage, trainable=trainable, **sizes)
    config.train.checkpoint_every = max(1, steps // 10)
    config.train.log_every = 1 if model in MINIATURES else 10
    config.optim.update(learning_rate=lr, total_steps=steps,
                        warmup_steps=max(1, round(0.03 * steps)), weight_decay=0.0)
    config.data.kind = kind
    config.data.sources = [dict(name=stage, jsonl=f"data/{stage}.jsonl", media_root="data",
                                weight=1.0)]
    if STAGES.index(stage) >= STAGES.index("context"):
        # The extended RoPE stays for every later stage: they start from stage 4's weights.
        positions = scale["context"]["seq_len"]
        llm = config.model.llm
        llm.max_position_embeddings = max(positions, llm.max_position_embeddings)
        llm.rope_theta = CONTEXT_ROPE_THETA[positions]
    if stage == "context":
        config.model.lora.update(rank=8, alpha=16.0, targets="q_proj,k_proj,v_proj,o_proj")
    if stage == "long_sft" and model not in MINIATURES:
        config.model.remat = "full"
        llm = config.model.llm
        node, local = host_degrees(HOST_GPUS, (llm.num_heads, llm.num_kv_heads))
        config.parallel.update(node=node, local=local, attention="auto")
    return config


HOST_GPUS = 8  # long SFT's default mesh: one 8-GPU host


def pipeline_config(model: str = "qwen2_7b") -> ml_collections.ConfigDict:
    """All five stages, one sub-config per stage name (`--config.sft.optim...` overrides)."""
    return ml_collections.ConfigDict({stage: stage_config(stage, model) for stage in STAGES})


def run_stages(config: ml_collections.ConfigDict, workdir, *, progress: bool = True) -> Path:
    """Train the stages of a `pipeline_config` in order under `workdir/<n>_<stage>/`, each
    starting from the previous one's final checkpoint (unless its `train.init_from` is
    set); finished stages are skipped, an interrupted one resumes. Returns the last final
    checkpoint."""
    from longvila_jax.train.loop import train

    previous = None
    for index, stage in enumerate(STAGES, start=1):
        if stage not in config:
            raise ValueError(f"pipeline config: stage {stage!r} missing; stages: {STAGES}")
        stage_cfg = config[stage]
        if previous is not None and not stage_cfg.train.init_from:
            stage_cfg.train.init_from = str(previous)
        previous = train(stage_cfg, Path(workdir) / f"{index}_{stage}", progress=progress)
    return previous
