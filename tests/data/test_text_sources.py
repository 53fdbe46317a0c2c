"""Conversation records and plain-text chunks, against hand-written token sequences.

The tokenizer is built by hand (a word-level vocabulary, spaces and newlines as tokens of
their own, the template markers as added tokens), so every expected id below is written out
from the template text rather than computed by the code under test.
"""

from __future__ import annotations

import json
import re

import grain
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.data.text_sources import (
    TextJsonlSource,
    TokenArraySource,
    conversation_to_messages,
    read_jsonl,
    text_chunks,
    tokenize_conversation,
)

MARKERS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<image>",
]
WORDS = ["the", "quick", "brown", "fox", "what", "is", "in", "video", "it", "jumps"]
SPELLING = ["\n", " ", ".", "?", "You", "are", "a", "helpful", "system", "user", "assistant"]
VOCAB = {token: index for index, token in enumerate(["[UNK]", *MARKERS, *SPELLING, *WORDS])}
MEDIA = VOCAB["<image>"]
SYSTEM = ["You", " ", "are", " ", "a", " ", "helpful", " ", "assistant", "."]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|[.?]"), behavior="isolated")
    tok.add_special_tokens(MARKERS)
    return tok


def _words(rng, low: int = 1) -> list[str]:
    """Random words of the vocabulary as tokens, spaces included."""
    words = rng.choice(WORDS, int(rng.integers(low, 6))).tolist()
    return [token for word in words for token in (" ", word)][1:]


def _ids(tokens: list[str]) -> list[int]:
    return [VOCAB[token] for token in tokens]


def _expected(segments: list[tuple[list[str], bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Ids and labels of `(tokens, supervised)` segments; "<image>" is never supervised."""
    ids = [i for tokens, _ in segments for i in _ids(tokens)]
    labels = [
        i if supervised and i != MEDIA else IGNORE_INDEX
        for tokens, supervised in segments
        for i in _ids(tokens)
    ]
    return np.array(ids), np.array(labels)


def _conversation(rng, placement: str):
    """A two-round record, its human turns' tokens and its replies' tokens."""
    questions = [_words(rng, low=2), _words(rng)]
    answers = [_words(rng), _words(rng)]
    first = "".join(questions[0])
    if placement in ("<image>", "<video>"):  # after the first word
        first = f"{questions[0][0]} {placement} {''.join(questions[0][2:])}"
        questions[0] = [questions[0][0], " ", "<image>", " ", *questions[0][2:]]
    elif placement == "prepended":
        questions[0] = ["<image>", "\n", *questions[0]]
    record = {
        "id": "r1",
        "conversations": [
            {"from": "human", "value": first},
            {"from": "gpt", "value": "".join(answers[0])},
            {"from": "human", "value": "".join(questions[1])},
            {"from": "gpt", "value": "".join(answers[1])},
        ],
    }
    if placement != "none":
        record["video"] = "clips/a.mp4"
    return record, questions, answers


def _expand(tokens: list[str], positions: int) -> list[str]:
    return [t for token in tokens for t in ([token] * positions if token == "<image>" else [token])]


def _qwen2(questions, answers):
    head = ["<|im_start|>", "system", "\n", *SYSTEM, "<|im_end|>", "\n"]
    segments = [(head, False)]
    for question, answer in zip(questions, answers, strict=True):
        segments += [
            (["<|im_start|>", "user", "\n", *question, "<|im_end|>", "\n"], False),
            (["<|im_start|>", "assistant", "\n"], False),
            ([*answer, "<|im_end|>"], True),
            (["\n"], False),
        ]
    return segments


def _llama_header(role: str) -> list[str]:
    return ["<|start_header_id|>", role, "<|end_header_id|>", "\n", "\n"]


def _llama(questions, answers):
    segments = [(["<|begin_of_text|>"], False)]
    for question, answer in zip(questions, answers, strict=True):
        segments += [
            ([*_llama_header("user"), *question, "<|eot_id|>", *_llama_header("assistant")], False),
            ([*answer, "<|eot_id|>"], True),
        ]
    return segments


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("placement", ["none", "prepended", "<image>", "<video>"])
def test_tokenize_conversation(tokenizer, rng, family, placement):
    record, questions, answers = _conversation(rng, placement)
    tokens_per_frame, num_frames = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    expanded = [_expand(question, tokens_per_frame * num_frames) for question in questions]
    segments = {"qwen2": _qwen2, "llama": _llama}[family](expanded, answers)
    ids, labels = _expected(segments)

    sample = tokenize_conversation(
        tokenizer,
        family,
        record,
        media_token_id=MEDIA,
        tokens_per_frame=tokens_per_frame,
        num_frames=num_frames,
    )
    assert sample["input_ids"].dtype == sample["labels"].dtype == np.int32
    np.testing.assert_array_equal(sample["input_ids"], ids)
    np.testing.assert_array_equal(sample["labels"], labels)
    media = 0 if placement == "none" else tokens_per_frame * num_frames
    assert np.sum(sample["input_ids"] == MEDIA) == media


def test_tokenize_conversation_checks_media_token(tokenizer, rng):
    record, _, _ = _conversation(rng, "prepended")
    with pytest.raises(ValueError, match="'<image>'"):
        tokenize_conversation(
            tokenizer, "qwen2", record, media_token_id=MEDIA + 1, tokens_per_frame=2, num_frames=3
        )


def test_conversation_to_messages():
    record = {
        "id": "x",
        "image": "a/b.jpg",
        "conversations": [
            {"from": "human", "value": "what is <video> it?"},
            {"from": "gpt", "value": "a fox"},
        ],
    }
    messages, kind, path = conversation_to_messages(record)
    assert (kind, path) == ("image", "a/b.jpg")
    assert messages == [
        {"role": "user", "content": "what is <image> it?"},
        {"role": "assistant", "content": "a fox"},
    ]
    text_only = {"id": "y", "video": None, "conversations": [{"from": "human", "value": "hi"}]}
    assert conversation_to_messages(text_only) == ([{"role": "user", "content": "hi"}], None, None)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"conversations": [{"from": "human", "value": "<image> hi"}]}, "no video or image"),
        ({"conversations": [{"from": "bot", "value": "hi"}]}, "unknown speaker 'bot'"),
        ({"conversations": [{"from": "gpt", "value": "hi"}]}, "no human turn"),
        (
            {"video": "v.mp4", "conversations": [{"from": "human", "value": "<video><video>"}]},
            "2 media placeholders",
        ),
        ({"video": "v.mp4", "image": "i.jpg", "conversations": []}, "one video or image"),
        ({"image": ["i.jpg", "j.jpg"], "conversations": []}, "one video or image"),
    ],
)
def test_conversation_errors_name_record(record, match):
    with pytest.raises(ValueError, match=match) as err:
        conversation_to_messages({"id": "rec-42", **record})
    assert "'rec-42'" in str(err.value)


def test_read_jsonl(tmp_path, rng):
    records = [{"id": i, "text": "x"} for i in range(int(rng.integers(2, 10)))]
    lines = [json.dumps(r) for r in records]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([*lines[:1], "", *lines[1:]]) + "\n")
    assert read_jsonl(path) == records

    bad = int(rng.integers(len(lines)))
    for broken in ('{"id": 1,', "[1, 2]"):
        path.write_text("\n".join([*lines[:bad], broken, *lines[bad:]]) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{path}:{bad + 1}: ")) as err:
            read_jsonl(path)
        assert "\n" not in str(err.value)


def test_text_chunks(rng):
    tokens, length = rng.integers(0, 100, int(rng.integers(0, 50))), int(rng.integers(1, 9))
    chunks = text_chunks(tokens, length)
    assert chunks.shape == (len(tokens) // length, length)
    np.testing.assert_array_equal(chunks.reshape(-1), tokens[: chunks.size])
    with pytest.raises(ValueError):
        text_chunks(tokens.reshape(1, -1), length)


def _check_source(source, stream: list[int], length: int):
    count = len(stream) // length
    assert len(source) == count
    items = list(grain.MapDataset.source(source))  # grain takes it as a random-access source
    for index, item in enumerate(items):
        expected = stream[index * length : (index + 1) * length]
        assert item["input_ids"].dtype == np.int32
        np.testing.assert_array_equal(item["input_ids"], expected)
        np.testing.assert_array_equal(item["labels"], expected)


def test_text_jsonl_source(tokenizer, rng, tmp_path):
    texts = [_words(rng) for _ in range(int(rng.integers(1, 8)))]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": "".join(t)}) + "\n" for t in texts))
    eos = VOCAB["<|eot_id|>"]
    stream = [i for t in texts for i in [*_ids(t), eos]]
    length = int(rng.integers(1, 9))
    _check_source(TextJsonlSource(path, tokenizer, length, separator_id=eos), stream, length)

    path.write_text('{"text": "fox"}\n{"body": "fox"}\n')
    with pytest.raises(ValueError, match="record 1 has no 'text'"):
        TextJsonlSource(path, tokenizer, length, separator_id=eos)


def test_token_array_source(rng, tmp_path):
    stream = rng.integers(0, 60_000, int(rng.integers(0, 200))).astype(np.uint16)
    path = tmp_path / "tokens.npy"
    np.save(path, stream)
    length = int(rng.integers(1, 33))
    _check_source(TokenArraySource(path, length), stream.tolist(), length)
