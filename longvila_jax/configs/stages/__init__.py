"""LongVILA's five training stages and LongVILA-R1's two, one config module each, in order.

| stage | trains | data |
| --- | --- | --- |
| `align` | projector | image / short-video captions |
| `pretrain` | projector + LLM | interleaved captions |
| `sft` | everything | image + short-video instructions |
| `context` | LoRA (q/k/v/o), embeddings, norms | long text |
| `long_sft` | everything | long-video instructions, MM-SP |
| `cot_sft` (R1) | everything | long-video answers in `<think>`/`<answer>` format |
| `grpo` (R1) | the LLM | video questions, the model's own answers (GRPO) |

Each module's `get_config(model)` is the whole experiment for one packaged model (`tiny`,
`demo`, `qwen2_1_5b`, `qwen2_7b`, `llama3_8b`): LongVILA's settings for the real models,
and, as big_vision's configs do for a local run, a miniature for `tiny` and `demo` that a
laptop CPU trains in minutes. The data sources are placeholders relative to the working
folder (`data/<stage>.jsonl`, media under `data/`): replace them with your files.
"""

from __future__ import annotations

import ml_collections

STAGES = ("align", "pretrain", "sft", "context", "long_sft")  # the order they train in
# LongVILA-R1's, after long SFT: `train`, `stages/pipeline:MODEL+r1` and `demo --rl`.
R1_STAGES = ("cot_sft", "grpo")


def training_stage(model: str, stage: str, *, trainable: str, seq_len, num_frames, max_frames,
                   batch_size, learning_rate, steps, kind: str = "conversations"
                   ) -> ml_collections.ConfigDict:
    """Model `model`'s config with one stage's settings. Each number is a pair (miniature,
    at scale): the first for `tiny` and `demo`, the second for the real models.

    `trainable`: regular expressions over parameter paths; `seq_len`: tokens per packed row;
    `num_frames`: frames sampled per video; `max_frames`: frames per packed row;
    `batch_size`: rows per step; `steps`: optimizer steps, on VILA's schedule (its Hugging
    Face Trainer settings: warmup 3 % then cosine, no weight decay), a run checkpoint every
    tenth of them and a log line every step in miniature (every 10 at scale). The data source
    is a placeholder, `data/<stage>.jsonl` with media under `data/`.
    """
    from longvila_jax.configs import MINIATURES, model_config

    config = model_config(model)
    pick = int(model not in MINIATURES)
    total = steps[pick]
    config.train.update(stage=stage, trainable=trainable, seq_len=seq_len[pick],
                        num_frames=num_frames[pick], max_frames=max_frames[pick],
                        batch_size=batch_size[pick], checkpoint_every=max(1, total // 10),
                        log_every=10 if pick else 1)
    config.optim.update(learning_rate=learning_rate[pick], total_steps=total,
                        warmup_steps=max(1, round(0.03 * total)), weight_decay=0.0)
    config.data.kind = kind
    config.data.sources = [dict(name=stage, jsonl=f"data/{stage}.jsonl", media_root="data",
                                weight=1.0)]
    return config
