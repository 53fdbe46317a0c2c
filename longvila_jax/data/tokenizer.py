"""Load a Hugging Face `tokenizer.json` with the `tokenizers` library (no transformers or torch)."""

from __future__ import annotations

import os
from pathlib import Path

import tokenizers


def load_tokenizer(folder_or_file: str | os.PathLike) -> tokenizers.Tokenizer:
    """Tokenizer from a checkpoint folder holding `tokenizer.json`, or from that file itself."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:
        # The library's messages can span lines; keep the first so the error stays one line.
        reason = (str(err).splitlines() or ["unreadable"])[0]
        raise ValueError(f"not a valid tokenizer.json: {path} ({reason})") from err


def token_id(tokenizer: tokenizers.Tokenizer, token: str) -> int:
    """Id of `token` in the vocabulary (added tokens included); ValueError if it is absent."""
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"token {token!r} is not in the tokenizer vocabulary")
    return found
