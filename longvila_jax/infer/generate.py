"""Answer text prompts about videos: what `longvila-jax generate` and the evaluations call.

    gen = Generator.from_checkpoint("demo/5_long_sft/final")
    gen.generate(["What colour is the shape shown in the video?"], video="clip.mp4",
                 num_frames=64)

Each video is sampled and encoded once (`VideoEmbeddingCache`, optionally on disk); each
prompt becomes the model's chat template with its video's frames before the question, and
the batch, one video per prompt or one for all, is prefilled over the mesh once and decoded
with the KV cache, `n` answers per prompt (`engine.py`).
A row stops at the template's end-of-turn token, at any of the `stop` strings (cut off
before it), or after `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from longvila_jax.data.templates import place_media, tokenize_messages
from longvila_jax.data.tokenizer import load_tokenizer
from longvila_jax.infer.decode import Sampling
from longvila_jax.infer.embeddings import VideoEmbeddingCache
from longvila_jax.infer.engine import InferenceEngine
from longvila_jax.models.longvila import LongVILA

# What ends an answer, per chat-template family: its end-of-turn marker, and end-of-text.
_END_TOKENS = {"qwen2": ("<|im_end|>", "<|endoftext|>"),
               "llama": ("<|eot_id|>", "<|end_of_text|>")}


def end_of_turn_ids(tokenizer: tokenizers.Tokenizer, family: str) -> list[int]:
    """Ids of the tokens that end an assistant turn in `family`'s template (those the
    tokenizer has)."""
    if family not in _END_TOKENS:
        raise ValueError(f"unknown chat template family {family!r} "
                         f"(expected one of {', '.join(_END_TOKENS)})")
    ids = [tokenizer.token_to_id(token) for token in _END_TOKENS[family]]
    return [i for i in ids if i is not None]


def stop_at(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` before the first stop string, and whether one occurred. A trailing replacement
    character may be a character whose last bytes are still to come: nothing is matched
    across it until it is complete."""
    complete = text.rstrip("\ufffd")
    cuts = [complete.find(s) for s in stop if s and s in complete]
    return (text[: min(cuts)], True) if cuts else (text, False)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One conversation to answer: a user's question (a string) or chat messages, about
    `video` (or none), sampled to `num_frames` frames (with `fps`: at that rate, at most
    that many)."""

    messages: str | Sequence[dict]
    video: str | os.PathLike | None = None
    num_frames: int = 8
    fps: float | None = None


class Prepared(NamedTuple):
    """Prompts ready to prefill: token ids, the embedding table, each prompt's first row."""

    ids: list[np.ndarray]
    table: jax.Array | None
    offsets: list[int]


class Generator:
    """A model, its tokenizer and chat template, an inference engine and an embedding cache."""

    def __init__(self, model: LongVILA, tokenizer: str | os.PathLike, *, family: str,
                 mesh=None, scheme: str = "auto", cache_dir: str | os.PathLike | None = None,
                 cache_entries: int = 8, decode_chunk: int = 16):
        self.family, self.tokenizer_path = family, tokenizer
        self.tokenizer = load_tokenizer(tokenizer)
        self.stop_ids = end_of_turn_ids(self.tokenizer, family)
        self.engine = InferenceEngine(model, mesh=mesh, scheme=scheme, decode_chunk=decode_chunk)
        self.model = self.engine.model  # the engine's view: no second copy of the layers
        self.embeddings = None if model.vision_tower is None else VideoEmbeddingCache(
            self.engine, model, directory=cache_dir, memory_entries=cache_entries)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, *,
                        tokenizer: str | os.PathLike | None = None, **kwargs) -> Generator:
        """Load a checkpoint; the tokenizer is `tokenizer`, else the checkpoint's own
        (`tokenizer/`, which training and import-hf write), else the one its config names
        (`data.tokenizer`)."""
        from longvila_jax.checkpoint import load_config, load_model

        config = load_config(checkpoint)
        if tokenizer is None:
            own = Path(checkpoint) / "tokenizer"
            tokenizer = own if (own / "tokenizer.json").is_file() else (
                config.data.get("tokenizer") or own)
        return cls(load_model(checkpoint, config), tokenizer, family=config.model.llm.family,
                   **kwargs)

    def prompt_ids(self, prompt: str | Sequence[dict], num_frames: int = 0) -> np.ndarray:
        """Token ids int32 `[seq]` of a conversation ending with the assistant header: one
        user turn (`prompt` a string) or chat messages (`{"role", "content"}`), the video
        (when `num_frames` > 0) first or where the text writes `<video>`, its placeholder
        expanded to its frames' positions."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) \
            else list(prompt)
        messages = place_media(messages, "video" if num_frames else None)
        ids, _ = tokenize_messages(
            self.tokenizer, self.family, messages, media_token_id=self.model.media_token_id,
            tokens_per_frame=self.engine.tokens_per_frame,
            frames_per_media=[num_frames] if num_frames else [], add_generation_prompt=True)
        return ids

    def prepare(self, prompts: Sequence[Prompt]) -> Prepared:
        """The prompts' token ids and one embedding table holding each distinct video's rows
        once (sampled and encoded through the embedding cache), with each prompt's offset."""
        if not prompts:
            raise ValueError("generate: no prompts")
        tables, offsets, ids, rows, seen = [], [], [], 0, {}
        for prompt in prompts:
            frames, key = 0, (prompt.video, prompt.num_frames, prompt.fps)
            if prompt.video is not None:
                if self.embeddings is None:
                    raise ValueError("generate: a video was given to a model without a "
                                     "vision tower")
                if key not in seen:  # each video's rows once in the table
                    table = self.embeddings.get(prompt.video, prompt.num_frames, prompt.fps)
                    seen[key] = (rows, table.shape[0])
                    tables.append(table.reshape(-1, table.shape[-1]))
                    rows += tables[-1].shape[0]
                frames = seen[key][1]
            offsets.append(seen[key][0] if prompt.video is not None else 0)
            ids.append(self.prompt_ids(prompt.messages, frames))
        table = None if not tables else tables[0] if len(tables) == 1 else jnp.concatenate(tables)
        return Prepared(ids, table, offsets)

    def generate_ids(self, prepared: Prepared, sampling: Sampling,
                     done: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
        """`sampling.n` answers' token ids per prepared prompt, prompt-major, in one prefill
        and one decoding (`InferenceEngine.generate_ids`); ended at the template's
        end-of-turn token, by `done`, or after `sampling.max_new_tokens`."""
        sampling = dataclasses.replace(sampling, stop_ids=tuple(self.stop_ids))
        return self.engine.generate_ids(prepared.ids, prepared.table, prepared.offsets,
                                        sampling=sampling, done=done)

    def generate(self, prompts: str | Sequence[str], *,
                 video: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 num_frames: int = 8, fps: float | None = None, n: int = 1,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] = (), seed: int = 0) -> list[str]:
        """`n` answers per prompt (a single string is a batch of one), prompt-major, all in
        one prefill and one decoding: answer j of prompt i is item `i * n + j`.

        `video` is one video for every prompt or a list with one per prompt (each sampled to
        `num_frames` frames; with `fps`, at that rate and at most that many, and encoded
        once however many prompts ask about it).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        videos = [video] * len(prompts) if video is None or isinstance(video, str | os.PathLike) \
            else list(video)
        if len(videos) != len(prompts):
            raise ValueError(f"generate: {len(videos)} videos for {len(prompts)} prompts")
        prepared = self.prepare([Prompt(p, v, num_frames, fps)
                                 for p, v in zip(prompts, videos, strict=True)])
        stop = [s for s in stop if s]

        def done(row: int, row_ids: list[int]) -> bool:
            return stop_at(self.tokenizer.decode(row_ids), stop)[1]

        answers = self.generate_ids(prepared, Sampling(max_new_tokens, n, temperature, top_p,
                                                       seed), done=done if stop else None)
        return [stop_at(self.tokenizer.decode(a), stop)[0] for a in answers]
