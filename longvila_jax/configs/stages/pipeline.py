"""All five stages for `longvila-jax pipeline`, each under its name; with `+r1`, LongVILA-R1's
CoT SFT and GRPO after them.

    longvila-jax pipeline --config=stages/pipeline:qwen2_7b --workdir=runs \
        --config.align.train.init_from=ckpt/base --config.sft.optim.learning_rate=1e-5
    longvila-jax pipeline --config=stages/pipeline:qwen2_7b+r1 --workdir=runs \
        --config.grpo.rl.questions=data/grpo.jsonl

They train in order under `runs/<n>_<stage>/`, each from the previous one's final checkpoint
(`recipe.py`). `longvila-jax demo` runs `stages/pipeline:demo` on its synthetic corpus
(`demo.py`): 6 min 37 s with its V-NIAH grid on a 2-core CPU (README). At scale: unmeasured.
"""

import importlib

import ml_collections

from longvila_jax.configs.stages import R1_STAGES, STAGES


def get_config(arg: str = "qwen2_7b"):
    model, plus, extra = arg.partition("+")
    if plus and extra != "r1":
        raise ValueError(f"stages/pipeline:{arg}: after '+' only 'r1' (LongVILA-R1's stages)")
    stages = (*STAGES, *R1_STAGES) if plus else STAGES
    return ml_collections.ConfigDict(
        {stage: importlib.import_module(f"{__package__}.{stage}").get_config(model)
         for stage in stages})
