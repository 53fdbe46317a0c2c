"""The demo corpus: every record parses, tokenises and loads; needles sit where recorded."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from longvila_jax.data.demo_corpus import FPS, SPECIAL_TOKENS, STAGES, write_demo_data
from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.data.pipeline import Source
from longvila_jax.data.synthetic import _COLOURS, _SHAPES, needle_fact, needle_frame
from longvila_jax.data.templates import render_chat
from longvila_jax.data.text_sources import (
    TextJsonlSource,
    conversation_to_messages,
    read_jsonl,
    tokenize_conversation,
)
from longvila_jax.data.video import load_frames, video_info

SIZE = 56
SHORT, LONG = 4, 12
MEDIA_ID, NEWLINE_ID = 510, 10  # the packaged tiny model
TOKENS_PER_FRAME = 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, module_seed):
    root = tmp_path_factory.mktemp("demo")
    return write_demo_data(root, seed=module_seed, image_size=SIZE, short_frames=SHORT,
                           long_frames=LONG, scale=0.05)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return Tokenizer.from_file(corpus["tokenizer"])


def _conversation_sources(corpus) -> list[dict]:
    return [s for stage in STAGES if stage != "context" for s in corpus["stages"][stage]]


def _records(corpus):
    """(source, record) for every conversation record, each source once."""
    seen = set()
    for source in _conversation_sources(corpus):
        if source["jsonl"] not in seen:
            seen.add(source["jsonl"])
            yield from ((source, record) for record in read_jsonl(source["jsonl"]))


def _documents(corpus) -> list[str]:
    return [r["text"] for r in read_jsonl(corpus["stages"]["context"][0]["jsonl"])]


def test_every_stage_has_sources(corpus):
    assert list(corpus["stages"]) == list(STAGES)
    for stage, sources in corpus["stages"].items():
        assert sources, stage
        assert len({s["name"] for s in sources}) == len(sources)
        for source in sources:
            assert set(source) == {"name", "jsonl", "media_root", "weight"}
            assert Path(source["jsonl"]).is_file() and Path(source["media_root"]).is_dir()
            assert source["weight"] > 0
            Source(**source)
    # long_sft keeps some short-video SFT so the short skills are not forgotten.
    assert {s["name"] for s in corpus["stages"]["long_sft"]} == {"long_sft_needle", "sft_video"}


def test_records_parse_and_their_media_load(corpus):
    kinds = set()
    for source, record in _records(corpus):
        messages, kind, path = conversation_to_messages(record)
        assert [m["role"] for m in messages] == ["user", "assistant"]
        kinds.add((source["name"], kind))
        if kind == "image":
            count = 1
        else:
            count, fps = video_info(os.path.join(source["media_root"], path))
            assert count == (LONG if source["name"] == "long_sft_needle" else SHORT)
            assert fps == pytest.approx(FPS)
        frames = load_frames(os.path.join(source["media_root"], path), count, image_size=SIZE)
        assert frames.shape == (count, SIZE, SIZE, 3) and frames.dtype == np.float32
        assert np.isfinite(frames).all()
    assert {kind for _, kind in kinds} == {"image", "video"}


def test_context_documents_hold_one_fact_and_its_question(corpus):
    documents = _documents(corpus)
    assert documents and all(isinstance(d, str) for d in documents)
    for document in documents:
        (kind, answer), = re.findall(r"The secret (\w+) is (\w+)\.", document)
        assert document.endswith(f"What is the secret {kind}? {answer}")


def test_every_record_kind_tokenises(corpus, tokenizer):
    for source, record in _records(corpus):
        count = 1 if "image" in record else (LONG if source["name"] == "long_sft_needle" else SHORT)
        sample = tokenize_conversation(tokenizer, "qwen2", record, media_token_id=MEDIA_ID,
                                       tokens_per_frame=TOKENS_PER_FRAME, num_frames=count)
        ids, labels = sample["input_ids"], sample["labels"]
        assert (ids == MEDIA_ID).sum() == count * TOKENS_PER_FRAME
        reply = tokenizer.decode(labels[labels != IGNORE_INDEX].tolist(),
                                 skip_special_tokens=False)
        assert reply == record["conversations"][1]["value"] + "<|im_end|>"
    source = TextJsonlSource(corpus["stages"]["context"][0]["jsonl"], tokenizer, 64,
                             SPECIAL_TOKENS["<|endoftext|>"])
    assert len(source) > 0 and source[0]["input_ids"].shape == (64,)


def test_tokenizer_ids_and_round_trip(corpus, tokenizer):
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    assert max(vocab.values()) < 512 and tokenizer.get_vocab_size() <= 512
    for token, expected in SPECIAL_TOKENS.items():
        assert tokenizer.encode(token, add_special_tokens=False).ids == [expected]
    assert tokenizer.token_to_id("<image>") == MEDIA_ID
    assert tokenizer.encode("\n").ids == [NEWLINE_ID]
    for byte in range(128):  # ids 0-255 are the bytes themselves
        assert tokenizer.decode([byte]) == chr(byte)
    texts = [render_chat("qwen2", conversation_to_messages(r)[0], False)
             for _, r in _records(corpus)]
    for text in [*texts, *_documents(corpus)]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_every_answer_is_one_token_drawn_or_not(tokenizer):
    # Every answer needle_frame can give, with and without a leading space (captions, passkeys),
    # including those this small corpus never drew.
    for answer in [*_COLOURS, *_SHAPES, *"0123456789"]:
        assert len(tokenizer.encode(answer).ids) == 1, answer
        assert len(tokenizer.encode(" " + answer).ids) == 1, answer


def _frame_errors(path: str, count: int, needle_seed: int) -> np.ndarray:
    """Mean squared difference of each of the video's frames from its regenerated needle."""
    frames = load_frames(path, count, image_size=SIZE)  # every frame: count is the length
    needle, _, _ = needle_frame(SIZE, SIZE, seed=needle_seed)
    return ((frames - (needle / 127.5 - 1.0)) ** 2).mean(axis=(1, 2, 3))


def test_needles_sit_at_the_recorded_depths(corpus):
    checked = 0
    for source, record in _records(corpus):
        if "video" not in record:
            continue
        count = LONG if source["name"] == "long_sft_needle" else SHORT
        errors = _frame_errors(os.path.join(source["media_root"], record["video"]), count,
                               record["needle_seed"])
        index = record["needle_index"]
        assert record["depth"] == pytest.approx(index / (count - 1))
        others = np.delete(errors, index)
        assert errors[index] < 0.02 < others.min(), (record["id"], errors)
        checked += source["name"] == "long_sft_needle"
    assert checked


def test_answers_and_captions_match_the_needle(corpus):
    for source, record in _records(corpus):
        fact = needle_fact(record["needle_seed"])
        reply = record["conversations"][1]["value"]
        if source["name"].startswith(("align", "pretrain")):
            described = (f"the digit {fact['digit']}" if fact["kind"] == "digit"
                         else f"a {fact['colour']} {fact['shape']}")
            prefix = "a video with " if "video" in record else ""
            assert reply == prefix + described
        else:
            assert reply == fact[fact["kind"]]


def test_short_and_long_videos_mix_when_sampled_by_frame_rate(corpus):
    lengths = {}
    for source in corpus["stages"]["long_sft"]:
        record = read_jsonl(source["jsonl"])[0]
        path = os.path.join(source["media_root"], record["video"])
        lengths[source["name"]] = len(load_frames(path, LONG, image_size=SIZE, fps=FPS))
    assert lengths == {"long_sft_needle": LONG, "sft_video": SHORT}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_same_files(tmp_path, module_seed):
    args = dict(image_size=SIZE, short_frames=SHORT, long_frames=LONG, scale=0.02)
    for name, s in (("a", module_seed), ("b", module_seed), ("c", module_seed + 1)):
        write_demo_data(tmp_path / name, seed=s, **args)
    same, other = _files(tmp_path / "a"), _files(tmp_path / "b")
    # Every file, the media included, byte for byte.
    assert same == other and "tokenizer/tokenizer.json" in same
    different = _files(tmp_path / "c")
    assert all(same[k] != different[k] for k in same if k.endswith(".jsonl"))


@pytest.mark.parametrize("args", [dict(image_size=57), dict(short_frames=8, long_frames=4),
                                  dict(scale=0.0)])
def test_bad_arguments_fail_early(tmp_path, args):
    with pytest.raises(ValueError):
        write_demo_data(tmp_path, **args)
    assert not any(tmp_path.iterdir())
