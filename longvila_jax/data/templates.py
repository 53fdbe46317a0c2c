"""Chat templates for Qwen2 (ChatML) and Llama-3 instruct, with assistant-only loss labels.

The text matches the checkpoints' own Jinja templates: Qwen2 inserts the default system prompt
"You are a helpful assistant." when the first message is not a system message; Llama-3 has no
default system prompt, starts with `<|begin_of_text|>` and strips each message's content.

Media placeholders (`<image>`, `<vila/video>`) in user content are kept verbatim; expanding them
into vision-token slots is a later step.

`encode_chat` tokenizes the rendered text segment by segment (with `add_special_tokens=False`)
so that each token is known to belong to an assistant reply or not, without searching the
token stream afterwards. The template's markers must therefore be added tokens of the tokenizer,
or they would be split into ordinary sub-word pieces.
"""

from __future__ import annotations

import numpy as np
import tokenizers

from longvila_jax.data.media import IGNORE_INDEX

QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")

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
