"""The training tests' shared corpus: the demo corpus at a tenth of its size, written once."""

from __future__ import annotations

import pytest

from longvila_jax.data.demo_corpus import write_demo_data


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("corpus"), scale=0.1)
