"""Stage 1, align: only the projector trains, on image and short-video captions.

    longvila-jax import-hf path/to/Qwen2-7B-Instruct ckpt/base \
        --vision=path/to/siglip-so400m-patch14-384 --projector=mlp_downsample
    longvila-jax train --config=stages/align:qwen2_7b --workdir=runs/1_align \
        --config.train.init_from=ckpt/base --config.data.tokenizer=ckpt/base/tokenizer

Learning rate 1e-3 as VILA's align script. Time at scale: unmeasured (docs/benchmarks.md
times single training steps, not stages). In miniature (`:tiny`, `:demo`) 30 steps; the
demo's five stages and its V-NIAH grid took 6 min 42 s in all on a 2-core CPU (README), this
stage not timed alone.
"""

from longvila_jax.configs import MINIATURES, model_config
from longvila_jax.configs.stages import set_length


def get_config(model: str = "qwen2_7b"):
    config = model_config(model)
    mini = model in MINIATURES
    config.train.update(
        stage="align",
        trainable="^projector/",  # regular expressions over parameter paths
        seq_len=256 if mini else 4096,  # tokens per packed row
        num_frames=4 if mini else 8,  # frames sampled per video
        max_frames=16 if mini else 64,  # frames per packed row
        batch_size=4 if mini else 256,  # rows per step
    )
    config.optim.learning_rate = 3e-3 if mini else 1e-3
    set_length(config, 30 if mini else 2000, miniature=mini)
    config.data.kind = "conversations"
    config.data.sources = [dict(name="align", jsonl="data/align.jsonl", media_root="data",
                                weight=1.0)]
    return config
