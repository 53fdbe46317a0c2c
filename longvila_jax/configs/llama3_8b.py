"""LongVILA 8B on Llama-3-8B: rope theta 207,112,184 over 262,144 positions."""

from longvila_jax.config.presets import longvila_base


def get_config():
    config = longvila_base()
    config.model.llm.update(family="llama", vocab_size=128257, hidden_size=4096,
                            intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                            head_dim=128, rms_norm_eps=1e-5, rope_theta=207_112_184.0,
                            max_position_embeddings=262144, tie_embeddings=False,
                            attention_bias=False)
    config.model.media.update(media_token_id=128256, newline_token_id=198)
    return config
