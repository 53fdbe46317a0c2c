"""The training data pipeline on grain: conversation records in, packed sequences out.

Order of stages, and why:

1. Per source: the record list, this host's shard (`process_index::process_count`, taken
   before shuffling so every record lands on exactly one host per epoch), a seeded shuffle,
   and endless repetition; sources are then mixed by weight (grain's `MapDataset.mix`).
2. `_Load` decodes the media (OpenCV, `video.load_frames`) and tokenises the chat with its
   media placeholders expanded. It runs in grain worker processes (`mp_prefetch`), never in
   the training process. Bad media does not raise there: the record comes back as a
   `{"skip": reason, "source": index}` marker, because a raise inside a worker would stop
   the whole pipeline.
3. `_DropSkipped`, in the training process, drops the markers, counts them per source and
   reason (the counts travel in the iterator's state, so they survive a restore), logs each
   bad path once, and stops with one line naming the source when a source has produced
   nothing but failures.
4. Packing (`packing.pack`) into fixed token/frame budgets with segment ids and positions,
   padding to the multiple sequence parallelism needs, and batching.

Every stage's iterator state is JSON, so grain's orbax handler saves and restores the
whole pipeline next to the model; after a restore the next batch is the same.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import grain
import jax
import numpy as np
import tokenizers
from absl import flags

from longvila_jax.data import packing
from longvila_jax.data.text_sources import read_jsonl, tokenize_conversation
from longvila_jax.data.video import REASONS, MediaError, load_frames

# A source whose first this-many samples all failed is broken, not unlucky.
ALL_FAILED_AFTER = 16
# Why a sample was skipped: the media reasons, and a record the text side rejects
# (no human turn, a placeholder without media, ...).
SKIP_REASONS = (*REASONS, "bad_record")


class DataError(RuntimeError):
    """The pipeline cannot go on; the message names the source."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One conversation JSONL file, its media root and its mixing weight."""

    name: str
    jsonl: str
    media_root: str
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """How a record becomes a training sample (from the model config and the stage)."""

    family: str  # chat template: "qwen2" or "llama"
    media_token_id: int
    tokens_per_frame: int  # vision tokens per frame, the per-frame newline included
    num_frames: int  # frames sampled per video (uniform, or fps-based capped at this)
    image_size: int
    fps: float | None = None


class _Load(grain.transforms.Map):
    """Record -> sample dict (`input_ids`, `labels`, `frames`), or a skip marker."""

    def __init__(self, sources: list[Source], spec: SampleSpec, tokenizer_json: str):
        self._sources, self._spec, self._tokenizer_json = sources, spec, tokenizer_json
        self._tokenizer = None  # loaded in the worker, on first use

    def map(self, element):
        index, record = element
        spec, source = self._spec, self._sources[index]
        if self._tokenizer is None:
            self._tokenizer = tokenizers.Tokenizer.from_file(self._tokenizer_json)
        media = record.get("video") or record.get("image")
        try:
            if media:
                count = spec.num_frames if record.get("video") else 1
                frames = load_frames(os.path.join(source.media_root, media), count,
                                     image_size=spec.image_size, fps=spec.fps)
            else:
                frames = np.zeros((0, spec.image_size, spec.image_size, 3), np.float32)
            sample = tokenize_conversation(self._tokenizer, spec.family, record,
                                           media_token_id=spec.media_token_id,
                                           tokens_per_frame=spec.tokens_per_frame,
                                           num_frames=len(frames))
        except MediaError as e:
            return {"skip": SKIP_REASONS.index(e.reason), "source": index, "message": str(e)}
        except ValueError as e:  # the record itself is malformed
            return {"skip": SKIP_REASONS.index("bad_record"), "source": index,
                    "message": f"{source.jsonl}: {e}"}
        return {"input_ids": sample["input_ids"], "labels": sample["labels"], "frames": frames,
                "source": index}


class _DropSkipped(grain.IterDataset):
    """Drops skip markers, counting them per (source, reason); see the module docstring."""

    def __init__(self, parent, sources: list[Source]):
        super().__init__(parent)
        self._sources = sources

    def __iter__(self):
        return _DropSkippedIterator(self._parent.__iter__(), self._sources)


class _DropSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent, sources: list[Source]):
        super().__init__(parent)
        self._sources = sources
        self.skipped = np.zeros((len(sources), len(SKIP_REASONS)), np.int64)
        self.loaded = np.zeros(len(sources), np.int64)
        self._logged: set[str] = set()

    def __next__(self):
        while True:
            element = next(self._parent)
            if "skip" not in element:
                self.loaded[element.pop("source")] += 1
                return element
            index, reason = element["source"], SKIP_REASONS[element["skip"]]
            self.skipped[index, element["skip"]] += 1
            if element["message"] not in self._logged:
                self._logged.add(element["message"])
                logging.warning("skipping sample (%s): %s", reason, element["message"])
            if self.loaded[index] == 0 and self.skipped[index].sum() >= ALL_FAILED_AFTER:
                counts = ", ".join(f"{r} {n}" for r, n in zip(SKIP_REASONS, self.skipped[index],
                                                              strict=True) if n)
                raise DataError(f"source {self._sources[index].name!r} "
                                f"({self._sources[index].jsonl}): every one of its first "
                                f"{self.skipped[index].sum()} samples failed ({counts})")

    def counts(self) -> dict[str, int]:
        """Skipped samples by reason, summed over sources (for training metrics)."""
        return {f"data/skipped_{r}": int(n) for r, n in zip(SKIP_REASONS, self.skipped.sum(0),
                                                            strict=True)}

    def get_state(self):
        return {"parent": self._parent.get_state(), "skipped": self.skipped.tolist(),
                "loaded": self.loaded.tolist()}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.skipped = np.asarray(state["skipped"], np.int64)
        self.loaded = np.asarray(state["loaded"], np.int64)


def host_stream(source: Source, index: int, count: int, seed: int) -> grain.MapDataset:
    """This host's records of `source`, endlessly, each epoch a fresh seeded permutation of
    the host's share (every record on exactly one host per epoch)."""
    records = read_jsonl(source.jsonl)[index::count]
    if not records:
        raise DataError(f"source {source.name!r} ({source.jsonl}): no records for host "
                        f"{index} of {count}")
    return grain.MapDataset.source(records).shuffle(seed=seed).repeat()


class _Tag(grain.transforms.Map):
    """record -> (source index, record): a class, not a lambda, so workers can unpickle it."""

    def __init__(self, index: int):
        self._index = index

    def map(self, record):
        return self._index, record


def build(sources: list[Source], spec: SampleSpec, tokenizer_json: str, *, tokens: int,
          frames: int, batch_size: int, pad_multiple: int = 1, pad_id: int = 0, seed: int = 0,
          workers: int = 0, shard: tuple[int, int] | None = None,
          pack_stats: packing.PackStats | None = None) -> grain.IterDataset:
    """The whole pipeline as one grain IterDataset of packed batches.

    `tokens` / `frames`: budgets of one packed sequence; `pad_multiple`: its length's
    multiple (2 x the ring size for zigzag sequence parallelism); `workers`: grain worker
    processes for decoding (0: in this process, for tests); `shard`: (index, count) of this
    host, default the jax process index/count; `pack_stats` counts the
    samples too long for the budgets (dropped by the packer, in this process).
    """
    index, count = shard or (jax.process_index(), jax.process_count())
    per_source = [host_stream(source, index, count, seed + i).map(_Tag(i))
                  for i, source in enumerate(sources)]
    weights = [source.weight for source in sources]
    mixed = per_source[0] if len(sources) == 1 else grain.MapDataset.mix(per_source, weights)
    loaded = mixed.map(_Load(sources, spec, tokenizer_json)).to_iter_dataset()
    if workers:
        # grain's worker processes read absl flags and fail if they are unparsed, which
        # they are outside `absl.app.run` (notebooks, tests, plain scripts).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        loaded = loaded.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    packed = packing.pack(_DropSkipped(loaded, sources), tokens=tokens, frames=frames, seed=seed,
                          pad_id=pad_id, stats=pack_stats)
    return packed.map(_PadTo(pad_multiple, pad_id)).batch(batch_size)


class _PadTo(grain.transforms.Map):
    def __init__(self, multiple: int, pad_id: int):
        self._multiple, self._pad_id = multiple, pad_id

    def map(self, example):
        return packing.pad_to_multiple(example, self._multiple, pad_id=self._pad_id)


def build_text(source, *, batch_size: int, seed: int = 0,
               shard: tuple[int, int] | None = None) -> grain.IterDataset:
    """Batches for the context-extension stage from a chunked text source
    (`text_sources.TextJsonlSource` or `TokenArraySource`, chunks of the stage's length).

    Each chunk is one sequence (segment 1, positions 0..length-1), so nothing is packed;
    chunks are sharded over hosts, shuffled per epoch from `seed`, and repeated.
    """
    index, count = shard or (jax.process_index(), jax.process_count())
    chunks = grain.MapDataset.source(source)[index::count]
    if len(chunks) == 0:
        raise DataError(f"text source: no chunks for host {index} of {count}")
    return (chunks.shuffle(seed=seed).repeat().map(_WholeSequence()).to_iter_dataset()
            .batch(batch_size))


class _WholeSequence(grain.transforms.Map):
    def map(self, chunk):
        length = len(chunk["input_ids"])
        return {**chunk, "segment_ids": np.ones(length, np.int32),
                "positions": np.arange(length, dtype=np.int32)}


def skip_counts(iterator) -> dict[str, int]:
    """Skipped-sample counts of a `build(...)` iterator, for the training metrics."""
    node = iterator
    while not isinstance(node, _DropSkippedIterator):
        node = node._parent  # grain iterators chain through `_parent`
    return node.counts()
