"""V-NIAH: find one needle frame hidden in a long haystack video, over frame counts x depths.

For each frame count F the haystack video is sampled to F frames once (`load_frames`); for each
depth d a needle (a frame showing a fact drawn by `synthetic.needle_frame`, or a short clip of
n frames) replaces frames `round(d * (F - n))` onwards, and the model is asked the needle's
question. A frame's embedding depends on that frame alone, so the haystack and the needles
are each encoded once and every cell splices the needle's embedding rows into the
haystack's: a 2048-frame grid costs one pass of the vision tower, not one per cell.

Scoring follows LongVA: the answer is teacher-forced (the prompt holds question and answer, one
forward pass), the greedy argmax at the positions that predict the answer's tokens is decoded,
and it counts as correct when it equals the answer after lower-casing and removing whitespace.
Only the answer text is scored, not the template's end-of-turn marker, which tests the chat
format rather than retrieval. Teacher forcing asks for no generation loop and no stopping rule,
so a score depends on the model alone.

Three pieces, each usable alone: a `Grid` says what to score (frame counts x depths x
needles in one haystack); a `NeedleScorer` runs the model over it, one frame count's inputs
encoded at a time (`encode`) and one cell scored at a time (`teacher_forced`, and
`generated`: free greedy generation from a prompt ending at the assistant header, scored the
same way); `write_results` writes `needle.json` and `needle_heatmap.png`. `evaluate` composes
them for the CLI and the demo. The model is reached through an `InferenceEngine` (frames
spread over its devices, prefill sharded over its sequence group), or through
`encode_fn`/`logits_fn` functions that tests replace.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import tokenizers
from matplotlib.figure import Figure
from tqdm import tqdm

from longvila_jax.atomic import atomic_file, remove_temporaries
from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.data.synthetic import needle_frame
from longvila_jax.data.templates import place_media, tokenize_messages
from longvila_jax.data.text_sources import jsonl_records
from longvila_jax.data.tokenizer import load_tokenizer
from longvila_jax.data.video import frame_to_model_input, load_frames
from longvila_jax.infer.decode import Sampling
from longvila_jax.infer.engine import InferenceEngine
from longvila_jax.infer.generate import end_of_turn_ids
from longvila_jax.models.longvila import LongVILA

DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

# Every prompt of one frame count is right-padded to one length, a multiple of this, so that a
# frame count compiles one forward pass and blockwise kernels see whole blocks.
SEQ_MULTIPLE = 64
# Free generation may run this many tokens past the answer's length before it must stop.
GENERATION_SLACK = 4

# `frames float32 [F, H, W, 3]` -> embeddings `[F, media_tokens_per_frame, hidden]`.
EncodeFn = Callable[[np.ndarray], Any]
# `(input_ids int32 [batch, seq], table [batch * F, tokens, hidden] batch-major, start)`
# -> float logits `[batch, seq - start, vocab]` at positions `start..seq-1`: only the window
# that holds the answer, since `[seq, vocab]` logits of a long video do not fit in memory.
LogitsFn = Callable[[np.ndarray, Any, int], np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class Needle:
    """A uint8 RGB frame `[H, W, 3]` (or clip `[n, H, W, 3]`) showing one fact, and a question
    whose answer is it."""

    frame: np.ndarray
    question: str
    answer: str

    @property
    def frames(self) -> np.ndarray:
        """The needle as a clip `[n, H, W, 3]` (n = 1 for a frame)."""
        return self.frame if self.frame.ndim == 4 else self.frame[None]


def make_needles(count: int, width: int, height: int, *, seed: int) -> list[Needle]:
    """`count` needles drawn by `synthetic.needle_frame`.

    Needle i is the needle of record i of `make_needle_dataset(..., seed=seed)`, so the video
    dataset and this in-memory evaluation can be compared needle for needle.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    needles = []
    for i in range(count):
        _, needle_seed = np.random.SeedSequence([seed, i]).generate_state(2)
        frame, question, answer = needle_frame(width, height, seed=int(needle_seed))
        needles.append(Needle(frame, question, answer))
    return needles


def load_needles(jsonl: str | os.PathLike) -> list[Needle]:
    """Needles from a JSONL file: `{"image": path, "question", "answer"}` for a frame, or
    `{"video": path, "num_frames": n, "question", "answer"}` for a clip of n frames sampled
    evenly; paths relative to the file's folder."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise FileNotFoundError(f"{jsonl}: no such needles file")
    needles = []
    for number, record in jsonl_records(jsonl):
        where = f"{jsonl}:{number}"
        for key in ("question", "answer"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string")
        if ("image" in record) == ("video" in record):
            raise ValueError(f"{where}: give exactly one of 'image' and 'video'")
        media = jsonl.parent / record.get("image", record.get("video"))
        count = 1 if "image" in record else record.get("num_frames", 1)
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{where}: 'num_frames' must be an integer >= 1, got {count!r}")
        needles.append(Needle(_pixels(media, count) if "video" in record else _image(media),
                              record["question"], record["answer"]))
    if not needles:
        raise ValueError(f"{jsonl}: no needles")
    return needles


def _image(path: Path) -> np.ndarray:
    """An image file's uint8 RGB pixels, as they are."""
    import cv2

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such needle image")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: OpenCV cannot decode it as an image")
    return image[..., ::-1].copy()


def _pixels(path: Path, count: int) -> np.ndarray:
    """`count` evenly sampled frames of a video as uint8 RGB `[count, S, S, 3]`, S its
    larger side (`load_frames` resizes to a square, as the model's input is): offset 0 and
    scale 1/255 undo its normalisation."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        side = max(int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                   int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), 1)
    finally:
        capture.release()
    frames = load_frames(path, count, image_size=side, mean=0.0, std=1 / 255)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def normalize_answer(text: str) -> str:
    """Lower-cased, whitespace removed: "Red " and "red" are the same answer."""
    return "".join(text.lower().split())


def teacher_forced_prediction(
    logits: np.ndarray,
    labels: np.ndarray,
    answer_ids: Sequence[int],
    decode: Callable[[list[int]], str],
    *,
    offset: int = 0,
) -> str:
    """The decoded greedy tokens that predict the answer, from teacher-forced `logits`.

    `logits` `[n, vocab]` are one sequence's logits at positions `offset..offset+n-1`; `labels`
    `[seq]` are its labels (`tokenize_messages`), whose supervised span starts with
    `answer_ids`. Token t is predicted at position t - 1. The span's later tokens (the
    end-of-turn marker) are not scored.
    """
    labels, answer_ids = np.asarray(labels), np.asarray(answer_ids)
    if answer_ids.size == 0:
        raise ValueError("answer_ids is empty: there is nothing to score")
    positions = np.flatnonzero(labels != IGNORE_INDEX)[: answer_ids.size]
    if positions.size < answer_ids.size or not np.array_equal(labels[positions], answer_ids):
        raise ValueError(
            f"the labels' supervised tokens {labels[positions].tolist()} do not start with the "
            f"answer's {answer_ids.tolist()}"
        )
    rows = positions - 1 - offset
    if rows[0] < 0 or rows[-1] >= len(logits):
        raise ValueError(
            f"logits cover positions {offset}..{offset + len(logits) - 1}, but the answer is "
            f"predicted at {positions[0] - 1}..{positions[-1] - 1}"
        )
    return decode(np.argmax(logits[rows], axis=-1).tolist())


def teacher_forced_correct(
    logits: np.ndarray,
    labels: np.ndarray,
    answer_ids: Sequence[int],
    decode: Callable[[list[int]], str],
    *,
    offset: int = 0,
) -> bool:
    """Whether the greedy answer (`teacher_forced_prediction`) matches `decode(answer_ids)`
    after `normalize_answer`."""
    predicted = teacher_forced_prediction(logits, labels, answer_ids, decode, offset=offset)
    return normalize_answer(predicted) == normalize_answer(decode(list(answer_ids)))


@dataclasses.dataclass(frozen=True, eq=False)
class Grid:
    """What V-NIAH scores: every needle at every (frame count, depth) of one haystack video.

    Checked when made, so that a wrong value fails before a video is read or a model run.
    """

    haystack: str | os.PathLike
    frame_counts: Sequence[int]
    needles: Sequence[Needle]
    depths: Sequence[float] = DEPTHS

    def __post_init__(self):
        if not self.frame_counts:
            raise ValueError(f"frame_counts must not be empty, got {self.frame_counts!r}")
        for count in self.frame_counts:
            if int(count) != count or count < 1:
                raise ValueError(f"frame_counts must hold integers >= 1, got {count!r}")
        if not self.depths:
            raise ValueError(f"depths must not be empty, got {self.depths!r}")
        for depth in self.depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"depths must be in [0, 1], got {depth!r}")
        if not self.needles:
            raise ValueError("needles must not be empty")
        longest = max(len(n.frames) for n in self.needles)
        if longest > min(self.frame_counts):
            raise ValueError(f"a needle clip of {longest} frames does not fit in "
                             f"{min(self.frame_counts)} frames")
        # Tuples of plain numbers: a frozen grid holds nothing a caller could change under it.
        object.__setattr__(self, "frame_counts", tuple(int(f) for f in self.frame_counts))
        object.__setattr__(self, "needles", tuple(self.needles))
        object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))

    def first_frame(self, needle: int, num_frames: int, depth: float) -> int:
        """The first of the haystack's `num_frames` frames that needle `needle` replaces at
        `depth`: its frames fill `first_frame` onwards."""
        return round(depth * (num_frames - len(self.needles[needle].frames)))


def engine_logits_fn(engine: InferenceEngine) -> LogitsFn:
    """A `LogitsFn` running the engine's (sequence-parallel) prefill; each row reads its own
    `F` frames of the table."""

    def logits_fn(input_ids, table, start):
        batch, seq = input_ids.shape
        rows = table.shape[0] // batch * table.shape[1]
        return np.asarray(engine.window_logits(list(input_ids), table,
                                               [r * rows for r in range(batch)],
                                               [list(range(start, seq))] * batch))

    return logits_fn


@dataclasses.dataclass(frozen=True, eq=False)
class _Prompt:
    input_ids: np.ndarray  # int32 [seq]
    labels: np.ndarray  # int32 [seq]
    answer_ids: list[int]
    first_answer: int  # position of the answer's first token


@dataclasses.dataclass(frozen=True, eq=False)
class FrameCountInputs:
    """One frame count's model inputs, made once for all its depths: each cell's embedding
    table splices `needles`' rows into `haystack`'s."""

    grid: Grid
    num_frames: int
    haystack: Any  # embeddings [num_frames, tokens, hidden]
    needles: list  # per needle, embeddings [n, tokens, hidden]
    prompts: list[_Prompt]  # per needle
    seq: int  # every prompt's padded length: one compiled forward pass per frame count
    start: int  # the first position whose logits are read: just before the earliest answer


@dataclasses.dataclass(frozen=True, eq=False)
class _Batch:
    rows: list[int]  # the needle of each row; a short last batch repeats its last needle
    count: int  # how many leading rows are real
    starts: list[int]  # each row's `Grid.first_frame`
    input_ids: np.ndarray  # int32 [batch, seq]
    table: Any  # [batch * F, tokens, hidden], batch-major


@dataclasses.dataclass(frozen=True, eq=False)
class NeedleScorer:
    """Scores a grid's needles with one model, cell by cell: teacher-forced exact match
    (`teacher_forced`) and, where wanted, free greedy generation (`generated`).

    `model` gives the media token layout; `encode_fn` and `logits_fn` run the model (an
    engine's `encode` and `engine_logits_fn(engine)`, or what tests give); `engine` generates.
    Needles of one cell run `batch_size` at a time.
    """

    model: LongVILA
    tokenizer: tokenizers.Tokenizer
    family: str
    image_size: int
    encode_fn: EncodeFn
    logits_fn: LogitsFn
    engine: InferenceEngine | None = None  # only `generated` needs one
    batch_size: int = 1

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def encode(self, grid: Grid) -> Iterator[FrameCountInputs]:
        """Each frame count's inputs, in the grid's order: the needles are encoded once for
        all, the haystack once per frame count. Raises `MediaError` when the haystack cannot
        give a frame count (it has fewer frames)."""
        needles = [self.encode_fn(np.stack([frame_to_model_input(f, image_size=self.image_size)
                                            for f in n.frames])) for n in grid.needles]
        for num_frames in grid.frame_counts:
            prompts = [self._prompt(needle, num_frames) for needle in grid.needles]
            haystack = self.encode_fn(load_frames(grid.haystack, num_frames,
                                                  image_size=self.image_size))
            yield FrameCountInputs(
                grid, num_frames, haystack, needles, prompts,
                seq=_round_up(max(len(p.input_ids) for p in prompts), SEQ_MULTIPLE),
                start=min(p.first_answer for p in prompts) - 1)

    def teacher_forced(self, inputs: FrameCountInputs, depth: float) -> list[dict]:
        """One record per needle of the cell (`inputs.num_frames`, `depth`), in needle order:
        `frames`, `depth`, `needle`, `needle_index` (its first frame), `question`, `answer`,
        `prediction` (`teacher_forced_prediction`) and `correct`."""
        samples = []
        for batch in self._batches(inputs, depth):
            logits = self.logits_fn(batch.input_ids, batch.table, inputs.start)
            for r, k in enumerate(batch.rows[: batch.count]):
                needle, prompt = inputs.grid.needles[k], inputs.prompts[k]
                args = (logits[r], prompt.labels, prompt.answer_ids, self.tokenizer.decode)
                samples.append({
                    "frames": inputs.num_frames, "depth": depth, "needle": k,
                    "needle_index": batch.starts[r], "question": needle.question,
                    "answer": needle.answer,
                    "prediction": teacher_forced_prediction(*args, offset=inputs.start),
                    "correct": teacher_forced_correct(*args, offset=inputs.start)})
        return samples

    def generated(self, inputs: FrameCountInputs, depth: float) -> list[dict]:
        """One record per needle of the cell, in needle order: `generation` (the greedy answer
        to the prompt ending at the assistant header) and `generation_correct` (it equals the
        answer after `normalize_answer`)."""
        if self.engine is None:
            raise ValueError("free generation needs an engine: NeedleScorer(..., engine=...)")
        stop_ids = end_of_turn_ids(self.tokenizer, self.family)
        records = []
        for batch in self._batches(inputs, depth):
            prompts = [inputs.prompts[k] for k in batch.rows]
            frame_rows = inputs.num_frames * batch.table.shape[1]
            answers = self.engine.generate_ids(
                [p.input_ids[: p.first_answer] for p in prompts], batch.table,
                [r * frame_rows for r in range(len(prompts))],
                sampling=Sampling(max(len(p.answer_ids) for p in prompts) + GENERATION_SLACK,
                                  stop_ids=stop_ids))
            for r, k in enumerate(batch.rows[: batch.count]):
                text = self.tokenizer.decode(answers[r])
                right = normalize_answer(text) == normalize_answer(inputs.grid.needles[k].answer)
                records.append({"generation": text, "generation_correct": right})
        return records

    def _prompt(self, needle: Needle, num_frames: int) -> _Prompt:
        """The needle's question and answer about a `num_frames`-frame video, tokenised."""
        # Llama's template strips replies, so the answer is stripped for every family alike.
        answer = needle.answer.strip()
        messages = place_media([{"role": "user", "content": needle.question},
                                {"role": "assistant", "content": answer}], "video")
        input_ids, labels = tokenize_messages(
            self.tokenizer, self.family, messages, media_token_id=self.model.media_token_id,
            tokens_per_frame=self.model.media_tokens_per_frame, frames_per_media=[num_frames])
        answer_ids = self.tokenizer.encode(answer, add_special_tokens=False).ids
        return _Prompt(input_ids, labels, answer_ids, int(np.argmax(labels != IGNORE_INDEX)))

    def _batches(self, inputs: FrameCountInputs, depth: float) -> Iterator[_Batch]:
        """The cell's needles `batch_size` at a time, each row's needle spliced in at `depth`."""
        count = len(inputs.prompts)
        size = min(self.batch_size, count)
        # Right padding is never attended to by earlier positions, so any id but media's will do.
        pad_id = int(self.model.media_token_id == 0)
        for first in range(0, count, size):
            # A short last batch repeats its last needle, keeping one compiled shape.
            rows = [min(k, count - 1) for k in range(first, first + size)]
            starts = [inputs.grid.first_frame(k, inputs.num_frames, depth) for k in rows]
            input_ids, table = _batch([inputs.prompts[k] for k in rows], inputs.seq, pad_id,
                                      inputs.haystack, starts, [inputs.needles[k] for k in rows])
            yield _Batch(rows, min(size, count - first), starts, input_ids, table)


def _batch(prompts: list[_Prompt], seq: int, pad_id: int, haystack, starts: list[int],
           needles: list) -> tuple[np.ndarray, Any]:
    """`input_ids` int32 `[batch, seq]` (right-padded with `pad_id`) and the embedding table
    `[batch * F, tokens, hidden]`: `haystack` `[F, tokens, hidden]` per row, with rows
    `starts[r]` onwards replaced by row r's needle embeddings `[n, tokens, hidden]`."""
    input_ids = np.full((len(prompts), seq), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt.input_ids)] = prompt.input_ids
    haystack = jnp.asarray(haystack)
    table = [haystack.at[at:at + len(n)].set(n) for at, n in zip(starts, needles, strict=True)]
    return input_ids, jnp.concatenate(table)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cell_accuracy(grid: Grid, samples: Sequence[dict], key: str) -> list[list[float]]:
    """The fraction of each cell's needles whose record holds a true `key`, `[frame_counts]
    [depths]`; `samples` are one record per frame count, depth and needle, in that order."""
    shape = (len(grid.frame_counts), len(grid.depths), len(grid.needles))
    hits = np.reshape([bool(s[key]) for s in samples], shape).sum(axis=-1)
    return (hits / len(grid.needles)).tolist()


def plot_heatmap(result: dict, path: Path) -> None:
    """Accuracy heatmap PNG: frame counts across, depths down, each cell annotated."""
    accuracy = np.asarray(result["accuracy"], float).T  # [depths, frame_counts]
    frame_counts, depths = result["frame_counts"], result["depths"]
    # The object API (no pyplot) renders with Agg and touches no global figure state.
    fig = Figure(figsize=(max(4.0, 0.7 * len(frame_counts) + 2), max(3.0, 0.45 * len(depths) + 2)))
    ax = fig.subplots()
    image = ax.imshow(accuracy, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for row, col in np.ndindex(accuracy.shape):
        ax.text(col, row, f"{accuracy[row, col]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(frame_counts)), [str(f) for f in frame_counts])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}%" for d in depths])
    ax.set_xlabel("frames")
    ax.set_ylabel("needle depth")
    ax.set_title(f"V-NIAH accuracy ({result['num_needles']} needles per cell)")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def write_results(result: dict, out_dir: str | os.PathLike) -> None:
    """`out_dir/needle.json` (the result) and `out_dir/needle_heatmap.png` (`plot_heatmap`),
    each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out_dir, "needle*")  # what a kill during an earlier write left
    with atomic_file(out_dir / "needle.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    plot_heatmap(result, out_dir / "needle_heatmap.png")


def evaluate(
    model: LongVILA,
    tokenizer_path: str | os.PathLike,
    *,
    family: str,
    haystack: str | os.PathLike,
    frame_counts: Sequence[int],
    needles: Sequence[Needle],
    image_size: int,
    out_dir: str | os.PathLike,
    depths: Sequence[float] = DEPTHS,
    batch_size: int = 1,
    progress: bool = True,
    engine: InferenceEngine | None = None,
    encode_fn: EncodeFn | None = None,
    logits_fn: LogitsFn | None = None,
    generate: bool = False,
) -> dict:
    """Score every needle at every (frame count, depth); write the JSON and the heatmap.

    What the CLI and the demo call: a `Grid`, scored by a `NeedleScorer` over `engine`
    (default: `model` on every device) unless `encode_fn`/`logits_fn` replace it, written by
    `write_results` to `out_dir`. Returns the JSON's dict: `haystack`, `frame_counts`,
    `depths`, `num_needles`, `accuracy` `[frame_counts][depths]` and `per_sample` (one record
    per frame count, depth and needle, in that order); with `generate`, also
    `generation_accuracy` and each sample's `generation` and `generation_correct`.
    Raises `MediaError` when the haystack cannot give a frame count (it has fewer frames).
    """
    grid = Grid(haystack, frame_counts, needles, depths)
    tokenizer = load_tokenizer(tokenizer_path)
    if engine is None and (encode_fn is None or logits_fn is None or generate):
        engine = InferenceEngine(model)
    scorer = NeedleScorer(model, tokenizer, family, image_size,
                          encode_fn or engine.encode, logits_fn or engine_logits_fn(engine),
                          engine, batch_size)
    per_sample = []
    total = len(grid.frame_counts) * len(grid.depths) * len(grid.needles)
    with tqdm(total=total, desc="v-niah", unit="sample", disable=not progress) as bar:
        for inputs in scorer.encode(grid):
            for depth in grid.depths:
                bar.set_postfix(frames=inputs.num_frames, depth=depth)
                samples = scorer.teacher_forced(inputs, depth)
                if generate:
                    samples = [{**s, **g} for s, g in
                               zip(samples, scorer.generated(inputs, depth), strict=True)]
                per_sample += samples
                bar.update(len(samples))
    result = {
        "haystack": os.fspath(grid.haystack),
        "frame_counts": list(grid.frame_counts),
        "depths": list(grid.depths),
        "num_needles": len(grid.needles),
        "accuracy": cell_accuracy(grid, per_sample, "correct"),
        "per_sample": per_sample,
    }
    if generate:
        result["generation_accuracy"] = cell_accuracy(grid, per_sample, "generation_correct")
    write_results(result, out_dir)
    return result
