"""The training data pipeline on grain: conversation records in, packed sequences out.

Order of stages, and why:

1. Per source: one endless stream, a fresh seeded permutation of its records per epoch, of
   which this reader (one shard of the run's data-parallel rows) takes its turns
   (`position.Share`: every record is read by exactly one shard per epoch, whatever the
   shard count); sources are then mixed by weight (grain's `MapDataset.mix`). Every read
   carries its `sample_ids` row (`ID_COLUMNS`) through to the batch.
2. `_Load` decodes the media (OpenCV, `video.load_frames`) and tokenises the chat with its
   media placeholders expanded. It runs in grain worker processes (`mp_prefetch`), never in
   the training process. Bad media does not raise there: the record comes back as a
   `{"skip": reason, "source": index}` marker, because a raise inside a worker would stop
   the whole pipeline; a file that failed is remembered (per worker) and skipped without
   being opened again in later epochs, still counted.
3. `_DropSkipped`, in the training process, drops the markers (their ids go on with the
   next sample), logs each bad path once, and stops with one line naming the source when a
   source has produced nothing but failures.
4. Packing (`packing.pack`) into fixed token/frame budgets with segment ids and positions,
   padding to the multiple sequence parallelism needs, each row's labels shifted into
   targets and its media rows (`data.batch.Batch`'s fields), and batching.
5. `_Position` marks the samples each batch consumed and counts the skipped ones by reason.

Every stage's iterator state is JSON, so grain's orbax handler saves the whole pipeline next
to the model, one file per process. `build(..., saved=...)` resumes from those files: the
same shard restores exactly (the next batch is the same); after a change of process or
data-group count the shards are merged into the samples consumed, and no sample of an
epoch is read twice or missed (`position`).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import grain
import jax
import numpy as np
import tokenizers

from longvila_jax.data import packing
from longvila_jax.data.batch import next_tokens
from longvila_jax.data.media import media_rows
from longvila_jax.data.position import Coverage, Progress, Share, merge
from longvila_jax.data.text_sources import read_jsonl, tokenize_conversation
from longvila_jax.data.video import REASONS, MediaError, load_frames

# A source whose first this-many samples all failed is broken, not unlucky.
ALL_FAILED_AFTER = 16
# Why a sample was skipped: the media reasons, and a record the text side rejects
# (no human turn, a placeholder without media, ...).
SKIP_REASONS = (*REASONS, "bad_record")
# A batch's `sample_ids[row]` is `[n, 5]`, a row per sample the row consumed: its source,
# its index among this shard's reads of the source, its stream position (epoch =
# position // records), its record (index into the source's records) and 0, or 1 + its
# index in SKIP_REASONS when it was skipped.
ID_COLUMNS = ("source", "read", "position", "record", "skipped")


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
    """`(sample_ids, record)` -> sample dict (`input_ids`, `labels`, `frames`), or a skip
    marker; both keep the `sample_ids`."""

    def __init__(self, sources: list[Source], spec: SampleSpec, tokenizer_json: str):
        self._sources, self._spec, self._tokenizer_json = sources, spec, tokenizer_json
        self._tokenizer = None  # loaded in the worker, on first use
        # (path, frame count) -> the arguments of the MediaError it raised: a bad file stays bad
        # for the run, so later epochs skip it without decoding it again. Each grain worker
        # process holds its own copy of this object, so each learns a file's failure once, the
        # first time it meets the file.
        self._failed: dict[tuple[str, int], tuple[str, str, str]] = {}

    def _frames(self, path: str, count: int) -> np.ndarray:
        """`load_frames`, raising a file's remembered error instead of decoding it again."""
        if (path, count) in self._failed:
            raise MediaError(*self._failed[path, count])
        try:
            return load_frames(path, count, image_size=self._spec.image_size, fps=self._spec.fps)
        except MediaError as e:
            self._failed[path, count] = e.args  # not `e`: its traceback holds decoded frames
            raise

    def map(self, element):
        ids, record = element
        return {**self._load(int(ids[0, 0]), record), "sample_ids": ids}

    def _load(self, index: int, record: dict) -> dict:
        spec, source = self._spec, self._sources[index]
        if self._tokenizer is None:
            self._tokenizer = tokenizers.Tokenizer.from_file(self._tokenizer_json)
        media = record.get("video") or record.get("image")
        try:
            if media:
                count = spec.num_frames if record.get("video") else 1
                frames = self._frames(os.path.join(source.media_root, media), count)
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
    """Drops skip markers; see the module docstring."""

    def __init__(self, parent, sources: list[Source]):
        super().__init__(parent)
        self._sources = sources

    def __iter__(self):
        return _DropSkippedIterator(self._parent.__iter__(), self._sources)


class _DropSkippedIterator(grain.DatasetIterator):
    """Drops skip markers, handing their `sample_ids` (marked with the reason) on with the
    next sample, so that the position and the skip counts see them when its row is
    emitted; stops the run when a source has produced nothing but failures."""

    def __init__(self, parent, sources: list[Source]):
        super().__init__(parent)
        self._sources = sources
        self.skipped = np.zeros((len(sources), len(SKIP_REASONS)), np.int64)
        self.loaded = np.zeros(len(sources), np.int64)
        self._carried: list[list[int]] = []
        self._logged: set[str] = set()

    def __next__(self):
        while True:
            element = next(self._parent)
            ids = element.pop("sample_ids")
            if "skip" not in element:
                self.loaded[element.pop("source")] += 1
                if self._carried:
                    ids = np.concatenate([np.asarray(self._carried, np.int64), ids])
                    self._carried = []
                return {**element, "sample_ids": ids}
            index, reason = element["source"], SKIP_REASONS[element["skip"]]
            self.skipped[index, element["skip"]] += 1
            ids[:, ID_COLUMNS.index("skipped")] = 1 + element["skip"]
            self._carried += ids.tolist()
            if element["message"] not in self._logged:
                self._logged.add(element["message"])
                logging.warning("skipping sample (%s): %s", reason, element["message"])
            if self.loaded[index] == 0 and self.skipped[index].sum() >= ALL_FAILED_AFTER:
                counts = ", ".join(f"{r} {n}" for r, n in zip(SKIP_REASONS, self.skipped[index],
                                                              strict=True) if n)
                raise DataError(f"source {self._sources[index].name!r} "
                                f"({self._sources[index].jsonl}): every one of its first "
                                f"{self.skipped[index].sum()} samples failed ({counts})")

    def get_state(self):
        return {"parent": self._parent.get_state(), "skipped": self.skipped.tolist(),
                "loaded": self.loaded.tolist(), "carried": list(self._carried)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.skipped = np.asarray(state["skipped"], np.int64)
        self.loaded = np.asarray(state["loaded"], np.int64)
        self._carried = list(state["carried"])


class _ShareOf(grain.MapDataset):
    """A shard's reads of one source: read k -> (`sample_ids` row, record), the record
    being the one at the shard's k-th stream position (`position.Share`)."""

    def __init__(self, records, source: int, share: Share, seed: int):
        # Position g of the stream is record order[g]: a fresh permutation per epoch.
        super().__init__(grain.MapDataset.range(len(records)).shuffle(seed=seed).repeat())
        self._records, self._source, self._share = records, source, share

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        position = int(self._share.positions(self._source, [index])[0])
        record = self._parent[position]
        return (np.array([[self._source, index, position, record, 0]], np.int64),
                self._records[record])


def source_stream(records, source: int, share: Share, seed: int) -> grain.MapDataset:
    """Shard `share`'s endless reads of one source's `records` (a sequence); every record
    is read by exactly one shard per epoch."""
    if not len(records):
        raise DataError(f"source {source}: no records")
    return _ShareOf(records, source, share, seed)


def build(sources: list[Source], spec: SampleSpec, tokenizer_json: str, *, tokens: int,
          frames: int, batch_size: int, pad_multiple: int = 1, pad_id: int = 0, seed: int = 0,
          workers: int = 0, shard: tuple[int, int] | None = None,
          saved: list[dict] | None = None,
          pack_stats: packing.PackStats | None = None) -> grain.IterDataset:
    """The whole pipeline as one grain IterDataset of packed batches.

    `tokens` / `frames`: budgets of one packed sequence; `pad_multiple`: its length's
    multiple (2 x the ring size for zigzag sequence parallelism); `workers`: grain worker
    processes for decoding (0: in this process, for tests; grain's workers read absl's
    flags, so outside `absl.app.run`, as the CLI runs, mark them parsed first:
    `absl.flags.FLAGS.mark_as_parsed()`); `shard`: (index, count) of this
    reader, default the jax process index/count; `saved`: the data states of a run
    checkpoint (every process's, see `resume`), to continue where they stopped;
    `pack_stats` counts the samples too long for the budgets (dropped by the packer, in
    this process). Each batch's `sample_ids` lists, per row, the `ID_COLUMNS` of the
    samples it consumed (packed, or skipped on the way).
    """
    share, state = resume(saved, *(shard or (jax.process_index(), jax.process_count())),
                          len(sources))
    per_source = [source_stream(read_jsonl(source.jsonl), i, share, seed + i)
                  for i, source in enumerate(sources)]
    weights = [source.weight for source in sources]
    mixed = per_source[0] if len(sources) == 1 else grain.MapDataset.mix(per_source, weights)
    loaded = mixed.map(_Load(sources, spec, tokenizer_json)).to_iter_dataset()
    if workers:
        loaded = loaded.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    packed = packing.pack(_DropSkipped(loaded, sources), tokens=tokens, frames=frames, seed=seed,
                          pad_id=pad_id, stats=pack_stats, sample_ids=True)
    rows = packed.map(_Row(pad_multiple, pad_id, spec.media_token_id))
    return _Position(rows.batch(batch_size, batch_fn=_stack), share, len(sources), state)


class _Row(grain.transforms.Map):
    """A packed row as a `Batch` row: padded to the layout's multiple, its labels shifted into
    targets within each sample (so no sample is trained to predict its packed neighbour),
    and its media positions' rows in its own frames."""

    def __init__(self, multiple: int, pad_id: int, media_token_id: int):
        self._multiple, self._pad_id, self._media = multiple, pad_id, media_token_id

    def map(self, row):
        row = packing.pad_to_multiple(row, self._multiple, pad_id=self._pad_id)
        labels = row.pop("labels")
        return {**row, "targets": next_tokens(labels, row["segment_ids"]),
                "media_rows": media_rows(row["input_ids"], self._media)}


def _stack(rows: list[dict]) -> dict:
    """Rows -> a batch; `sample_ids` stays a list (rows consume different sample counts)."""
    batch = {k: np.stack([row[k] for row in rows]) for k in rows[0] if k != "sample_ids"}
    batch["sample_ids"] = [row["sample_ids"] for row in rows]
    return batch


def build_text(source, *, batch_size: int, seed: int = 0,
               shard: tuple[int, int] | None = None,
               saved: list[dict] | None = None) -> grain.IterDataset:
    """Batches for the context-extension stage from a chunked text source
    (`text_sources.TextJsonlSource` or `TokenArraySource`, chunks of the stage's length).

    Each chunk is one sequence (segment 1, positions 0..length-1), so nothing is packed;
    chunks are read as `build`'s records are (a fresh permutation per epoch, shards taking
    turns) and resume the same way.
    """
    share, state = resume(saved, *(shard or (jax.process_index(), jax.process_count())), 1)
    chunks = source_stream(source, 0, share, seed).map(_WholeSequence()).to_iter_dataset()
    return _Position(chunks.batch(batch_size, batch_fn=_stack), share, 1, state)


class _WholeSequence(grain.transforms.Map):
    """A chunk as a `Batch` row: one segment, no media."""

    def map(self, element):
        ids, chunk = element
        length = len(chunk["input_ids"])
        segments = np.ones(length, np.int32)
        return {"input_ids": chunk["input_ids"],
                "targets": next_tokens(np.asarray(chunk["labels"]), segments),
                "segment_ids": segments, "positions": np.arange(length, dtype=np.int32),
                "media_rows": np.full(length, -1, np.int32), "sample_ids": ids}


def resume(saved: list[dict] | None, index: int, count: int,
           sources: int) -> tuple[Share, dict | None]:
    """Shard `index` of `count`'s reading order and the `_Position` state to start from.

    With no saved states: the start of every stream. When a saved shard is this one (same
    index and count, e.g. the same processes, or hosts that split one sequence), its state
    is restored exactly. Otherwise the saved shards are merged into what they consumed and
    this shard reads its turn of the rest (`position.merge`); the skip counts so far carry
    over into shard 0.
    """
    if not saved:
        return Share(index, count, Coverage.empty(sources)), None
    if any("share" not in state for state in saved):
        raise DataError("run checkpoint: its data position is in the older per-process "
                        "form, which this version cannot resume; start the run afresh")
    distinct = {state["share"]["index"]: state for state in saved}
    shares = {i: Share.from_json(state["share"]) for i, state in distinct.items()}
    if len(distinct) != next(iter(shares.values())).count:
        raise DataError(f"run checkpoint: data position has shards {sorted(distinct)} of "
                        f"{next(iter(shares.values())).count}; a shard's file is missing")
    saved_sources = len(next(iter(shares.values())).start.base)
    if saved_sources != sources:
        raise DataError(f"run checkpoint: its data position has {saved_sources} sources, "
                        f"the config {sources}")
    mine = shares.get(index)
    if mine is not None and mine.count == count:
        return mine, distinct[index]
    coverage = merge([(shares[i], Progress.from_json(distinct[i]["progress"]))
                      for i in sorted(distinct)])
    skipped = np.sum([state["skipped"] for state in distinct.values()], axis=0)
    return Share(index, count, coverage), {"skipped": (skipped * (index == 0)).tolist()}


class _Position(grain.IterDataset):
    """The last stage: what the batches so far consumed, as a process-count-free state."""

    def __init__(self, parent, share: Share, sources: int, state: dict | None):
        super().__init__(parent)
        self._share, self._sources, self._state = share, sources, state

    def __iter__(self):
        iterator = _PositionIterator(self._parent.__iter__(), self._share, self._sources)
        if self._state is not None:
            iterator.set_state(self._state)
        return iterator


class _PositionIterator(grain.DatasetIterator):
    """Marks each batch's samples consumed (`position.Progress`), counts skipped ones by
    reason, and turns each row's ids into global ones (`ID_COLUMNS`)."""

    def __init__(self, parent, share: Share, sources: int):
        super().__init__(parent)
        self._share = share
        self._progress = Progress.empty(sources)
        self._skipped = np.zeros((sources, len(SKIP_REASONS)), np.int64)

    def __next__(self):
        batch = next(self._parent)
        for ids in batch["sample_ids"]:
            for source, read, _, _, skipped in ids:
                self._progress.add(int(source), int(read))
                if skipped:
                    self._skipped[source, skipped - 1] += 1
        return batch

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason, summed over sources (for training metrics)."""
        return {f"data/skipped_{r}": int(n) for r, n in zip(SKIP_REASONS, self._skipped.sum(0),
                                                            strict=True)}

    def get_state(self):
        return {"parent": self._parent.get_state(), "share": self._share.to_json(),
                "progress": self._progress.to_json(), "skipped": self._skipped.tolist()}

    def set_state(self, state):
        """A saved state of this shard, or only `skipped` (counts merged from other shards,
        for a fresh start)."""
        if "parent" in state:
            self._parent.set_state(state["parent"])
            self._progress = Progress.from_json(state["progress"])
        self._skipped = np.asarray(state["skipped"], np.int64)
