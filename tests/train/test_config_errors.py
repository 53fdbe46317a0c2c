"""A run's missing files (tokenizer, data, media root, `train.init_from`) fail in `setup`
naming the key, before the mesh or the model is built."""

from __future__ import annotations

import re

import pytest

from longvila_jax.config import ConfigError
from longvila_jax.configs.stages import sft
from longvila_jax.train import loop


class Built(Exception):
    """Raised where `setup` starts allocating: every check before it passed."""


@pytest.fixture(autouse=True)
def no_allocation(monkeypatch):
    def refuse(*args, **kwargs):
        raise Built

    for name in ("mesh_from_config", "build_model", "load_model"):
        monkeypatch.setattr(loop, name, refuse)


@pytest.fixture
def config(tmp_path):
    """The tiny sft stage on files that exist: a tokenizer, two sources, a media folder."""
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "media").mkdir()
    sources = []
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("")
        sources.append(dict(name=name, jsonl=str(tmp_path / f"{name}.jsonl"),
                            media_root=str(tmp_path / "media"), weight=1.0))
    config = sft.get_config("tiny")
    config.data.update(tokenizer=str(tmp_path / "tokenizer.json"), sources=sources)
    return config


def test_existing_files_reach_the_model_build(config):
    with pytest.raises(Built):
        loop.setup(config)


@pytest.mark.parametrize("key, change", [
    ("data.tokenizer", lambda c: c.data.update(tokenizer="nowhere/tokenizer.json")),
    ("data.tokenizer", lambda c: c.data.update(tokenizer="")),
    ("data.sources", lambda c: c.data.update(sources=[])),
    ("data.sources[1].jsonl", lambda c: c.data.sources[1].update(jsonl="nowhere.jsonl")),
    ("data.sources[0].media_root", lambda c: c.data.sources[0].update(media_root="nowhere")),
    ("train.init_from", lambda c: c.train.update(init_from="nowhere/final")),
])
def test_a_missing_file_is_named_before_the_model_is_built(config, key, change):
    change(config)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: "):
        loop.setup(config)


def test_text_sources_need_no_media_root(config):
    config.data.kind = "text"
    config.data.sources[0]["media_root"] = "nowhere"
    with pytest.raises(Built):
        loop.setup(config)


def test_a_config_without_data_builds_for_synthetic_batches(config):
    config.data.update(tokenizer="", sources=[])
    with pytest.raises(Built):
        loop.setup(config)


def test_a_training_run_without_data_fails_before_the_model_is_built(config, tmp_path):
    config.data.update(tokenizer="", sources=[])
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: "):
        loop.train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
