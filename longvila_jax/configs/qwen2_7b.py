"""LongVILA 7B on Qwen2-7B; `qwen2_7b:1m` selects the 1M-token variant.

The 1M variant extends RoPE with theta 1,062,356,830 and linear scaling 4.
"""

from longvila_jax.config.presets import longvila_base


def get_config(variant: str = "base"):
    if variant not in ("base", "1m"):
        raise ValueError(f"qwen2_7b config variant {variant!r}: expected 'base' or '1m'")
    config = longvila_base()
    config.model.llm.update(family="qwen2", vocab_size=151648, hidden_size=3584,
                            intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                            head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                            max_position_embeddings=32768, tie_embeddings=False,
                            attention_bias=True)
    if variant == "1m":
        config.model.llm.rope_theta = 1_062_356_830.0
        config.model.llm.rope_scaling.update(type="linear", factor=4.0)
        config.model.llm.max_position_embeddings = 1_048_576
    config.model.media.update(media_token_id=151646, newline_token_id=198)
    return config
