"""The packaged configs: the models and LongVILA's training stages, in the wheel.

`--config=NAME[:ARG]` (and `load_file`, `load.py`) takes `longvila_jax/configs/NAME.py`'s
`get_config(ARG)`: the models `tiny`, `demo`, `qwen2_1_5b`, `qwen2_7b` (`:1m`) and
`llama3_8b`, and the stages `stages/align`, `stages/pretrain`, `stages/sft`,
`stages/context`, `stages/long_sft` and `stages/pipeline`, which take the model
(`stages/sft:qwen2_7b`). A config of your own is a file, `--config=my_config.py[:ARG]`, and
may start from a packaged one:

    from longvila_jax.configs.stages import sft

    def get_config():
        config = sft.get_config("qwen2_7b")
        config.data.sources = [dict(name="mine", jsonl="/data/mine.jsonl",
                                    media_root="/data", weight=1.0)]
        return config
"""

from __future__ import annotations

import importlib

import ml_collections

from longvila_jax.configs.load import load_file, packaged_names

__all__ = ["MINIATURES", "MODELS", "load_file", "model_config", "packaged_names"]

MODELS = ("tiny", "demo", "qwen2_1_5b", "qwen2_7b", "llama3_8b")
# Models every stage trains at a miniature scale (minutes on a laptop CPU) rather than at
# LongVILA's.
MINIATURES = ("tiny", "demo")


def model_config(name: str) -> ml_collections.ConfigDict:
    """The packaged model `name`'s `get_config()`; `ValueError` listing the models."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {list(MODELS)}")
    return importlib.import_module(f"{__name__}.{name}").get_config()
