"""Pack several tokenised samples into one fixed-length training sequence.

Short samples (most SFT conversations) would waste most of a long sequence as padding; packing
fills it, and the attention masks by `segment_ids` + `positions` keep the samples apart.

The packer is grain's own `FirstFitPackIterDataset`; this module adds what it leaves out:
- it raises on a sample longer than a budget, so `pack` first drops such samples and counts
  them in a `PackStats` (never truncates: a cut conversation or video would teach wrong text);
- its per-feature outputs (`input_ids_segment_ids`, `frames_positions`, ...) are renamed to
  the names the model takes.

Grain's conventions, relied on here: segment ids count 1, 2, ... per packed row and are the same
for every feature of one sample (so a sample's frames carry its tokens' segment id); padding has
segment id 0 and position 0; positions restart at 0 for each sample. Frames are a feature with
their own budget (`frames` rows of `[H, W, 3]`), so a sample is placed only where both its tokens
and its frames fit. Grain keeps `num_bins` rows open, puts each sample in the first that has
room, and when one fits none emits all of them (in a seeded shuffled order) and starts afresh:
more bins, less padding, more memory. Shapes past the first axis and dtypes come from the first
sample, so all samples' frames must share one `[H, W, 3]`.

Grain's `pack_alignment_struct` aligns where each sample *starts* inside a row, not the row's
length; the row is already exactly `tokens` long, so choosing `tokens` a multiple of the
sequence-parallel split (2 x SP degree for zigzag) is enough. `pad_to_multiple` serves rows of
another origin.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from longvila_jax.data.media import IGNORE_INDEX


@dataclasses.dataclass
class PackStats:
    """Samples `pack` kept and dropped (over the token budget first, else over the frame one).

    Counted in the process that runs the filter: with grain worker processes the counts stay in
    the workers, and they are not part of a grain checkpoint. Grain's filter also warns when
    more than 90% of a window of 1000 samples is dropped.
    """

    kept: int = 0
    too_many_tokens: int = 0
    too_many_frames: int = 0


def _fits(sample: dict, *, tokens: int, frames: int, stats: PackStats) -> bool:
    """Whether `sample` fits the budgets; counts it either way."""
    length = len(sample["input_ids"])
    if len(sample["labels"]) != length:
        raise ValueError(f"pack: sample has {length} input_ids but {len(sample['labels'])} labels")
    if frames and "frames" not in sample:
        raise ValueError(
            "pack: frames > 0 needs a 'frames' array in every sample "
            "(give text-only samples an empty [0, H, W, 3] one)"
        )
    if length > tokens:
        stats.too_many_tokens += 1
        return False
    if len(sample.get("frames", ())) > frames:
        stats.too_many_frames += 1
        return False
    stats.kept += 1
    return True


class _Admit(grain.IterDataset):
    """Drops the samples `fits` rejects; their `sample_ids` go on with the next kept sample,
    so a reader of the packed rows learns that they were consumed."""

    def __init__(self, parent: grain.IterDataset, fits):
        super().__init__(parent)
        self._fits = fits

    def __iter__(self):
        return _AdmitIterator(self._parent.__iter__(), self._fits)


class _AdmitIterator(grain.DatasetIterator):
    def __init__(self, parent, fits):
        super().__init__(parent)
        self._fits = fits
        self._carried: list[list[int]] = []

    def __next__(self):
        while True:
            sample = next(self._parent)
            if self._fits(sample):
                if self._carried:
                    ids = sample["sample_ids"]
                    carried = np.asarray(self._carried, ids.dtype)
                    sample = {**sample, "sample_ids": np.concatenate([carried, ids])}
                    self._carried = []
                return sample
            if "sample_ids" in sample:
                self._carried += sample["sample_ids"].tolist()

    def get_state(self):
        return {"parent": self._parent.get_state(), "carried": list(self._carried)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._carried = list(state["carried"])


def _rename(packed: dict) -> dict:
    """Grain's per-feature packing outputs under the model's names."""
    out = {
        "input_ids": packed["input_ids"],
        "labels": packed["labels"],
        "segment_ids": packed["input_ids_segment_ids"],
        "positions": packed["input_ids_positions"],
    }
    if "frames" in packed:
        out["frames"] = packed["frames"]
        out["frame_segment_ids"] = packed["frames_segment_ids"]
    if "sample_ids" in packed:  # grain's list of the row's samples' values
        out["sample_ids"] = np.concatenate(packed["sample_ids"])
    return out


def pack(
    dataset: grain.IterDataset,
    *,
    tokens: int,
    frames: int = 0,
    num_bins: int = 4,
    seed: int = 0,
    pad_id: int = 0,
    stats: PackStats | None = None,
    sample_ids: bool = False,
) -> grain.IterDataset:
    """Rows of `tokens` tokens (and `frames` frames) first-fit packed from `dataset`'s samples.

    Samples hold `input_ids` and `labels` (int `[n]`), and `frames` (`[F, H, W, 3]`, one shape
    for all samples) when `frames > 0`; other features are dropped. A row holds `input_ids`
    (pads `pad_id`), `labels` (pads -100), `segment_ids` and `positions` (int32 `[tokens]`), and
    with frames `frames` (pads 0) and `frame_segment_ids` (`[frames]`). With `frames == 0` a
    sample with frames is over the frame budget. The `num_bins` open rows are all in memory;
    with frames that is `num_bins * frames` frames, so keep it small for long videos.
    With `sample_ids`, every sample holds a `sample_ids` array `[n, k]` and a row gets the
    concatenation of its samples' (with those of samples dropped before them).
    """
    stats = PackStats() if stats is None else stats
    lengths = {"input_ids": tokens, "labels": tokens}
    padding = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    if frames:
        lengths["frames"], padding["frames"] = frames, 0
    fits = functools.partial(_fits, tokens=tokens, frames=frames, stats=stats)
    packed = grain.experimental.FirstFitPackIterDataset(
        _Admit(dataset, fits),
        length_struct=lengths,
        num_packing_bins=num_bins,
        seed=seed,
        padding_struct=padding,
        meta_features=("sample_ids",) if sample_ids else (),
    )
    return packed.map(_rename)


def pad_to_multiple(batch: dict, multiple: int, pad_id: int = 0) -> dict:
    """`batch` with its token features extended along the last axis to a multiple of `multiple`.

    Pads are `pad_id`, label -100, segment 0 and position 0, as grain's own padding: pads share
    segment 0 and position 0, so each sees itself (no empty attention row) and no sample sees
    them. Other features (frames) are returned unchanged. Works on a row `[seq]` or `[b, seq]`.
    """
    extra = -batch["input_ids"].shape[-1] % multiple
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, "segment_ids": 0, "positions": 0}
    out = dict(batch)
    for name in fills.keys() & batch.keys():
        width = [(0, 0)] * (batch[name].ndim - 1) + [(0, extra)]
        out[name] = np.pad(batch[name], width, constant_values=fills[name])
    return out
