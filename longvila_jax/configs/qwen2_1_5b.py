"""LongVILA 1.5B: Qwen2-1.5B with rope theta 15.3M over 65,536 positions."""

from longvila_jax.config.presets import longvila_base


def get_config():
    config = longvila_base()
    config.model.llm.update(family="qwen2", vocab_size=151648, hidden_size=1536,
                            intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                            head_dim=128, rms_norm_eps=1e-6, rope_theta=15_300_000.0,
                            max_position_embeddings=65536, tie_embeddings=True,
                            attention_bias=True)
    config.model.media.update(media_token_id=151646, newline_token_id=198)
    return config
