"""Stage 4, context extension: LoRA on the LLM, with its embeddings and norms, on long text.

    longvila-jax train --config=stages/context:qwen2_7b --workdir=runs/4_context \
        --config.train.init_from=runs/3_sft/final \
        --config.data.tokenizer=runs/3_sft/final/tokenizer

The paper's settings (arXiv 2408.10188, Sec. 3.2 and Table 7), LongLoRA-style: LoRA r=8,
alpha=16 on q/k/v/o, embeddings and norms trainable, learning rate 2e-5, 64K tokens with
RoPE theta 15.3M (207.1M for 256K); the adapters are merged into the final weights
(`train.merge_lora`). Time at scale: unmeasured (docs/benchmarks.md times single training
steps, not stages). In miniature (`:tiny`, `:demo`) 30 steps on 1K-token passkey texts; the
demo's five stages and its V-NIAH grid took 6 min 37 s in all on a 2-core CPU (README), this
stage not timed alone.
"""

import ml_collections

from longvila_jax.configs import MINIATURES
from longvila_jax.configs.stages import training_stage

POSITIONS = (1024, 65536)  # (miniature, at scale): the length the LLM is extended to


def get_config(model: str = "qwen2_7b"):
    # Pairs are (miniature, at scale); see `training_stage` for what each key means. Text
    # only; the adapters, embeddings and norms train.
    config = training_stage(model, "context", seq_len=POSITIONS, num_frames=(1, 1),
                            trainable="^llm/.*lora_,^llm/embed_tokens,^llm/.*norm",
                            max_frames=(0, 0), batch_size=(2, 32), learning_rate=(1e-3, 2e-5),
                            steps=(30, 1000), kind="text")
    config.model.lora.update(rank=8, alpha=16.0, targets="q_proj,k_proj,v_proj,o_proj")
    extend_rope(config.model.llm, miniature=model in MINIATURES)
    return config


def extend_rope(llm: ml_collections.ConfigDict, *, miniature: bool) -> None:
    """This stage's RoPE, which every later stage keeps (they start from its weights): theta
    15.3M for 64K positions. The miniature's 1K positions raise tiny's theta a hundredfold:
    with tenfold, needles far before the question in videos longer than long SFT's were
    missed (V-NIAH at 128 frames 83 %, hundredfold 97 %)."""
    positions = POSITIONS[not miniature]
    llm.max_position_embeddings = max(positions, llm.max_position_embeddings)
    llm.rope_theta = 1_000_000.0 if miniature else 15_300_000.0
