"""LongVILA-R1's CoT SFT (between long SFT and GRPO): long SFT on answers in R1's format.

    longvila-jax train --config=stages/cot_sft:qwen2_7b --workdir=runs/6_cot_sft \
        --config.train.init_from=runs/5_long_sft/final \
        --config.data.tokenizer=runs/5_long_sft/final/tokenizer

The data are conversations whose answers reason, then answer in tags:
`<think>...</think><answer>B</answer>` to prompts written as eval-mcq's r1 style writes
them (`eval.mcq.build_r1_prompt`), so that GRPO (`stages/grpo`) starts from a policy that
keeps the format. LongVILA-R1 runs this stage on 18K reasoning samples; here long SFT's
settings at a tenth of its learning rate (at scale). In miniature (`:demo`) it is the R1
demo's first stage (`demo --rl`, `demo_r1.py`): 600 steps on needle questions about videos
of 8 to 32 frames, 177 s on a 2-core CPU. Time at scale: unmeasured.
"""

from longvila_jax.configs import MINIATURES
from longvila_jax.configs.stages import long_sft


def get_config(model: str = "qwen2_7b"):
    config = long_sft.get_config(model)
    mini = model in MINIATURES
    config.train.stage = "cot_sft"
    # In miniature 1e-3: at 2e-4 the demo model had not learnt the format after 300 steps
    # (loss 2.3); at 1e-3 it had (0.1). The demo's 28-token answers took 600 steps: after
    # 300 the greedy replies still mixed up the tags.
    config.optim.update(learning_rate=1e-3 if mini else 2e-6, total_steps=600 if mini else 1000,
                        warmup_steps=9 if mini else 30)
    config.data.sources = [dict(name="cot_sft", jsonl="data/cot_sft.jsonl", media_root="data",
                                weight=1.0)]
    return config
