"""ptxas must not serialise the matrix instructions of our configured Triton kernels.

Warning C7515/C7512 means every wgmma of the kernel waits for the one before: a silent,
large slowdown (bench/NOTES.md, v6). Compiling needs only the triton wheel; this runs with
the other GPU tests, where triton is installed.
"""

from __future__ import annotations

import os
import sys

import jax
import pytest

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


@pytest.mark.parametrize("name", ["FWD", "BWD_KV", "BWD_Q"])
def test_configured_kernels_keep_wgmma_pipelined(name):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    from kernel_resources import compile_report

    from longvila_jax.kernels import triton as kernels

    report = compile_report(name, getattr(kernels, name))
    assert not report["warnings"], report
