"""Stage 2, pretrain: the projector and the LLM train on interleaved captions.

    longvila-jax train --config=stages/pretrain:qwen2_7b --workdir=runs/2_pretrain \
        --config.train.init_from=runs/1_align/final \
        --config.data.tokenizer=runs/1_align/final/tokenizer

Learning rate 5e-5. Time at scale: unmeasured (docs/benchmarks.md times single training
steps, not stages). In miniature (`:tiny`, `:demo`) 200 steps, where the random vision path
is learnt (every caption token depends on the image); the demo's five stages and its V-NIAH
grid took 6 min 37 s in all on a 2-core CPU (README), this stage not timed alone.
"""

from longvila_jax.configs.stages import training_stage


def get_config(model: str = "qwen2_7b"):
    # Pairs are (miniature, at scale); see `training_stage` for what each key means.
    return training_stage(model, "pretrain", trainable="^projector/,^llm/",
                          seq_len=(256, 4096), num_frames=(4, 8), max_frames=(16, 64),
                          batch_size=(4, 256), learning_rate=(1e-3, 5e-5), steps=(200, 5000))
