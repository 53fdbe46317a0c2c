"""Stage 3, SFT: everything trains on image and short-video instructions.

    longvila-jax train --config=stages/sft:qwen2_7b --workdir=runs/3_sft \
        --config.train.init_from=runs/2_pretrain/final \
        --config.data.tokenizer=runs/2_pretrain/final/tokenizer

Learning rate 2e-5. Time at scale: unmeasured (docs/benchmarks.md times single training
steps, not stages). In miniature (`:tiny`, `:demo`) 400 steps, where the answer that depends
on the question is learnt; the demo's five stages and its V-NIAH grid took 6 min 42 s in all
on a 2-core CPU (README), this stage not timed alone.
"""

from longvila_jax.configs import MINIATURES, model_config
from longvila_jax.configs.stages import set_length


def get_config(model: str = "qwen2_7b"):
    config = model_config(model)
    mini = model in MINIATURES
    config.train.update(
        stage="sft",
        trainable=".*",  # regular expressions over parameter paths
        seq_len=256 if mini else 8192,  # tokens per packed row
        num_frames=4 if mini else 8,  # frames sampled per video
        max_frames=16 if mini else 64,  # frames per packed row
        batch_size=4 if mini else 128,  # rows per step
    )
    config.optim.learning_rate = 1e-3 if mini else 2e-5
    set_length(config, 400 if mini else 5000, miniature=mini)
    config.data.kind = "conversations"
    config.data.sources = [dict(name="sft", jsonl="data/sft.jsonl", media_root="data",
                                weight=1.0)]
    return config
