"""Stage 3 (sft) of LongVILA's recipe; `:MODEL` picks configs/MODEL.py (default qwen2_7b).

The settings and their sources are in longvila_jax/train/stages.py.
"""

from longvila_jax.train.stages import stage_config


def get_config(model: str = "qwen2_7b"):
    return stage_config("sft", model)
