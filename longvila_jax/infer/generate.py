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

import os
from collections.abc import Sequence
from pathlib import Path

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


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` before the first stop string, and whether one occurred."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class Generator:
    """A model, its tokenizer and chat template, an inference engine and an embedding cache."""

    def __init__(self, model: LongVILA, tokenizer: str | os.PathLike, *, family: str,
                 mesh=None, scheme: str = "auto", cache_dir: str | os.PathLike | None = None,
                 decode_chunk: int = 16):
        self.family, self.tokenizer_path = family, tokenizer
        self.tokenizer = load_tokenizer(tokenizer)
        self.stop_ids = end_of_turn_ids(self.tokenizer, family)
        self.engine = InferenceEngine(model, mesh=mesh, scheme=scheme, decode_chunk=decode_chunk)
        self.model = self.engine.model  # the engine's view: no second copy of the layers
        self.embeddings = None if model.vision_tower is None else VideoEmbeddingCache(
            self.engine, model, directory=cache_dir)

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

    def prompt_ids(self, prompt: str, num_frames: int = 0) -> np.ndarray:
        """Token ids int32 `[seq]` of one user turn ending with the assistant header, the video
        (when `num_frames` > 0) first or where the prompt writes `<video>`, its placeholder
        expanded to its frames' positions."""
        video = "video" if num_frames else None
        messages = place_media([{"role": "user", "content": prompt}], video)
        ids, _ = tokenize_messages(
            self.tokenizer, self.family, messages, media_token_id=self.model.media_token_id,
            tokens_per_frame=self.engine.tokens_per_frame,
            frames_per_media=[num_frames] if num_frames else [], add_generation_prompt=True)
        return ids

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
        if not prompts:
            raise ValueError("generate: no prompts")
        videos = [video] * len(prompts) if video is None or isinstance(video, str | os.PathLike) \
            else list(video)
        if len(videos) != len(prompts):
            raise ValueError(f"generate: {len(videos)} videos for {len(prompts)} prompts")
        tables, offsets, ids, rows, seen = [], [], [], 0, {}
        for prompt, path in zip(prompts, videos, strict=True):
            frames = 0
            if path is not None:
                if self.embeddings is None:
                    raise ValueError("generate: a video was given to a model without a "
                                     "vision tower")
                if path not in seen:  # each video's rows once in the table
                    table = self.embeddings.get(path, num_frames, fps)
                    seen[path] = (rows, table.shape[0])
                    tables.append(table)
                    rows += table.shape[0] * table.shape[1]
                frames = seen[path][1]
            offsets.append(seen[path][0] if path is not None else 0)
            ids.append(self.prompt_ids(prompt, frames))
        table = None if not tables else tables[0] if len(tables) == 1 else jnp.concatenate(
            [t.reshape(-1, t.shape[-1]) for t in tables])
        stop = [s for s in stop if s]

        def done(row: int, row_ids: list[int]) -> bool:
            # A trailing replacement character may be a character whose last bytes are
            # still to come: it is not matched until it is complete.
            return _cut_at_stop(self.tokenizer.decode(row_ids).rstrip("\ufffd"), stop)[1]

        sampling = Sampling(max_new_tokens, n, temperature, top_p, seed, self.stop_ids)
        answers = self.engine.generate_ids(ids, table, offsets, sampling=sampling,
                                           done=done if stop else None)
        return [_cut_at_stop(self.tokenizer.decode(a), stop)[0] for a in answers]
