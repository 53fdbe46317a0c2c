"""Stage 3, SFT: everything trains on image and short-video instructions.

    longvila-jax train --config=stages/sft:qwen2_7b --workdir=runs/3_sft \
        --config.train.init_from=runs/2_pretrain/final \
        --config.data.tokenizer=runs/2_pretrain/final/tokenizer

Learning rate 2e-5. Time at scale: unmeasured (docs/benchmarks.md times single training
steps, not stages). In miniature (`:tiny`, `:demo`) 400 steps, where the answer that depends
on the question is learnt; the demo's five stages and its V-NIAH grid took 6 min 37 s in all
on a 2-core CPU (README), this stage not timed alone.
"""

from longvila_jax.configs.stages import training_stage


def get_config(model: str = "qwen2_7b"):
    # Pairs are (miniature, at scale); see `training_stage` for what each key means.
    return training_stage(model, "sft", trainable=".*", seq_len=(256, 8192),
                          num_frames=(4, 8), max_frames=(16, 64), batch_size=(4, 128),
                          learning_rate=(1e-3, 2e-5), steps=(400, 5000))
