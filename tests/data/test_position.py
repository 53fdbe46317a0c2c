"""Data positions that do not depend on the process count: a shard's reading order against
a brute-force walk of the stream, and merged positions against explicit sets."""

from __future__ import annotations

import numpy as np

from longvila_jax.data.position import Coverage, Progress, Share, merge


def _random_coverage(rng, sources: int) -> Coverage:
    bases = [int(b) for b in rng.integers(0, 50, sources)]
    extra = [tuple(sorted({b + 1 + int(x) for x in rng.integers(0, 40, rng.integers(0, 12))}))
             for b in bases]
    return Coverage(tuple(bases), tuple(extra))


def _free(coverage: Coverage, source: int, how_many: int) -> list[int]:
    """The first free positions of `source`, by walking the stream."""
    taken = set(coverage.extra[source])
    return [g for g in range(coverage.base[source], coverage.base[source] + how_many + 100)
            if g not in taken][:how_many]


def test_a_share_reads_its_turns_of_the_free_positions(rng):
    for _ in range(20):
        coverage = _random_coverage(rng, 2)
        count = int(rng.integers(1, 5))
        for source in range(2):
            free = _free(coverage, source, 40 * count)
            for index in range(count):
                got = Share(index, count, coverage).positions(source, np.arange(40))
                assert got.tolist() == free[index::count][:40], (coverage, index, count)


def test_shares_together_read_each_free_position_once(rng):
    coverage = _random_coverage(rng, 1)
    count = int(rng.integers(2, 5))
    reads = np.concatenate([Share(i, count, coverage).positions(0, np.arange(30))
                            for i in range(count)])
    assert len(set(reads.tolist())) == len(reads)
    assert not set(reads.tolist()) & set(coverage.extra[0])
    assert reads.min() >= coverage.base[0]


def test_merge_is_the_union_of_what_each_shard_consumed(rng):
    for _ in range(20):
        start = _random_coverage(rng, 2)
        count = int(rng.integers(1, 4))
        shards, consumed = [], [set(range(b)) | set(e) for b, e in zip(start.base, start.extra,
                                                                        strict=True)]
        for index in range(count):
            share, progress = Share(index, count, start), Progress.empty(2)
            for source in range(2):
                # Reads consumed in a shuffled order, as rows of one packing batch are.
                reads = rng.permutation(int(rng.integers(0, 30)))
                reads = reads[: len(reads) - int(rng.integers(0, 3))]
                for read in reads:
                    progress.add(source, int(read))
                consumed[source] |= set(share.positions(source, reads).tolist())
            shards.append((share, Progress.from_json(progress.to_json())))
        merged = merge(shards)
        for source in range(2):
            got = set(range(merged.base[source])) | set(merged.extra[source])
            assert got == consumed[source]
            assert merged.base[source] not in consumed[source]


def test_progress_keeps_only_reads_past_the_first_gap(rng):
    progress = Progress.empty(1)
    order = rng.permutation(50)
    for read in order:
        progress.add(0, int(read))
    assert progress.read == [50] and progress.ahead == [set()]
