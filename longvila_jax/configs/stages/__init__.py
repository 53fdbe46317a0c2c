"""LongVILA's five training stages, one config module each, and their order.

| stage | trains | data |
| --- | --- | --- |
| `align` | projector | image / short-video captions |
| `pretrain` | projector + LLM | interleaved captions |
| `sft` | everything | image + short-video instructions |
| `context` | LoRA (q/k/v/o), embeddings, norms | long text |
| `long_sft` | everything | long-video instructions, MM-SP |

Each module's `get_config(model)` is the whole experiment for one packaged model (`tiny`,
`demo`, `qwen2_1_5b`, `qwen2_7b`, `llama3_8b`): LongVILA's settings for the real models,
and, as big_vision's configs do for a local run, a miniature for `tiny` and `demo` that a
laptop CPU trains in minutes. The data sources are placeholders relative to the working
folder (`data/<stage>.jsonl`, media under `data/`): replace them with your files.
"""

from __future__ import annotations

import ml_collections

STAGES = ("align", "pretrain", "sft", "context", "long_sft")  # the order they train in


def set_length(config: ml_collections.ConfigDict, steps: int, *, miniature: bool) -> None:
    """`steps` optimizer steps on VILA's schedule (its Hugging Face Trainer settings: warmup 3 %
    then cosine, no weight decay); a run checkpoint every tenth of them, and a log line every
    step in miniature (every 10 at scale)."""
    config.optim.update(total_steps=steps, warmup_steps=max(1, round(0.03 * steps)),
                        weight_decay=0.0)
    config.train.update(checkpoint_every=max(1, steps // 10), log_every=1 if miniature else 10)
