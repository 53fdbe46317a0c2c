"""The recipe's stages run one after another: `longvila-jax train`, `pipeline` and the demo.

A stage runs by its `train.objective`: next-token training (`train/loop.py`) or GRPO
(`rl/loop.py`). A pipeline config holds LongVILA's five stages and, when present,
LongVILA-R1's two after them (`configs/stages`: `STAGES`, `R1_STAGES`), each starting
from the previous one's final checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from longvila_jax.configs.stages import R1_STAGES, STAGES
from longvila_jax.rl.loop import train_grpo
from longvila_jax.train.loop import train


def run_stage(config: ml_collections.ConfigDict, workdir, *, progress: bool = True) -> Path:
    """Train (or resume, or skip if finished) one stage; returns its final checkpoint."""
    run = train_grpo if config.train.objective == "grpo" else train
    return run(config, workdir, progress=progress)


def run_stages(config: ml_collections.ConfigDict, workdir, *, progress: bool = True) -> Path:
    """Train the stages of a `stages/pipeline` config in order under `workdir/<n>_<stage>/`
    (the five, then R1's when the config holds them), each starting from the previous one's
    final checkpoint unless its `train.init_from` is set; finished stages are skipped, an
    interrupted one resumes. Returns the last final checkpoint."""
    missing = [stage for stage in STAGES if stage not in config]
    if missing:
        raise ValueError(f"pipeline config: stage {missing[0]!r} missing; stages: {STAGES}")
    previous = None
    order = [*STAGES, *(s for s in R1_STAGES if s in config)]
    for index, stage in enumerate(order, start=1):
        stage_cfg = config[stage]
        if previous is not None and not stage_cfg.train.init_from:
            stage_cfg.train.init_from = str(previous)
        previous = run_stage(stage_cfg, Path(workdir) / f"{index}_{stage}", progress=progress)
    return previous
