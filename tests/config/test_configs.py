"""The packaged configs: the published shapes, a parameter count from first principles, the
miniature recipe the demo's result rests on, early errors."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from longvila_jax.checkpoint import build_model
from longvila_jax.config import ConfigError, validate
from longvila_jax.configs import load_file
from longvila_jax.configs.stages import R1_STAGES, STAGES, long_sft
from longvila_jax.models.longvila import LongVILA


def load(name: str, *args):
    return load_file(":".join([name, *args]))


def llm_param_count(llm) -> int:
    """Decoder parameters counted from the architecture definition."""
    d, f, hd = llm.hidden_size, llm.intermediate_size, llm.head_dim
    q, kv = llm.num_heads * hd, llm.num_kv_heads * hd
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if llm.attention_bias else 0)
    layer = attn + 3 * d * f + 2 * d
    head = 0 if llm.tie_embeddings else d * llm.vocab_size
    return llm.vocab_size * d + llm.num_layers * layer + d + head


def abstract(config):
    return nnx.eval_shape(lambda: LongVILA(validate(config).model, rngs=nnx.Rngs(0)))


def count(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("name,args", [("tiny", ()), ("qwen2_1_5b", ()), ("qwen2_7b", ()),
                                       ("qwen2_7b", ("1m",)), ("llama3_8b", ())])
def test_config_builds_with_expected_parameter_count(name, args):
    config = load(name, *args)
    model = abstract(config)
    assert count(model.llm) == llm_param_count(config.model.llm)


def test_published_shapes():
    q15, q7, q7m, l8 = (load("qwen2_1_5b"), load("qwen2_7b"), load("qwen2_7b", "1m"),
                        load("llama3_8b"))
    assert (q15.model.llm.rope_theta, q15.model.llm.max_position_embeddings) == (15.3e6, 65536)
    llm = q7.model.llm
    assert (llm.num_layers, llm.hidden_size, llm.num_heads, llm.num_kv_heads,
            llm.vocab_size) == (28, 3584, 28, 4, 151648)
    assert q7m.model.llm.rope_theta == 1_062_356_830
    assert (q7m.model.llm.rope_scaling.type, q7m.model.llm.rope_scaling.factor) == ("linear", 4)
    llm = l8.model.llm
    assert (llm.family, llm.num_layers, llm.num_kv_heads, llm.vocab_size, llm.rope_theta,
            llm.max_position_embeddings) == ("llama", 32, 8, 128257, 207_112_184, 262144)
    assert not llm.attention_bias and q7.model.llm.attention_bias
    vision = q7.model.vision
    assert (vision.num_layers, vision.hidden_size, vision.num_heads, vision.intermediate_size,
            vision.patch_size, vision.image_size) == (27, 1152, 16, 4304, 14, 384)
    # 27x27 patches -> zero-padded 28x28 -> 2x2 merge -> 196 tokens, plus the newline.
    assert abstract(q7).media_tokens_per_frame == 197
    # Approximate published sizes: Qwen2-1.5B, Qwen2-7B, Llama-3-8B decoders.
    assert abs(llm_param_count(q15.model.llm) / 1e9 - 1.54) < 0.01
    assert abs(llm_param_count(q7.model.llm) / 1e9 - 7.61) < 0.01
    assert abs(llm_param_count(l8.model.llm) / 1e9 - 8.03) < 0.01


@pytest.mark.parametrize("key,value", [
    ("model.llm.family", "gpt2"),
    ("model.llm.num_kv_heads", 3),
    ("model.llm.hidden_size", 0),
    ("model.llm.head_dim", 15),
    ("model.llm.rope_scaling.type", "yarn"),
    ("model.vision.num_heads", 5),
    ("model.vision.select_layer", -9),
    ("model.vision.image_size", 10),
    ("model.projector.type", "mlp9x"),
    ("model.media.media_token_id", 10**6),
    ("model.dtype", "float8"),
    ("model.attention_backend", "flash3"),
    ("model.scan_layers", None),  # ml_collections refuses other types; None it lets through
])
def test_invalid_value_fails_before_compute_naming_the_key(key, value):
    config = load("tiny")
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError) as err:
        build_model(config)
    assert str(err.value).startswith(key + ":")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("remat", ["selective", "offload", "full"])
def test_unrolled_layers_refuse_policies_cse_would_undo(remat):
    config = load("tiny")
    config.model.remat, config.model.scan_layers = remat, False
    with pytest.raises(ConfigError, match=rf"^model\.scan_layers: .*not '{remat}'"):
        validate(config)
    config.model.remat = "dots"
    validate(config)


def test_unknown_key_is_named():
    config = load("tiny")
    config.model.unlock()
    config.model.vison = {}
    with pytest.raises(ConfigError, match=r"^model\.vison:"):
        validate(config)


@pytest.mark.parametrize("model, node, local", [("qwen2_7b", 2, 4), ("llama3_8b", 1, 8)])
def test_long_sft_mesh_splits_heads_without_padding(model, node, local):
    """Stage 5's default 8-GPU host: the widest all-to-all the heads allow unpadded (Qwen2-7B's
    28 heads pad to 32 over 8), the rest a ring."""
    parallel = long_sft.get_config(model).parallel
    assert (parallel.data, parallel.node, parallel.local) == (1, node, local)


# The demo's recipe (stage: steps, learning rate, warmup, seq_len, num_frames, max_frames,
# batch_size): its V-NIAH result (README) was measured with exactly these.
MINIATURE = {
    "align": (30, 3e-3, 1, 256, 4, 16, 4),
    "pretrain": (200, 1e-3, 6, 256, 4, 16, 4),
    "sft": (400, 1e-3, 12, 256, 4, 16, 4),
    "context": (30, 1e-3, 1, 1024, 1, 0, 2),
    "long_sft": (600, 5e-4, 18, 512, 32, 64, 2),
}


@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_the_miniature_recipe_is_the_one_the_demo_was_measured_with(model):
    pipeline = load("stages/pipeline", model)
    assert sorted(pipeline) == sorted(STAGES)
    for stage, (steps, lr, warmup, seq_len, frames, max_frames, batch) in MINIATURE.items():
        config = pipeline[stage]
        assert (config.optim.total_steps, config.optim.learning_rate, config.optim.warmup_steps,
                config.train.seq_len, config.train.num_frames, config.train.max_frames,
                config.train.batch_size) == (steps, lr, warmup, seq_len, frames, max_frames,
                                             batch), stage
        assert config.train.stage == stage and config.train.log_every == 1
        assert config.train.checkpoint_every == max(1, steps // 10)
        later = STAGES.index(stage) >= STAGES.index("context")
        assert config.model.llm.rope_theta == (1e6 if later else 1e4), stage
        assert config.model.lora.rank == (8 if stage == "context" else 0), stage
    assert pipeline.long_sft.model.llm.num_layers == (4 if model == "demo" else 2)


def test_the_pipeline_with_r1_adds_cot_sft_and_grpo_after_the_five():
    pipeline = load("stages/pipeline", "demo+r1")
    assert sorted(pipeline) == sorted([*STAGES, *R1_STAGES])
    assert pipeline.grpo.train.objective == "grpo" and pipeline.cot_sft.train.stage == "cot_sft"
    assert pipeline.grpo.model.llm.rope_theta == pipeline.long_sft.model.llm.rope_theta
    with pytest.raises(ValueError, match="only 'r1'"):
        load("stages/pipeline", "demo+r2")
