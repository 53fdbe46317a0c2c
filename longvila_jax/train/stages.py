"""LongVILA's stages trained one after another: `longvila-jax pipeline` and the demo.

The stages' configs and their order are the packaged ones (`longvila_jax/configs/stages/`).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from longvila_jax.configs.stages import STAGES


def run_stages(config: ml_collections.ConfigDict, workdir, *, progress: bool = True) -> Path:
    """Train the stages of a `stages/pipeline` config in order under `workdir/<n>_<stage>/`,
    each starting from the previous one's final checkpoint (unless its `train.init_from` is
    set); finished stages are skipped, an interrupted one resumes. Returns the last final
    checkpoint."""
    from longvila_jax.train.loop import train

    previous = None
    for index, stage in enumerate(STAGES, start=1):
        if stage not in config:
            raise ValueError(f"pipeline config: stage {stage!r} missing; stages: {STAGES}")
        stage_cfg = config[stage]
        if previous is not None and not stage_cfg.train.init_from:
            stage_cfg.train.init_from = str(previous)
        previous = train(stage_cfg, Path(workdir) / f"{index}_{stage}", progress=progress)
    return previous
