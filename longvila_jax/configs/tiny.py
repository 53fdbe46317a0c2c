"""A tiny LongVILA (SigLIP-shaped tower, mlp_downsample, Qwen2-shaped LLM): seconds on a CPU."""

from longvila_jax.config import base_config


def get_config():
    config = base_config()
    model = config.model
    model.llm.update(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     rope_theta=10000.0, max_position_embeddings=4096, tie_embeddings=True,
                     attention_bias=True)
    model.vision.update(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                        patch_size=14, image_size=56, select_layer=-2)
    model.projector.type = "mlp_downsample"
    model.media.update(media_token_id=510, newline_token_id=10)
    return config
