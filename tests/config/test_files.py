"""Configs (packaged ones by name, files by path) and override keys: a bad name, file,
argument or key is named, with the nearest good one."""

from __future__ import annotations

import pytest

from longvila_jax.config import ConfigError, check_keys
from longvila_jax.configs import MODELS, load_file, packaged_names
from longvila_jax.configs.stages import R1_STAGES, STAGES, sft

SFT = "stages/sft"


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
        check_keys(load_file("stages/pipeline:tiny"), ["sft.train.learning_rat"])


def test_known_keys_pass_and_a_far_one_suggests_nothing():
    config = load_file(f"{SFT}:tiny")
    check_keys(config, ["seed", "model.llm.rope_scaling.type", "data.sources[0].jsonl"])
    for key in ("train.lr", "data.sources[3].jsonl", "train.batch_size.x"):
        with pytest.raises(ConfigError) as err:
            check_keys(config, [key])
        assert str(err.value) == f"{key}: no such key in the config"


@pytest.mark.parametrize("spec, words", [
    ("stages/stf:tiny", ["config 'stages/stf' is not a packaged one; did you mean 'stages/sft'?",
                         "packaged: demo, llama3_8b, qwen2_1_5b, qwen2_7b, tiny, stages/align, ",
                         "a file of your own: FILE.py[:ARG]"]),
    ("sft:tiny", ["config 'sft' is not a packaged one; did you mean 'stages/sft'?"]),
    ("stages/sft:qwen9_99b", ["stages/sft:qwen9_99b: unknown model 'qwen9_99b'; known: [",
                              "'tiny'"]),
    ("tiny:1m", ["tiny:1m: get_config() called with ('1m',)"]),
    ("qwen2_7b:2m", ["qwen2_7b:2m: qwen2_7b config variant '2m': expected 'base' or '1m'"]),
    ("nope.py", ["config file 'nope.py' does not exist"]),
    ("my_confg.py", ["config file 'my_confg.py' does not exist; did you mean 'my_config.py'?"]),
    # The spelling before the configs were packaged.
    ("configs/stages/3_sft.py:tiny", ["config file 'configs/stages/3_sft.py' does not exist; "
                                      "did you mean the packaged 'stages/sft'?"]),
    ("not_a_config.py", ["config file 'not_a_config.py' defines no get_config()"]),
])
def test_bad_name_file_or_argument_is_named(spec, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_config.py").write_text("def get_config():\n    pass\n")
    (tmp_path / "not_a_config.py").write_text("X = 1\n")
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
    assert load_file("qwen2_7b:1m").model.llm.rope_theta == 1_062_356_830


def test_packaged_names_are_the_models_and_the_stages():
    assert packaged_names() == [*sorted(MODELS), *sorted(
        f"stages/{s}" for s in [*STAGES, *R1_STAGES, "pipeline"])]


def test_a_file_of_ones_own_builds_on_a_packaged_config(tmp_path, monkeypatch):
    """A user's config file, loaded by path with its argument, starting from a packaged one."""
    (tmp_path / "my_sft.py").write_text(
        "from longvila_jax.configs.stages import sft\n\n\n"
        "def get_config(lr):\n"
        "    config = sft.get_config('tiny')\n"
        "    config.optim.learning_rate = float(lr)\n"
        "    return config\n")
    monkeypatch.chdir(tmp_path)
    config = load_file("my_sft.py:3e-4")
    assert config.optim.learning_rate == 3e-4
    config.optim.learning_rate = sft.get_config("tiny").optim.learning_rate
    assert config.to_dict() == load_file(f"{SFT}:tiny").to_dict()
