"""The text side of the training sources: LLaVA/VILA conversation records and long plain text.

Conversation records follow the LLaVA layout VILA trains on, one JSON object per line:
`{"id", "video" | "image" | absent, "conversations": [{"from": "human" | "gpt", "value"}]}`.
They become chat messages with the media's place marked (`templates.place_media`), tokenised
as inference tokenises its prompts (`templates.tokenize_messages`).

Plain text for the context-extension stage is cut into chunks of exactly the stage's length:
every chunk fills its sequence, so there is nothing to pack and no padding to mask.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator

import numpy as np
import tokenizers

from longvila_jax.data.templates import place_media, tokenize_messages

_ROLES = {"human": "user", "gpt": "assistant"}


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """`(line number, object)` for each non-blank line of a JSONL file; a bad line raises
    one line naming the file and line."""
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err.msg}, column "
                                 f"{err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            yield number, record


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSONL file (`jsonl_records` without the line numbers)."""
    return [record for _, record in jsonl_records(path)]


def _media(record: dict) -> tuple[str | None, str | None]:
    """(kind, relative path) of the record's one media item, or (None, None)."""
    kinds = [kind for kind in ("video", "image") if record.get(kind) is not None]
    if not kinds:
        return None, None
    if len(kinds) > 1 or not isinstance(record[kinds[0]], str):
        raise ValueError(f"record {record.get('id')!r}: expected one video or image path")
    return kinds[0], record[kinds[0]]


def conversation_to_messages(record: dict) -> tuple[list[dict], str | None, str | None]:
    """Chat messages, media kind ("video", "image" or None) and media path of a LLaVA record.

    The media's placeholders are placed as `templates.place_media` places them: one prepended
    to the first human turn when the record's text names no place.
    """
    name = record.get("id")
    kind, path = _media(record)
    messages = []
    for turn in record.get("conversations") or []:
        if turn.get("from") not in _ROLES:
            raise ValueError(
                f"record {name!r}: unknown speaker {turn.get('from')!r} (expected human or gpt)"
            )
        messages.append({"role": _ROLES[turn["from"]], "content": turn["value"]})
    if not any(message["role"] == "user" for message in messages):
        raise ValueError(f"record {name!r}: no human turn")
    try:
        return place_media(messages, kind), kind, path
    except ValueError as err:
        raise ValueError(f"record {name!r}: {err}") from None


def tokenize_conversation(
    tokenizer: tokenizers.Tokenizer,
    family: str,
    record: dict,
    *,
    media_token_id: int,
    tokens_per_frame: int,
    num_frames: int,
) -> dict:
    """`input_ids` and `labels` (int32 `[seq]`) of a record, its media placeholder expanded.

    The placeholder takes `num_frames * tokens_per_frame` positions (`num_frames` = 1 for an
    image), all with label -100; only assistant replies are supervised (`tokenize_messages`).
    """
    messages, kind, _ = conversation_to_messages(record)
    input_ids, labels = tokenize_messages(
        tokenizer, family, messages, media_token_id=media_token_id,
        tokens_per_frame=tokens_per_frame, frames_per_media=[num_frames] if kind else [])
    return {"input_ids": input_ids, "labels": labels}


def text_chunks(token_ids: np.ndarray, length: int) -> np.ndarray:
    """`[n, length]` view of 1-D `token_ids`, n = len // length; the remainder is dropped."""
    if token_ids.ndim != 1 or length < 1:
        raise ValueError(
            f"text_chunks: need 1-D tokens and length >= 1, got shape {token_ids.shape}, {length}"
        )
    count = len(token_ids) // length
    return token_ids[: count * length].reshape(count, length)


class _Chunks:
    """Grain random-access source over `self._chunks` `[n, length]`; labels are the ids."""

    _chunks: np.ndarray

    def __len__(self) -> int:
        return len(self._chunks)

    def __getitem__(self, index: int) -> dict:
        ids = np.array(self._chunks[index], np.int32)
        return {"input_ids": ids, "labels": ids.copy()}


class TextJsonlSource(_Chunks):
    """Chunks of a JSONL file's `{"text"}` records, tokenised, each followed by `separator_id`.

    The whole file is tokenised in memory when the source is built; pre-tokenise large corpora
    into a `.npy` for `TokenArraySource`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: tokenizers.Tokenizer,
        length: int,
        separator_id: int,
    ):
        texts = []
        for index, record in enumerate(read_jsonl(path)):
            if not isinstance(record.get("text"), str):
                raise ValueError(f"{path}: record {index} has no 'text' string")
            texts.append(record["text"])
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        joined = itertools.chain.from_iterable([*e.ids, separator_id] for e in encodings)
        self._chunks = text_chunks(np.fromiter(joined, np.int32), length)


class TokenArraySource(_Chunks):
    """Chunks of a pre-tokenised 1-D `.npy` array, memory-mapped so it is never read whole."""

    def __init__(self, path: str | os.PathLike, length: int):
        self._chunks = text_chunks(np.load(path, mmap_mode="r"), length)
