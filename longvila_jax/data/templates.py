"""Chat templates for Qwen2 (ChatML) and Llama-3 instruct, with assistant-only loss labels.

The text matches the checkpoints' own Jinja templates: Qwen2 inserts the default system prompt
"You are a helpful assistant." when the first message is not a system message; Llama-3 has no
default system prompt, starts with `<|begin_of_text|>` and strips each message's content.

Chat messages are `{"role", "content"}` dicts, the media's place in a user turn marked by
`MEDIA_PLACEHOLDER` (`place_media`). `tokenize_messages` is what training and inference both
call: the template's tokens with each placeholder expanded to its frames' positions. Training
gets its messages from LLaVA records (`text_sources.conversation_to_messages`); inference
writes them directly.

`encode_chat` tokenizes the rendered text segment by segment (with `add_special_tokens=False`)
so that each token is known to belong to an assistant reply or not, without searching the
token stream afterwards. The template's markers must therefore be added tokens of the tokenizer,
or they would be split into ordinary sub-word pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tokenizers

from longvila_jax.data.media import IGNORE_INDEX, expand_media_tokens

QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")
# Where a media item goes in a message's content. The tokenizer must hold it as an added token,
# so that it encodes to the model's one media token id; `<video>` is another spelling of it.
MEDIA_PLACEHOLDER = "<image>"
_PLACEHOLDERS = ("<image>", "<video>")

_MARKERS = {
    "qwen2": ("<|im_start|>", "<|im_end|>"),
    "llama": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}

Segment = tuple[str, bool]  # (text, is part of an assistant reply)


def _role(message: dict) -> str:
    role = message["role"]
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r} (expected one of {', '.join(ROLES)})")
    return role


def _qwen2_segments(messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
    if messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QWEN2_DEFAULT_SYSTEM}, *messages]
    segments = []
    for message in messages:
        role = _role(message)
        segments += [
            (f"<|im_start|>{role}\n", False),
            (message["content"] + "<|im_end|>", role == "assistant"),
            ("\n", False),
        ]
    if add_generation_prompt:
        segments.append(("<|im_start|>assistant\n", False))
    return segments


def _llama_segments(messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
    segments = [("<|begin_of_text|>", False)]
    for message in messages:
        role = _role(message)
        segments += [
            (f"<|start_header_id|>{role}<|end_header_id|>\n\n", False),
            (message["content"].strip() + "<|eot_id|>", role == "assistant"),
        ]
    if add_generation_prompt:
        segments.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segments


_SEGMENTERS = {"qwen2": _qwen2_segments, "llama": _llama_segments}


def _segments(family: str, messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
    """Template pieces in order, neighbours with the same flag merged."""
    if family not in _SEGMENTERS:
        raise ValueError(
            f"unknown chat template family {family!r} (expected one of {', '.join(_SEGMENTERS)})"
        )
    merged: list[Segment] = []
    for text, supervised in _SEGMENTERS[family](messages, add_generation_prompt):
        if merged and merged[-1][1] == supervised:
            merged[-1] = (merged[-1][0] + text, supervised)
        else:
            merged.append((text, supervised))
    return merged


def render_chat(family: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """The prompt text for `messages` (`{"role", "content"}` dicts) in `family`'s template."""
    return "".join(text for text, _ in _segments(family, messages, add_generation_prompt))


def encode_chat(
    tokenizer: tokenizers.Tokenizer,
    family: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """`(ids, labels)`, both int32 `[seq]`; labels are the ids on assistant replies, else -100.

    A reply's supervised tokens are its content and its end marker (`<|im_end|>` or
    `<|eot_id|>`), so the model learns to stop; headers and the newline after `<|im_end|>` are not.
    """
    segments = _segments(family, messages, add_generation_prompt)
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    for marker in _MARKERS[family]:
        if marker not in added:
            raise ValueError(f"tokenizer lacks the added token {marker!r} of the {family} template")
    ids: list[int] = []
    labels: list[int] = []
    for text, supervised in segments:
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)


def place_media(messages: list[dict], kind: str | None) -> list[dict]:
    """`messages` with their media placeholders spelt `MEDIA_PLACEHOLDER`, for one media item of
    `kind` ("video" or "image") or none (None).

    Content that names no place for the item gets the placeholder prepended to its first user
    turn, as VILA does; a placeholder elsewhere stays where it is. Raises `ValueError` when
    the placeholders do not match the media. The messages given are left as they are.
    """
    placed = []
    for message in messages:
        content = message["content"]
        for placeholder in _PLACEHOLDERS:
            content = content.replace(placeholder, MEDIA_PLACEHOLDER)
        placed.append({**message, "content": content})
    count = sum(message["content"].count(MEDIA_PLACEHOLDER) for message in placed)
    if kind is None and count:
        raise ValueError(f"{count} media placeholder(s) but no video or image")
    if kind is not None and count > 1:
        raise ValueError(f"one {kind} but {count} media placeholders")
    if kind is not None and not count:
        users = [message for message in placed if message["role"] == "user"]
        if not users:
            raise ValueError(f"no user turn to hold the {kind}")
        users[0]["content"] = f"{MEDIA_PLACEHOLDER}\n{users[0]['content']}"
    return placed


def tokenize_messages(
    tokenizer: tokenizers.Tokenizer,
    family: str,
    messages: list[dict],
    *,
    media_token_id: int,
    tokens_per_frame: int,
    frames_per_media: Sequence[int] = (),
    add_generation_prompt: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """`(input_ids, labels)`, both int32 `[seq]`, of `messages` in `family`'s template, the k-th
    media placeholder expanded to `frames_per_media[k] * tokens_per_frame` positions.

    Labels are `encode_chat`'s (assistant replies only); media positions are never supervised.
    """
    if frames_per_media and tokenizer.encode(MEDIA_PLACEHOLDER, add_special_tokens=False).ids != [
        media_token_id
    ]:
        raise ValueError(
            f"tokenizer does not encode {MEDIA_PLACEHOLDER!r} as the one token {media_token_id}"
        )
    ids, labels = encode_chat(tokenizer, family, messages,
                              add_generation_prompt=add_generation_prompt)
    expanded = expand_media_tokens(ids, media_token_id, tokens_per_frame, frames_per_media)
    # Labels carry the placeholder through the same expansion, then ignore what it became.
    carried = np.where(ids == media_token_id, media_token_id, labels)
    carried = expand_media_tokens(carried, media_token_id, tokens_per_frame, frames_per_media)
    labels = np.where(expanded == media_token_id, IGNORE_INDEX, carried).astype(np.int32)
    return expanded, labels
