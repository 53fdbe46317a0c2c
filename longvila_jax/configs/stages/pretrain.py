"""Stage 2, pretrain: the projector and the LLM train on interleaved captions.

    longvila-jax train --config=stages/pretrain:qwen2_7b --workdir=runs/2_pretrain \
        --config.train.init_from=runs/1_align/final \
        --config.data.tokenizer=runs/1_align/final/tokenizer

Learning rate 5e-5. Time at scale: unmeasured (docs/benchmarks.md times single training
steps, not stages). In miniature (`:tiny`, `:demo`) 200 steps, where the random vision path
is learnt (every caption token depends on the image); the demo's five stages and its V-NIAH
grid took 6 min 42 s in all on a 2-core CPU (README), this stage not timed alone.
"""

from longvila_jax.configs import MINIATURES, model_config
from longvila_jax.configs.stages import set_length


def get_config(model: str = "qwen2_7b"):
    config = model_config(model)
    mini = model in MINIATURES
    config.train.update(
        stage="pretrain",
        trainable="^projector/,^llm/",  # regular expressions over parameter paths
        seq_len=256 if mini else 4096,  # tokens per packed row
        num_frames=4 if mini else 8,  # frames sampled per video
        max_frames=16 if mini else 64,  # frames per packed row
        batch_size=4 if mini else 256,  # rows per step
    )
    config.optim.learning_rate = 1e-3 if mini else 5e-5
    set_length(config, 200 if mini else 5000, miniature=mini)
    config.data.kind = "conversations"
    config.data.sources = [dict(name="pretrain", jsonl="data/pretrain.jsonl",
                                media_root="data", weight=1.0)]
    return config
