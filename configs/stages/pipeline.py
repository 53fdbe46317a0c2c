"""All five stages for `longvila-jax pipeline`; `:MODEL` picks configs/MODEL.py (default
qwen2_7b). Override one stage with `--config.<stage>.<key>=...`, e.g.
`--config.sft.optim.learning_rate=1e-5`."""

from longvila_jax.train.stages import pipeline_config


def get_config(model: str = "qwen2_7b"):
    return pipeline_config(model)
