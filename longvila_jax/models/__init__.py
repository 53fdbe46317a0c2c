"""Model definitions: SigLIP vision tower, projectors, Qwen2/Llama decoders, the composite."""
