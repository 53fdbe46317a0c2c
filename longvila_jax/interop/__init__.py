"""Hugging Face interop: import checkpoints into orbax, export back to safetensors (no torch)."""
