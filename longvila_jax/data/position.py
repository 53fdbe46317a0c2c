"""Where a run stands in its data, in a form that does not depend on how many hosts read it.

Each source is one endless global stream: position `g` is record `perm_e[g mod N]` of epoch
`e = g // N` (a fresh seeded permutation of the source's N records per epoch). A run reads it
in `count` shards, one per group of data-parallel rows its processes hold; shard `index`
takes every `count`-th position of what is still unread (`Share`). Shards read at different
rates (packing puts a varying number of samples into a row), so what a run has consumed is
not a prefix of the stream; it is kept as a `Coverage` (a prefix plus the few positions read
beyond it).

A saved data position holds each shard's `Share` and how far it got. Resuming with the same
shards restores every iterator exactly (grain's per-process state); resuming with other
shards merges the saved shards into the positions already consumed (`merge`) and starts new
shards over what is left, so every sample of an epoch is read exactly once whatever the
process count before and after.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Coverage:
    """Positions consumed per source: every one below `base[s]`, and the sorted `extra[s]`
    above it."""

    base: tuple[int, ...]
    extra: tuple[tuple[int, ...], ...]

    @classmethod
    def empty(cls, sources: int) -> Coverage:
        return cls((0,) * sources, ((),) * sources)

    def to_json(self) -> dict:
        return {"base": list(self.base), "extra": [list(e) for e in self.extra]}

    @classmethod
    def from_json(cls, state: dict) -> Coverage:
        return cls(tuple(state["base"]), tuple(tuple(e) for e in state["extra"]))


@dataclasses.dataclass(frozen=True)
class Share:
    """Shard `index` of `count`: its k-th read of a source is the (index + k * count)-th
    position of that source not covered by `start`."""

    index: int
    count: int
    start: Coverage

    def positions(self, source: int, local) -> np.ndarray:
        """Global stream positions of this shard's reads `local` (int array) of `source`."""
        j = self.index + np.asarray(local, np.int64) * self.count
        base = self.start.base[source]
        skip = np.asarray(self.start.extra[source], np.int64)
        # The j-th free position x satisfies x = base + j + #(skip <= x); iterating from
        # x = base + j only moves up and stops at the least such x, which is free.
        x = base + j
        while True:
            moved = base + j + np.searchsorted(skip, x, side="right")
            if np.array_equal(moved, x):
                return x
            x = moved

    def to_json(self) -> dict:
        return {"index": self.index, "count": self.count, "start": self.start.to_json()}

    @classmethod
    def from_json(cls, state: dict) -> Share:
        return cls(state["index"], state["count"], Coverage.from_json(state["start"]))


@dataclasses.dataclass
class Progress:
    """Which of its own reads a shard has consumed, per source: all below `read[s]`, and the
    few in `ahead[s]` beyond (samples in rows emitted before earlier reads' rows)."""

    read: list[int]
    ahead: list[set[int]]

    @classmethod
    def empty(cls, sources: int) -> Progress:
        return cls([0] * sources, [set() for _ in range(sources)])

    def add(self, source: int, local: int) -> None:
        ahead = self.ahead[source]
        ahead.add(local)
        while self.read[source] in ahead:
            ahead.remove(self.read[source])
            self.read[source] += 1

    def to_json(self) -> dict:
        return {"read": list(self.read), "ahead": [sorted(a) for a in self.ahead]}

    @classmethod
    def from_json(cls, state: dict) -> Progress:
        return cls(list(state["read"]), [set(a) for a in state["ahead"]])


def merge(shards: list[tuple[Share, Progress]]) -> Coverage:
    """Everything the given shards (one entry per distinct shard, all with the same start)
    have consumed, as one `Coverage`."""
    start = shards[0][0].start
    if any(share.start != start for share, _ in shards):
        raise ValueError("data position: shards started from different positions")
    base, extra = [], []
    for s in range(len(start.base)):
        pieces = [np.asarray(start.extra[s], np.int64)]
        for share, progress in shards:
            local = np.concatenate([np.arange(progress.read[s], dtype=np.int64),
                                    np.asarray(sorted(progress.ahead[s]), np.int64)])
            pieces.append(share.positions(s, local))
        covered = np.unique(np.concatenate(pieces))
        covered = covered[covered >= start.base[s]]
        # The new prefix runs up to the first position nobody consumed.
        run = covered == start.base[s] + np.arange(len(covered))
        gap = len(covered) if run.all() else int(np.argmin(run))
        base.append(start.base[s] + gap)
        extra.append(tuple(int(g) for g in covered[gap:]))
    return Coverage(tuple(base), tuple(extra))
