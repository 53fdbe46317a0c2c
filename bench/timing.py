"""The one timer the benchmark scripts share."""

from __future__ import annotations

import time

import jax
import numpy as np


def timed(fn, *args, reps: int = 3) -> float:
    """Median over 3 rounds of (time for `reps` back-to-back calls) / reps, in seconds.

    One warm-up call first keeps compilation out; back-to-back calls keep the device busy
    so dispatch overhead is not timed.
    """
    jax.block_until_ready(fn(*args))
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            result = fn(*args)
        jax.block_until_ready(result)
        rounds.append((time.perf_counter() - start) / reps)
    return float(np.median(rounds))
