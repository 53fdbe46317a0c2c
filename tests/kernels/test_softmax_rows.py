"""`backward_rows`, the per-row terms both flash backwards start from, against float64 numpy."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from longvila_jax.kernels.softmax_rows import backward_rows


@pytest.mark.parametrize("with_d_lse", [False, True])
def test_backward_rows_match_float64(rng, with_d_lse):
    b, sq, h, d = int(rng.integers(1, 3)), int(rng.integers(3, 40)), int(rng.integers(1, 5)), 16
    out, d_out = (rng.standard_normal((b, sq, h, d)).astype(np.float32) for _ in range(2))
    lse = rng.normal(3.0, 2.0, (b, h, sq)).astype(np.float32)
    lse[rng.random(lse.shape) < 0.2] = -np.inf  # rows that saw no key
    d_lse = rng.standard_normal((b, h, sq)).astype(np.float32) if with_d_lse else None
    delta, lse2 = backward_rows(*(None if a is None else jnp.asarray(a)
                                  for a in (out, lse, d_out, d_lse)))
    want = np.einsum("bqhd,bqhd->bhq", d_out.astype(np.float64), out.astype(np.float64))
    if with_d_lse:
        want = want - d_lse
    assert delta.shape == lse2.shape == (b, h, sq)
    np.testing.assert_allclose(np.asarray(delta), want, rtol=1e-5, atol=1e-5)
    finite = np.isfinite(lse)
    np.testing.assert_allclose(np.asarray(lse2)[finite], lse[finite] * math.log2(math.e),
                               rtol=1e-6)
    assert np.all(np.asarray(lse2)[~finite] == np.inf)
