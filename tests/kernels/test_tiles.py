"""Tile schedules against a brute-force classification of every (q tile, kv tile) pair.

A kernel that trusts the schedule skips what it calls hidden and drops the mask where it
calls full, so: every visible tile must lie inside [lo, hi), and every tile in the full
range must really be fully visible and in bounds.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from longvila_jax.kernels.tiles import schedule


def truth(q_pos, kv_pos, q_seg, kv_seg, causal, bm, bn):
    sq, skv = q_pos.shape[1], kv_pos.shape[1]
    nq, nk = -(-sq // bm), -(-skv // bn)
    visible, full = np.zeros((nq, nk), bool), np.zeros((nq, nk), bool)
    for i in range(nq):
        for j in range(nk):
            rows, cols = slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn)
            seen = q_seg[0, rows, None] == kv_seg[0, None, cols]
            if causal:
                seen &= kv_pos[0, None, cols] <= q_pos[0, rows, None]
            visible[i, j] = seen.any()
            full[i, j] = seen.all() and (i + 1) * bm <= sq and (j + 1) * bn <= skv
    return visible, full


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("over_q", [False, True])
def test_schedule_covers_visible_tiles_and_full_ranges_are_full(rng, causal, over_q):
    for _ in range(8):
        sq, skv = (int(n) for n in rng.integers(1, 200, 2))
        bm, bn = int(rng.choice([16, 32])), int(rng.choice([8, 16]))
        q_pos = (rng.integers(0, 100) + np.arange(sq))[None].astype(np.int32)
        kv_pos = np.arange(skv, dtype=np.int32)[None]
        docs = int(rng.integers(1, 5))
        q_seg = np.sort(rng.integers(0, docs, sq))[None].astype(np.int32)
        kv_seg = np.sort(rng.integers(0, docs, skv))[None].astype(np.int32)
        _, _, ranges = schedule(*map(jnp.asarray, (q_pos, kv_pos, q_seg, kv_seg)), causal,
                                bm, bn, over_q=over_q)
        visible, full = truth(q_pos, kv_pos, q_seg, kv_seg, causal, bm, bn)
        if over_q:
            visible, full = visible.T, full.T
        for row, (lo, full_lo, full_hi, hi) in enumerate(np.asarray(ranges)[:, 0].T):
            assert lo <= full_lo <= full_hi <= hi
            assert all(lo <= j < hi for j in np.flatnonzero(visible[row]))
            assert full[row, full_lo:full_hi].all()
            # Causal, sorted segments: the full tiles form one run, and the schedule finds it.
            if full[row].any() and causal and docs == 1:
                assert full_hi - full_lo == full[row].sum()
