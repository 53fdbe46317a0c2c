"""Numeric comparisons the tests share."""

from __future__ import annotations

import numpy as np


def rel_err(actual, expected) -> float:
    """Relative error ||actual - expected|| / ||expected|| in float64, shapes equal."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))
