"""Stage 1, align: only the projector trains, on image and short-video captions.

    longvila-jax import-hf path/to/Qwen2-7B-Instruct ckpt/base \
        --vision=path/to/siglip-so400m-patch14-384 --projector=mlp_downsample
    longvila-jax train --config=stages/align:qwen2_7b --workdir=runs/1_align \
        --config.train.init_from=ckpt/base --config.data.tokenizer=ckpt/base/tokenizer

Learning rate 1e-3 as VILA's align script. Time at scale: unmeasured (docs/benchmarks.md
times single training steps, not stages). In miniature (`:tiny`, `:demo`) 30 steps; the
demo's five stages and its V-NIAH grid took 6 min 37 s in all on a 2-core CPU (README), this
stage not timed alone.
"""

from longvila_jax.configs.stages import training_stage


def get_config(model: str = "qwen2_7b"):
    # Pairs are (miniature, at scale); see `training_stage` for what each key means.
    return training_stage(model, "align", trainable="^projector/", seq_len=(256, 4096),
                          num_frames=(4, 8), max_frames=(16, 64), batch_size=(4, 256),
                          learning_rate=(3e-3, 1e-3), steps=(30, 2000))
