"""Tokenizer loading and chat templates, against literal template text and a tiny BPE tokenizer."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.data.templates import (
    MEDIA_PLACEHOLDER,
    encode_chat,
    place_media,
    render_chat,
    tokenize_messages,
)
from longvila_jax.data.tokenizer import load_tokenizer, token_id

SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<image>",
]
END_MARKER = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}


def _train_tokenizer(specials: list[str]) -> Tokenizer:
    """Byte-level BPE, so any random text encodes and decodes back exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["You are a helpful assistant.", "system user assistant", "the quick brown fox"] * 4
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    _train_tokenizer(SPECIALS).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def _text(rng: random.Random) -> str:
    """A few random words (letters, digits, punctuation), no surrounding whitespace."""
    alphabet = string.ascii_letters + string.digits + ".,?!'é"
    words = ["".join(rng.choices(alphabet, k=rng.randint(1, 9))) for _ in range(rng.randint(1, 8))]
    return " ".join(words)


@pytest.fixture
def rng(module_seed):
    """Python's generator (for `choices`), from the module's printed seed."""
    return random.Random(module_seed)


def test_load_from_folder_and_file(tokenizer_dir):
    from_folder = load_tokenizer(tokenizer_dir)
    from_file = load_tokenizer(tokenizer_dir / "tokenizer.json")
    assert from_folder.get_vocab() == from_file.get_vocab()
    assert token_id(from_file, "<|im_end|>") == from_file.token_to_id("<|im_end|>")


def test_token_id_unknown_names_token(tokenizer):
    with pytest.raises(ValueError, match=r"'<\|nope\|>'") as err:
        token_id(tokenizer, "<|nope|>")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("as_folder", [True, False])
def test_missing_file_names_path(tmp_path, as_folder):
    path = tmp_path if as_folder else tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", ["{not json", '{"hello": 1}', ""])
def test_corrupt_file_names_path(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_tokenizer(tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_render_qwen2_default_system(rng):
    user, reply = _text(rng), _text(rng)
    messages = [
        {"role": "user", "content": f"<image>\n{user}"},
        {"role": "assistant", "content": reply},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{user}<|im_end|>\n"
        f"<|im_start|>assistant\n{reply}<|im_end|>\n"
    )
    assert render_chat("qwen2", messages, add_generation_prompt=False) == expected
    assert render_chat("qwen2", messages[:1], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_qwen2_given_system(rng):
    system, user = _text(rng), _text(rng)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    expected = (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat("qwen2", messages, add_generation_prompt=True) == expected


def test_render_llama(rng):
    system, user, reply = _text(rng), _text(rng), _text(rng)
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"<vila/video>\n{user}"},
        {"role": "assistant", "content": f"  {reply}\n"},
    ]
    expected = (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n<vila/video>\n{user}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{reply}<|eot_id|>"
    )
    assert render_chat("llama", messages, add_generation_prompt=False) == expected
    with_prompt = render_chat("llama", messages[1:2], add_generation_prompt=True)
    assert with_prompt == (
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<vila/video>\n{user}"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def _runs(mask: np.ndarray) -> list[slice]:
    """Maximal runs of True in a boolean vector."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [slice(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True)]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_encode_chat_labels(tokenizer, rng, family, add_generation_prompt):
    replies = [_text(rng) for _ in range(2)]
    messages = [
        {"role": "user", "content": f"<image>\n{_text(rng)}"},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": _text(rng)},
        {"role": "assistant", "content": replies[1]},
    ]
    if add_generation_prompt:
        messages.append({"role": "user", "content": _text(rng)})
    ids, labels = encode_chat(
        tokenizer, family, messages, add_generation_prompt=add_generation_prompt
    )
    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape

    rendered = render_chat(family, messages, add_generation_prompt)
    assert tokenizer.decode(ids.tolist(), skip_special_tokens=False) == rendered

    supervised = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[supervised], ids[supervised])
    assert np.all(labels[~supervised] == IGNORE_INDEX)
    targets = [reply + END_MARKER[family] for reply in replies]
    runs = _runs(supervised)
    assert [tokenizer.decode(ids[r].tolist(), skip_special_tokens=False) for r in runs] == targets
    expected_count = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in targets)
    assert supervised.sum() == expected_count


def test_encode_chat_no_assistant_is_unsupervised(tokenizer, rng):
    messages = [{"role": "user", "content": _text(rng)}]
    ids, labels = encode_chat(tokenizer, "qwen2", messages, add_generation_prompt=True)
    assert ids.size > 0 and np.all(labels == IGNORE_INDEX)


def test_encode_chat_needs_added_markers(rng):
    tok = _train_tokenizer(["<|im_start|>", "<|im_end|>"])
    with pytest.raises(ValueError, match=r"'<\|begin_of_text\|>'"):
        encode_chat(tok, "llama", [{"role": "user", "content": _text(rng)}])


def test_unknown_family_and_role(tokenizer):
    with pytest.raises(ValueError, match="'mistral'"):
        render_chat("mistral", [{"role": "user", "content": "x"}], add_generation_prompt=False)
    with pytest.raises(ValueError, match="'mistral'"):
        encode_chat(tokenizer, "mistral", [{"role": "user", "content": "x"}])
    for family in ("qwen2", "llama"):
        with pytest.raises(ValueError, match="'tool'"):
            render_chat(family, [{"role": "tool", "content": "x"}], add_generation_prompt=False)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_tokenize_messages_expands_each_placeholder(tokenizer, rng, family, add_generation_prompt):
    """Each placeholder becomes its frames' positions, none supervised; the rest is
    `encode_chat`'s, token for token."""
    media = tokenizer.token_to_id(MEDIA_PLACEHOLDER)
    messages = [
        {"role": "user", "content": f"{_text(rng)} {MEDIA_PLACEHOLDER}\n{_text(rng)}"},
        {"role": "assistant", "content": _text(rng)},
        {"role": "user", "content": f"{MEDIA_PLACEHOLDER}\n{_text(rng)}"},
    ]
    if not add_generation_prompt:
        messages.append({"role": "assistant", "content": _text(rng)})
    frames, tokens_per_frame = [rng.randint(1, 4), rng.randint(1, 4)], rng.randint(1, 3)
    ids, labels = tokenize_messages(
        tokenizer, family, messages, media_token_id=media, tokens_per_frame=tokens_per_frame,
        frames_per_media=frames, add_generation_prompt=add_generation_prompt)
    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape

    chat_ids, chat_labels = encode_chat(tokenizer, family, messages,
                                        add_generation_prompt=add_generation_prompt)
    want_ids, want_labels, placeholders = [], [], iter(frames)
    for token, label in zip(chat_ids.tolist(), chat_labels.tolist(), strict=True):
        repeat = next(placeholders) * tokens_per_frame if token == media else 1
        want_ids += [token] * repeat
        want_labels += [IGNORE_INDEX if token == media else label] * repeat
    assert next(placeholders, None) is None
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(labels, want_labels)


def test_tokenize_messages_checks_the_media(tokenizer, rng):
    media = tokenizer.token_to_id(MEDIA_PLACEHOLDER)
    messages = [{"role": "user", "content": f"{MEDIA_PLACEHOLDER}\n{_text(rng)}"}]
    with pytest.raises(ValueError, match="'<image>' as the one token"):
        tokenize_messages(tokenizer, "qwen2", messages, media_token_id=media + 1,
                          tokens_per_frame=2, frames_per_media=[3])
    with pytest.raises(ValueError, match="1 media placeholders in the text but 2"):
        tokenize_messages(tokenizer, "qwen2", messages, media_token_id=media,
                          tokens_per_frame=2, frames_per_media=[3, 1])


def test_place_media(rng):
    question, reply = _text(rng), _text(rng)
    given = [{"role": "system", "content": "s"}, {"role": "user", "content": question},
             {"role": "assistant", "content": reply}, {"role": "user", "content": "again"}]
    placed = place_media(given, "video")
    assert placed == [given[0], {"role": "user", "content": f"<image>\n{question}"}, *given[2:]]
    assert given[1]["content"] == question  # the caller's messages are left as they are
    assert place_media(given, None) == given
    # A placeholder already in the text, in either spelling, is where the media goes.
    for spelling in ("<image>", "<video>"):
        written = [{"role": "user", "content": f"{question} {spelling} ?"}]
        assert place_media(written, "image") == [
            {"role": "user", "content": f"{question} <image> ?"}]
    for messages, kind, match in [
        ([{"role": "user", "content": "<video> x"}], None, "1 media placeholder.* no video"),
        ([{"role": "user", "content": "<video> <image>"}], "video", "one video but 2"),
        ([{"role": "assistant", "content": "x"}], "image", "no user turn to hold the image"),
    ]:
        with pytest.raises(ValueError, match=match):
            place_media(messages, kind)
