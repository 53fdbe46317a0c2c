"""Which waiting requests decode together: alike sampling, the answer and prompt budgets, the
oldest first."""

from __future__ import annotations

from longvila_jax.infer.generate import Prompt
from longvila_jax.serve.batcher import Batcher, Job


def _job(tokens: int, n: int = 1, temperature: float = 0.0, seed=None) -> Job:
    job = Job(Prompt("q"), n, temperature, 1.0, seed, 8, [], False, loop=None)
    job.tokens = tokens
    return job


def _batches(batcher: Batcher, jobs: list[Job]) -> list[list[int]]:
    batcher._waiting = list(jobs)
    out = []
    while batcher._waiting:
        out.append([jobs.index(j) for j in batcher._take()])
    return out


def test_alike_requests_batch_within_the_budgets():
    batcher = Batcher(None, max_rows=8, max_tokens=4000)
    jobs = [_job(1000), _job(900), _job(50, temperature=1.0), _job(1000), _job(1000),
            _job(10, n=8), _job(10, temperature=1.0, seed=1), _job(10, temperature=1.0)]
    # 4 prompts x 1,000 positions fill the budget; greedy ignores the seed; sampled
    # requests with a seed of their own batch only with that seed.
    assert _batches(batcher, jobs) == [[0, 1, 3, 4], [2, 7], [5], [6]]


def test_padding_counts_against_the_prompt_budget():
    batcher = Batcher(None, max_rows=32, max_tokens=3000)
    # A third prompt pads the batch to four: 4 x 1,000 > 3,000.
    assert _batches(batcher, [_job(1000) for _ in range(3)]) == [[0, 1], [2]]
    # One prompt over the budget still runs, alone.
    assert _batches(batcher, [_job(5000), _job(10)]) == [[0], [1]]
