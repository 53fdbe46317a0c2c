"""Stage 5, long SFT: everything trains on long-video instructions, sequence-parallel (MM-SP).

    longvila-jax train --config=stages/long_sft:qwen2_7b --workdir=runs/5_long_sft \
        --config.train.init_from=runs/4_context/final \
        --config.data.tokenizer=runs/4_context/final/tokenizer

On several hosts: launch/slurm.sbatch, launch/k8s-indexed-job.yaml. Learning rate 2e-5 (the
paper's range is 2e-5 to 5e-5), 256 frames per video (the paper goes up to 2,048) in
256K-token rows, stage 4's RoPE. The default mesh is one 8-GPU host: the widest Ulysses
degree that splits the heads unpadded, the rest a ring (Qwen2-7B: 2 x 4, Llama-3-8B: 1 x 8).
Time at scale: unmeasured as a stage; docs/benchmarks.md has one LongVILA-7B step at 128K
tokens (512 frames) on four H200 in 13.6 s (full remat), and 256K tokens fitting four H200
(not timed). In miniature (`:tiny`, `:demo`) 600 steps of finding one frame among 32, which
still finds it among 64 (V-NIAH at 64 frames: 83-89 % after 400 steps, 97.5 % after 600 in
the README's run); the demo's five stages and its V-NIAH grid took 6 min 37 s in all on a
2-core CPU (README), this stage not timed alone.
"""

from longvila_jax.configs import MINIATURES
from longvila_jax.configs.stages import context, training_stage
from longvila_jax.parallel.schemes import host_degrees

HOST_GPUS = 8  # the default mesh: one 8-GPU host


def get_config(model: str = "qwen2_7b"):
    # Pairs are (miniature, at scale); see `training_stage` for what each key means.
    config = training_stage(model, "long_sft", trainable=".*", seq_len=(512, 262144),
                            num_frames=(32, 256), max_frames=(64, 1024), batch_size=(2, 32),
                            learning_rate=(5e-4, 2e-5), steps=(600, 1000))
    mini = model in MINIATURES
    context.extend_rope(config.model.llm, miniature=mini)  # it starts from stage 4's weights
    if not mini:
        config.model.remat = "full"
        llm = config.model.llm
        node, local = host_degrees(HOST_GPUS, (llm.num_heads, llm.num_kv_heads))
        config.parallel.update(node=node, local=local, attention="auto")
    return config
