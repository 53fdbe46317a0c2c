"""The demo's corpus: LongVILA's five training stages in miniature, and a tokenizer that fits it.

Every fact the model sees is a `synthetic.needle_fact`: a coloured shape or a digit on a plain
background. The stages follow LongVILA's recipe:

- align: image captions ("a red circle", "the digit 7") and a few short-video captions.
- pretrain: more captions of images and short videos, with varied prompts.
- sft: the needle questions (colour, shape, digit) on images and short videos.
- context: long `{"text"}` documents for context extension, passkey style: filler sentences
  with one fact somewhere ("The secret digit is 7.") and its question at the end ("What is the
  secret digit? 7"), read with `text_sources.TextJsonlSource`.
- long_sft: needle-in-a-haystack questions on `long_frames`-frame videos, the needle at a
  random depth, mixed with sft's short videos so short-video skills are kept.

A short video is a `short_frames`-frame haystack with the needle in one frame, so captioning
and answering already mean finding the frame that holds the fact. All videos play at `FPS`:
long_sft mixes short and long videos, so that stage must sample by frame rate
(`train.fps = FPS`, at most `long_frames` frames); sampling a fixed `long_frames` frames would
reject every short video as too short.

Record i of stage s draws its needle, haystack and placement from
`np.random.SeedSequence([seed, s, i])` (s = `STAGES.index(stage)`), so a record does not depend
on the counts, and needle seeds are effectively random 32-bit numbers. An evaluation should use
another base seed (or `synthetic.make_needle_dataset`, whose seed sequences have two entries, not
three) so that it never draws a training video.

The tokenizer is byte-level BPE whose first 256 ids are the bytes themselves ("\\n" is id 10,
the tiny config's `newline_token_id`), then the merges in training order, then the added
tokens of `SPECIAL_TOKENS` at the top of the 512-entry vocabulary ("<image>" at 510, the tiny
config's `media_token_id`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from longvila_jax.atomic import atomic_file, remove_temporaries
from longvila_jax.data.synthetic import needle_fact, needle_frame, write_needle_video
from longvila_jax.data.templates import render_chat
from longvila_jax.data.text_sources import conversation_to_messages

STAGES = ("align", "pretrain", "sft", "context", "long_sft")
FPS = 4.0  # frame rate of every video written here
VOCAB_SIZE = 512
# The qwen2 template's markers, its end-of-text (the separator between long documents) and the
# media placeholder, at the ids the tiny config expects.
SPECIAL_TOKENS = {"<|endoftext|>": 508, "<|im_start|>": 509, "<image>": 510, "<|im_end|>": 511}

# stage -> its sources: (name, media, video length, task, records at scale 1). One epoch of
# each stage is a few hundred samples, but long_sft's thousand needle videos: its ~2,100
# needle samples then meet each haystack about twice instead of learning a few by heart
# (with 250 videos, V-NIAH at 64 frames fell to 58%). The context stage's 300 documents
# make ~300k tokens.
_PLAN = {
    "align": (("align_image", "image", None, "describe", 240),
              ("align_video", "video", "short", "describe", 60)),
    "pretrain": (("pretrain_image", "image", None, "caption", 150),
                 ("pretrain_video", "video", "short", "caption", 250)),
    "sft": (("sft_image", "image", None, "qa", 150),
            ("sft_video", "video", "short", "qa", 250)),
    "long_sft": (("long_sft_needle", "video", "long", "qa", 1000),),
}
_CONTEXT_DOCS = 300
_LONG_SFT_SHORT_SHARE = 0.25  # of long_sft samples taken from sft's short videos

_CAPTION_PROMPTS = ("Describe the {}.", "What is in the {}?", "Write a short caption for the {}.")
_FILLER = (
    "The grass grows.", "The river flows.", "Here we go.", "There and back again.",
    "The wind moves the trees.", "Time passes slowly.", "Birds sing in the morning.",
    "The road goes on.", "Nothing happens here.", "Clouds drift by.",
)
_FILLER_SENTENCES = (20, 400)  # per document, before the fact and the question: ~80-1600 tokens
_FACT_SEEDS = 256  # needle_fact over seeds 0-255 meets every fact (all 34 from seed 117 on)


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value: byte-level BPE's alphabet, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def _write_atomic(path: Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def build_tokenizer(dst_dir: str | os.PathLike, texts: Iterable[str]) -> Path:
    """Train a byte-level BPE `dst_dir/tokenizer.json`, every id below `VOCAB_SIZE`, on `texts`.

    Ids 0-255 are the bytes, then the merges (until the vocabulary is full or every word of
    `texts` is one token), then `SPECIAL_TOKENS` as added tokens at their fixed ids; the
    markers may appear in `texts` (rendered chats) and are cut out before training. The same
    texts give the same file.
    """
    split = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))
    pieces = [piece for text in texts for piece in split.split(text) if piece]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = byte_level
    trained.train_from_iterator(pieces, trainer)
    model = json.loads(trained.to_str())["model"]

    # Renumber: bytes at their value, merged tokens after them in the order they were learnt.
    vocab = {char: byte for byte, char in enumerate(_byte_chars())}
    if set(vocab) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise AssertionError("byte alphabet differs from the tokenizers library's")
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    if len(vocab) > min(SPECIAL_TOKENS.values()):
        raise AssertionError(f"{len(vocab)} trained tokens overlap the special ids")
    vocab.update(SPECIAL_TOKENS)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    # Already in the model's vocabulary, so they keep the ids given there.
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    for token, expected in SPECIAL_TOKENS.items():
        if tokenizer.token_to_id(token) != expected:
            raise AssertionError(f"{token!r} got id {tokenizer.token_to_id(token)}")
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    return _write_atomic(dst / "tokenizer.json", tokenizer.to_str(pretty=True))


def _seeds(seed: int, stage: str, i: int) -> tuple[int, ...]:
    """(needle seed, haystack seed, placement draw, prompt draw) of record i of `stage`."""
    sequence = np.random.SeedSequence([seed, STAGES.index(stage), i])
    return tuple(int(s) for s in sequence.generate_state(4))


def caption(fact: dict[str, str], media: str) -> str:
    """ "a red circle", "the digit 7"; "a video with ..." for a video."""
    if fact["kind"] == "digit":
        caption = f"the digit {fact['digit']}"
    else:
        caption = f"a {fact['colour']} {fact['shape']}"
    return caption if media == "image" else f"a video with {caption}"


def _passkey(fact: dict[str, str]) -> tuple[str, str]:
    """The fact as a passkey statement, and its question with the answer."""
    kind, answer = fact["kind"], fact[fact["kind"]]
    return f"The secret {kind} is {answer}.", f"What is the secret {kind}? {answer}"


def _every_fact_text() -> list[str]:
    """Every needle fact in every form the corpus words it, whether or not a record drew it,
    so that the tokenizer is the same for facts an evaluation meets and training did not."""
    facts = sorted({json.dumps(needle_fact(s), sort_keys=True) for s in range(_FACT_SEEDS)})
    texts = []
    for fact in map(json.loads, facts):
        texts += [caption(fact, "image"), caption(fact, "video"), *_passkey(fact),
                  fact[fact["kind"]]]
    return texts


def _write_image(path: Path, rgb: np.ndarray) -> None:
    with atomic_file(path) as tmp:
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(rgb[..., ::-1])):
            raise RuntimeError(f"cv2.imwrite cannot write {path}")


def _media_record(stage_dir: Path, stage: str, name: str, i: int, media: str, frames: int,
                  task: str, size: int, seed: int) -> dict:
    """Write record i's image or video under `stage_dir`; its LLaVA record (paths relative)."""
    needle_seed, haystack_seed, placement, prompt_draw = _seeds(seed, stage, i)
    record: dict = {"id": f"{name}_{i:05d}"}
    if media == "image":
        record["image"] = f"images/{record['id']}.png"
        frame, question, answer = needle_frame(size, size, seed=needle_seed)
        _write_image(stage_dir / record["image"], frame)
        question = question.replace("video", "image")
    else:
        record["video"] = f"videos/{record['id']}.mp4"
        index = placement % frames
        question, answer = write_needle_video(
            stage_dir / record["video"], frames, needle_index=index, needle_seed=needle_seed,
            haystack_seed=haystack_seed, width=size, height=size, fps=FPS,
        )
        record.update(needle_index=index, depth=index / max(frames - 1, 1))
    if task == "qa":
        prompt, reply = question, answer
    else:
        variant = 0 if task == "describe" else prompt_draw % len(_CAPTION_PROMPTS)
        prompt = _CAPTION_PROMPTS[variant].format(media)
        reply = caption(needle_fact(needle_seed), media)
    record["conversations"] = [
        {"from": "human", "value": f"<{media}>\n{prompt}"},
        {"from": "gpt", "value": reply},
    ]
    record["needle_seed"] = needle_seed
    return record


def _passkey_document(seed: int, i: int) -> str:
    """Filler sentences, one needle fact among them, and its question and answer at the end."""
    needle_seed, text_seed, _, _ = _seeds(seed, "context", i)
    statement, question = _passkey(needle_fact(needle_seed))
    rng = np.random.default_rng(text_seed)
    count = rng.integers(*_FILLER_SENTENCES)
    sentences = [_FILLER[j] for j in rng.integers(len(_FILLER), size=count)]
    sentences.insert(int(rng.integers(count + 1)), statement)
    return " ".join([*sentences, question])


def _write_jsonl(path: Path, records: list[dict]) -> str:
    return str(_write_atomic(path, "".join(json.dumps(record) + "\n" for record in records)))


def _count(base: int, scale: float) -> int:
    return max(1, round(base * scale))


def write_demo_data(root: str | os.PathLike, *, seed: int = 0, image_size: int = 56,
                    short_frames: int = 4, long_frames: int = 32, scale: float = 1.0) -> dict:
    """Write every stage's data and the tokenizer under `root`.

    Returns `{"tokenizer": path, "fps": FPS, "stages": {stage: [source dicts]}}`, a source dict
    being what `data.sources` holds: `{"name", "jsonl", "media_root", "weight"}`. Images and
    videos are `image_size` pixels square; `scale` multiplies every record count.
    """
    if image_size < 2 or image_size % 2:
        raise ValueError(f"image_size must be even and >= 2, got {image_size}")
    if not 1 <= short_frames <= long_frames:
        raise ValueError(
            f"need 1 <= short_frames <= long_frames, got {short_frames} and {long_frames}"
        )
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    root = Path(root)
    lengths = {"short": short_frames, "long": long_frames}
    stages: dict[str, list[dict]] = {}
    texts = _every_fact_text()
    for stage, plan in _PLAN.items():
        stage_dir = root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(stage_dir)  # what a killed earlier call left
        counts = [_count(base, scale) for *_, base in plan]
        first, sources = 0, []
        for (name, media, length, task, _), count in zip(plan, counts, strict=True):
            records = [
                _media_record(stage_dir, stage, name, i, media, lengths.get(length), task,
                              image_size, seed)
                for i in range(first, first + count)
            ]
            first += count
            texts += [render_chat("qwen2", conversation_to_messages(r)[0], False) for r in records]
            jsonl = _write_jsonl(stage_dir / f"{name}.jsonl", records)
            sources.append({"name": name, "jsonl": jsonl, "media_root": str(stage_dir),
                            "weight": count / sum(counts)})
        stages[stage] = sources
    sft_video = next(s for s in stages["sft"] if s["name"] == "sft_video")
    stages["long_sft"] = [
        {**stages["long_sft"][0], "weight": 1.0 - _LONG_SFT_SHORT_SHARE},
        {**sft_video, "weight": _LONG_SFT_SHORT_SHARE},
    ]

    context_dir = root / "context"
    context_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(context_dir)
    documents = [_passkey_document(seed, i) for i in range(_count(_CONTEXT_DOCS, scale))]
    texts += documents
    jsonl = _write_jsonl(context_dir / "context_text.jsonl", [{"text": d} for d in documents])
    stages["context"] = [{"name": "context_text", "jsonl": jsonl, "media_root": str(context_dir),
                          "weight": 1.0}]

    tokenizer = build_tokenizer(root / "tokenizer", texts)
    return {"tokenizer": str(tokenizer), "fps": FPS,
            "stages": {stage: stages[stage] for stage in STAGES}}
