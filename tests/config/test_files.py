"""Config files and override keys: a bad file, argument or key is named, with the nearest
good one."""

from __future__ import annotations

from pathlib import Path

import pytest

from longvila_jax.config import ConfigError, check_keys, load_file

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SFT = CONFIGS / "stages" / "3_sft.py"


@pytest.mark.parametrize("key, near", [
    ("train.learning_rat", "optim.learning_rate"),  # a typo in the wrong section
    ("trian.batch_size", "train.batch_size"),
    ("model.llm.hidden_sise", "model.llm.hidden_size"),  # not model.vision's
    ("data.tokeniser", "data.tokenizer"),
])
def test_unknown_key_suggests_the_nearest(key, near):
    with pytest.raises(ConfigError) as err:
        check_keys(load_file(f"{SFT}:tiny"), ["optim.learning_rate", key])
    assert str(err.value) == f"{key}: no such key in the config; did you mean {near}?"


def test_pipeline_key_suggests_within_its_stage():
    with pytest.raises(ConfigError, match=r"did you mean sft\.optim\.learning_rate\?$"):
        check_keys(load_file(f"{CONFIGS / 'stages' / 'pipeline.py'}:tiny"),
                   ["sft.train.learning_rat"])


def test_known_keys_pass_and_a_far_one_suggests_nothing():
    config = load_file(f"{SFT}:tiny")
    check_keys(config, ["seed", "model.llm.rope_scaling.type", "data.sources[0].jsonl"])
    for key in ("train.lr", "data.sources[3].jsonl", "train.batch_size.x"):
        with pytest.raises(ConfigError) as err:
            check_keys(config, [key])
        assert str(err.value) == f"{key}: no such key in the config"


@pytest.mark.parametrize("spec, words", [
    ("configs/nope.py", ["config file 'configs/nope.py' does not exist"]),
    ("configs/stages/3_stf.py:tiny", ["'configs/stages/3_stf.py'",
                                      "did you mean 'configs/stages/3_sft.py'?"]),
    ("configs/stages/3_sft.py:qwen9_99b", ["configs/stages/3_sft.py:qwen9_99b: ",
                                           "unknown model 'qwen9_99b'; known: ["]),
    ("configs/tiny.py:1m", ["configs/tiny.py:1m: get_config() called with ('1m',)"]),
    ("longvila_jax/config/presets.py", ["'longvila_jax/config/presets.py' defines no "
                                        "get_config()"]),
])
def test_bad_file_or_argument_is_named(spec, words, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    with pytest.raises(ConfigError) as err:
        load_file(spec)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_a_config_that_is_not_returned_is_named(tmp_path):
    path = tmp_path / "forgot.py"
    path.write_text("def get_config():\n    pass\n")
    with pytest.raises(ConfigError, match=r"forgot\.py: get_config\(\) returned NoneType"):
        load_file(str(path))


def test_argument_reaches_get_config():
    assert load_file(f"{CONFIGS / 'qwen2_7b.py'}:1m").model.llm.rope_theta == 1_062_356_830
