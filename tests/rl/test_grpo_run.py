"""The GRPO stage end to end on the demo model (8 simulated devices): it trains the LLM only,
logs its metrics and reward curve, and a run killed with SIGKILL and run again ends with
the parameters of one that never stopped, bit for bit; bad `rl` values and bad question
lines fail with the key or the file and line named."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from train.runs import (  # tests/train/runs.py: the CLI as a subprocess
    cli_train,
    wait_for_checkpoint,
)

from longvila_jax.checkpoint import build_model, load_params, model_params
from longvila_jax.config import ConfigError
from longvila_jax.configs.stages import grpo
from longvila_jax.data.demo_corpus import write_demo_data
from longvila_jax.data.synthetic import write_index_video
from longvila_jax.rl.loop import shares_prompts, step_questions, train_grpo


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    corpus = write_demo_data(root / "corpus", scale=0.02)
    records = []
    for i in range(3):
        video = write_index_video(root / f"v{i}.mp4", 8, width=56, height=56)
        records.append({"video": str(video), "question": f"Which frame count is {i}?",
                        "options": ["one", "two", "three", "four"], "answer": "ABC"[i]})
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"tokenizer": corpus["tokenizer"], "questions": str(questions)}


def _config(data, steps: int):
    config = grpo.get_config("demo")
    config.data.tokenizer = data["tokenizer"]
    config.rl.update(questions=data["questions"], prompts_per_step=2, answers=4,
                     max_new_tokens=6, minibatches=2, beta=0.05)
    config.train.update(num_frames=4, checkpoint_every=1)
    config.parallel.update(node=2, local=4)
    config.optim.total_steps = steps
    return config


def _config_file(data, tmp_path, config: str) -> Path:
    """A config file for the CLI whose `get_config()` returns `config`, an expression of
    this module's config helpers and `data`."""
    (tmp_path / "data.json").write_text(json.dumps(data))
    path = tmp_path / "grpo_config.py"
    path.write_text(
        "import json, sys\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]\n"
        "from test_grpo_run import _config, _one_device_config\n"
        "def get_config():\n"
        f"    data = json.loads(open({str(tmp_path / 'data.json')!r}).read())\n"
        f"    return {config}\n")
    return path


def test_kill_9_then_resume_ends_bit_identical_and_trains_the_llm_only(data, tmp_path):
    """The GRPO stage through the CLI, killed (SIGKILL) after step 1's checkpoint and run
    again, ends with the parameters of a run that never stopped, bit for bit."""
    whole = load_params(train_grpo(_config(data, 3), tmp_path / "whole", progress=False))
    config_file = _config_file(data, tmp_path, "_config(data, 3)")
    cut = tmp_path / "cut"
    killed = cli_train(config_file, cut)
    wait_for_checkpoint(killed, cut / "checkpoints" / "1")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (cut / "final").exists()
    resumed = cli_train(config_file, cut)
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    final = load_params(cut / "final")
    assert set(whole) == set(final)
    for key in whole:
        np.testing.assert_array_equal(whole[key], final[key], err_msg="/".join(key))
    lines = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for key in ("reward_mean", "reward_mcq_accuracy", "reward_format", "kl", "entropy",
                "clip_fraction",
                "rollout_s", "update_s", "reference_s", "encode_s", "answer_tokens_mean"):
        assert all(np.isfinite(line[key]) for line in lines), key
    assert (cut / "rewards.png").stat().st_size > 0
    initial = {k: np.asarray(v) for k, v in model_params(build_model(_config(data, 1))).items()}
    moved = {k[0] for k in whole if not np.array_equal(whole[k], initial[k])}
    assert moved == {"llm"}, moved


def _one_device_config(data):
    """3 questions x 4 answers in minibatches of 6, which split the second question's group
    (4 + 2 answers: an empty slot beside the 2), on one device."""
    config = _config(data, 2)
    config.parallel.update(node=1, local=1)
    config.rl.update(prompts_per_step=3, minibatches=2, old_logprobs="recompute")
    return config


def test_on_one_device_each_prompt_runs_once_per_pass(data, tmp_path):
    """On one device (through the CLI, in a process that sees one device) `rl.shared_prompt`,
    unset, computes each prompt once: it trains the LLM and logs finite metrics, the first
    ratio 1."""
    config_file = _config_file(data, tmp_path, "_one_device_config(data)")
    run = cli_train(config_file, tmp_path / "one",
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    _, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text()
             .splitlines()]
    assert [line["updates"] for line in lines] == [2, 2]
    for key in ("loss", "ratio", "kl", "entropy", "grad_norm"):
        assert all(np.isfinite(line[key]) for line in lines), key
    assert abs(lines[0]["ratio"] - 1.0) < 1e-3  # old log-probabilities recomputed: ratio 1
    trained = {k: np.asarray(v) for k, v in load_params(tmp_path / "one" / "final").items()}
    config = _one_device_config(data)
    initial = {k: np.asarray(v) for k, v in model_params(build_model(config)).items()}
    moved = {k[0] for k in trained if not np.array_equal(trained[k], initial[k])}
    assert moved == {"llm"}, moved


def answer_length(answer, sample):
    """A reward that differs within a group (the untrained model's answers are all wrong)."""
    return len(answer) / 10


def test_under_ulysses_a_step_with_each_prompt_once_trains_as_rows_do(data, tmp_path):
    """A GRPO step on 8 devices under Ulysses computes each prompt once (`rl.shared_prompt`
    unset) and ends with the parameters of the same step over rows prompt + answer."""
    finals = []
    for shared in (None, False):
        config = _config(data, 1)
        config.parallel.attention = "ulysses"
        config.rl.update(shared_prompt=shared, rewards="test_grpo_run:answer_length=1")
        finals.append(load_params(train_grpo(config, tmp_path / str(shared), progress=False)))
    initial = {k: np.asarray(v) for k, v in model_params(build_model(_config(data, 1))).items()}
    assert any(not np.array_equal(finals[0][k], initial[k]) for k in initial)
    for key in finals[1]:
        np.testing.assert_allclose(finals[0][key], finals[1][key], rtol=1e-4, atol=1e-6,
                                   err_msg="/".join(key))


@pytest.mark.parametrize(("setting", "scheme", "shared"), [
    (None, "none", True), (None, "ulysses", True), (None, "ring", False), (None, "2d", False),
    (False, "none", False), (True, "ulysses", True)])
def test_each_prompt_is_computed_once_where_it_can_be(data, setting, scheme, shared):
    config = _config(data, 1)
    config.rl.shared_prompt = setting
    assert shares_prompts(config, SimpleNamespace(layout=SimpleNamespace(scheme=scheme))) \
        is shared


def test_a_bad_question_line_fails_with_the_file_and_line_named(data, tmp_path):
    lines = Path(data["questions"]).read_text().splitlines()
    bad = json.loads(lines[1])
    del bad["answer"]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(bad), lines[2]]) + "\n")
    config = _config({**data, "questions": str(path)}, 1)
    with pytest.raises(ConfigError, match=r"questions\.jsonl:2.*answer"):
        train_grpo(config, tmp_path / "bad", progress=False)


def test_every_question_is_asked_once_per_epoch():
    asked = [q for step in range(6) for q in step_questions(5, step, 3, seed=7)]
    assert sorted(asked[:5]) == list(range(5))
    assert sorted(asked[5:10]) == list(range(5))
    assert asked != [q for step in range(6) for q in step_questions(5, step, 3, seed=8)]


@pytest.mark.parametrize(("key", "value", "named"), [
    ("rl.answers", 1, "rl.answers"), ("rl.kl", "kld", "rl.kl"),
    ("rl.rewards", "mcq_accuracy=high", "rl.rewards"), ("rl.minibatches", 3, "rl.minibatches"),
    ("rl.old_logprobs", "cached", "rl.old_logprobs"), ("rl.questions", "nope.jsonl",
                                                       "rl.questions"),
    ("rl.shared_prompt", True, "rl.shared_prompt")])  # 2d over 8 devices
def test_bad_rl_values_fail_with_the_key_named(data, tmp_path, key, value, named):
    config = _config(data, 1)
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        train_grpo(config, tmp_path / "bad", progress=False)
