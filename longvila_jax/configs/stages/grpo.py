"""Stage 6 (LongVILA-R1), GRPO: the LLM learns from its own answers to video questions.

    longvila-jax train --config=stages/grpo:qwen2_7b --workdir=runs/6_grpo \
        --config.train.init_from=runs/5_long_sft/final \
        --config.data.tokenizer=runs/5_long_sft/final/tokenizer \
        --config.rl.questions=data/grpo.jsonl

Questions are eval-mcq's JSONL (`{video, question, options, answer}`); answers are asked
for as `<think>...</think><answer>LETTER</answer>` and rewarded 0.9 for the right option
(its letter, or its text, as the demo answers) and 0.1 for the format. Long-RL's
settings: AdamW at 1e-6, clipping 1.0, 8 answers per question (Long-RL uses 5),
temperature 1, KL (low-variance) weight 0.01, clip 0.2 / 0.3, dual clip 3; the LLM
trains, the vision tower and projector stay frozen (each video is encoded once and its
embeddings reused). LongVILA-R1 first runs SFT on `<think>`-formatted
answers: the `sft` or `long_sft` stage on such data. Time at scale: unmeasured.
"""

from longvila_jax.configs import MINIATURES
from longvila_jax.configs.stages import long_sft


def get_config(model: str = "qwen2_7b"):
    config = long_sft.get_config(model)  # stage 5's model, RoPE, remat and mesh
    mini = model in MINIATURES
    steps = 40 if mini else 1000
    # seq_len and max_frames are not read: a step's rows are its prompts and answers.
    config.train.update(stage="grpo", objective="grpo", trainable="^llm/",
                        checkpoint_every=max(1, steps // 10))
    config.optim.update(learning_rate=2e-4 if mini else 1e-6, total_steps=steps,
                        warmup_steps=0, end_lr_fraction=1.0)  # a constant rate, as Long-RL
    config.data.sources = []  # the questions are `rl.questions`
    config.rl.questions = "data/grpo.jsonl"
    config.rl.update(prompts_per_step=4 if mini else 2, answers=8,
                     max_new_tokens=40 if mini else 256)
    return config
