"""Long-video inference: cached video embeddings, sequence-parallel prefill, KV-cache decoding."""
