"""Data: tokenizer loading, chat templates, and (later) video decoding and input pipelines."""
