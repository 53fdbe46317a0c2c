"""All five stages for `longvila-jax pipeline`, each under its name.

    longvila-jax pipeline --config=stages/pipeline:qwen2_7b --workdir=runs \
        --config.align.train.init_from=ckpt/base --config.sft.optim.learning_rate=1e-5

They train in order under `runs/<n>_<stage>/`, each from the previous one's final checkpoint
(`train/stages.py`). `longvila-jax demo` runs `stages/pipeline:demo` on its synthetic corpus
(`demo.py`): 6 min 42 s with its V-NIAH grid on a 2-core CPU (README). At scale: unmeasured.
"""

import importlib

import ml_collections

from longvila_jax.configs.stages import STAGES


def get_config(model: str = "qwen2_7b"):
    return ml_collections.ConfigDict(
        {stage: importlib.import_module(f"{__package__}.{stage}").get_config(model)
         for stage in STAGES})
