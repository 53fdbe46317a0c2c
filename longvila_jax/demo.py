"""`longvila-jax demo`: the whole LongVILA recipe in miniature, with nothing downloaded.

Writes a synthetic corpus (captions, instructions, passkey texts, needle videos) and its
tokenizer, trains the demo model (`stages/pipeline:demo`) through the five stages on whatever
devices there are (a laptop CPU: minutes), then runs the video needle-in-a-haystack
evaluation at the stage-5 frame count and at twice it. Everything lands in one work folder;
running it again resumes or skips what is done.
"""

from __future__ import annotations

from pathlib import Path

from longvila_jax.configs.stages import STAGES, pipeline
from longvila_jax.data.demo_corpus import write_demo_data
from longvila_jax.data.synthetic import write_haystack_video
from longvila_jax.demo_r1 import run_r1
from longvila_jax.recipe import run_stages

EVAL_SEED = 1_000_003  # needles for evaluation: a base seed the corpus never uses
EVAL_NEEDLES = 20  # per frame count and depth


def demo_config(data: dict, *, parallel: tuple[int, int, int] = (1, 1, 1)):
    """The demo model's pipeline config reading the corpus `write_demo_data` returned."""
    config = pipeline.get_config("demo")
    for stage in STAGES:
        stage_cfg = config[stage]
        stage_cfg.data.sources = list(data["stages"][stage])
        stage_cfg.data.tokenizer = data["tokenizer"]
        stage_cfg.parallel.data, stage_cfg.parallel.node, stage_cfg.parallel.local = parallel
    # Long SFT mixes 32-frame needle videos with 4-frame clips: sample by time, capped.
    config.long_sft.train.fps = data["fps"]
    return config


def run_demo(workdir, *, progress: bool = True, eval_frames: tuple[int, ...] | None = None,
             rl: bool = False):
    """Corpus, five stages, needle evaluation, and with `rl` LongVILA-R1's CoT SFT and GRPO
    stages (`demo_r1.run_r1`); returns (long SFT's final checkpoint, the needle result, the
    R1 summary or None)."""
    from longvila_jax.checkpoint import load_model
    from longvila_jax.eval.needle import evaluate, make_needles

    workdir = Path(workdir).absolute()
    data = write_demo_data(workdir / "data")
    config = demo_config(data)
    final = run_stages(config, workdir, progress=progress)
    frames = config.long_sft.train.num_frames
    eval_frames = eval_frames or (frames, 2 * frames)
    size = config.long_sft.model.vision.image_size
    haystack = workdir / "eval" / "haystack.mp4"
    if not haystack.exists():
        write_haystack_video(haystack, num_frames=4 * max(eval_frames), width=size,
                             height=size, seed=EVAL_SEED)
    result = evaluate(load_model(final), data["tokenizer"], family="qwen2",
                      haystack=str(haystack), frame_counts=list(eval_frames),
                      needles=make_needles(EVAL_NEEDLES, size, size, seed=EVAL_SEED),
                      image_size=size, out_dir=workdir / "eval", progress=progress)
    r1 = run_r1(workdir, data, final, progress=progress) if rl else None
    return final, result, r1
