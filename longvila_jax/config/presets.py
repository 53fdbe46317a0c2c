"""Shapes shared by the real models in longvila_jax/configs/: so400m SigLIP tower, mlp_downsample.

Token ids are those VILA's tokenizers assign (`<image>` appended after the base vocabulary,
"\\n" = 198 in both the Qwen2 and Llama-3 vocabularies); `import-hf` re-reads them from the
checkpoint's tokenizer.json.
"""

from longvila_jax.config.schema import base_config


def longvila_base():
    config = base_config()
    model = config.model
    # google/siglip-so400m-patch14-384: 27 layers, 1152 wide, 16 heads, MLP 4304.
    model.vision.update(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
                        patch_size=14, image_size=384, select_layer=-2,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    model.projector.type = "mlp_downsample"
    model.dtype = "bfloat16"
    model.param_dtype = "float32"
    model.remat = "full"
    return config
