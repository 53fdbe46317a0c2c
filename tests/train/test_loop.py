"""Training runs end to end on the demo corpus with the demo model, on 8 simulated devices.

Stage freezing, LoRA merged into the final checkpoint, exact resume after `kill -9`
(subprocesses through the CLI), resuming onto another mesh layout, `export-hf` of a stage's
final checkpoint, and bad config values failing before any compute with the key named.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from longvila_jax.data.demo_corpus import write_demo_data
from longvila_jax.demo import demo_config
from longvila_jax.interop.hf_export import export_hf
from longvila_jax.train.checkpoint import load_config, load_params
from longvila_jax.train.loop import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("corpus"), scale=0.1)


def stage(corpus, name, steps, parallel=(1, 2, 4), **train):
    config = demo_config(corpus, parallel=parallel)[name]
    config.optim.total_steps = steps
    config.optim.warmup_steps = 0
    config.train.update(checkpoint_every=2, **train)
    return config


def changed(before: dict, after: dict) -> set[str]:
    return {"/".join(k) for k in before if not np.array_equal(before[k], after[k])}


def test_align_trains_only_the_projector(corpus, tmp_path):
    from longvila_jax.train.checkpoint import model_params
    from longvila_jax.train.loop import setup

    config = stage(corpus, "align", 2, batch_size=2)
    before = {k: np.asarray(v) for k, v in model_params(setup(config).model).items()}
    after = load_params(train(config, tmp_path / "align", progress=False))
    moved = changed(before, after)
    assert moved and all(name.startswith("projector/") for name in moved), moved
    assert {k for k in before if k[0] == "projector"} == {tuple(m.split("/")) for m in moved}


def test_context_stage_trains_lora_embeddings_norms_and_merges(corpus, tmp_path):
    config = stage(corpus, "context", 2, batch_size=2, seq_len=128)
    base = tmp_path / "base"
    subprocess.run([sys.executable, "-m", "longvila_jax.cli", "init",
                    f"--config={ROOT / 'configs' / 'demo.py'}", base], check=True,
                   capture_output=True)
    config.train.init_from = str(base)
    config.model.llm.rope_theta = 10000.0  # as the base: only the weights differ
    final = train(config, tmp_path / "context", progress=False)
    saved = load_config(final)
    assert saved.model.lora.rank == 0  # merged: a plain model
    before, after = load_params(base), load_params(final)
    assert set(before) == set(after)  # no adapter left
    moved = changed(before, after)
    # Adapters merged into q/k/v/o kernels; embeddings and LLM norms trained; nothing else.
    allowed = ("llm/embed_tokens", "llm/norm/scale", "llm/layers/input_norm/scale",
               "llm/layers/post_attention_norm/scale",
               *(f"llm/layers/{t}_proj/kernel" for t in "qkvo"))
    assert moved <= set(allowed), moved - set(allowed)
    assert {"llm/embed_tokens", "llm/layers/q_proj/kernel", "llm/layers/o_proj/kernel",
            "llm/layers/input_norm/scale"} <= moved
    # A stage's final checkpoint exports like any other.
    out = export_hf(final, tmp_path / "hf", progress=False)
    assert (out / "llm" / "config.json").is_file()


def cli_train(config_file: Path, workdir: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "longvila_jax.cli", "train", "--quiet",
                             f"--config={config_file}", f"--workdir={workdir}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def write_config_file(tmp_path, corpus, name, steps) -> Path:
    """A config file for the CLI holding a demo stage (sources are not flag-overridable)."""
    (tmp_path / "corpus.json").write_text(json.dumps(corpus))
    path = tmp_path / "stage_config.py"
    path.write_text(
        "import json\n"
        "from longvila_jax.demo import demo_config\n"
        "def get_config():\n"
        f"    corpus = json.loads(open({str(tmp_path / 'corpus.json')!r}).read())\n"
        f"    config = demo_config(corpus, parallel=(1, 2, 4))[{name!r}]\n"
        f"    config.optim.update(total_steps={steps}, warmup_steps=0)\n"
        "    config.train.update(checkpoint_every=2, batch_size=2)\n"
        "    return config\n")
    return path


@pytest.mark.slow
def test_kill_9_then_resume_gives_bit_identical_parameters(corpus, tmp_path):
    config_file = write_config_file(tmp_path, corpus, "sft", 8)
    whole = cli_train(config_file, tmp_path / "whole")
    killed = cli_train(config_file, tmp_path / "killed")
    checkpoint = tmp_path / "killed" / "checkpoints" / "4"
    deadline = time.time() + 600
    while not checkpoint.is_dir() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.is_dir(), killed.communicate()[1][-3000:]
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "final").exists()
    resumed = cli_train(config_file, tmp_path / "killed")
    for proc in (whole, resumed):
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    want = load_params(tmp_path / "whole" / "final")
    got = load_params(tmp_path / "killed" / "final")
    assert want.keys() == got.keys()
    for key in want:  # bit for bit
        assert np.array_equal(want[key], got[key]), "/".join(key)


@pytest.mark.slow
def test_resume_on_another_mesh_layout_continues_the_run(corpus, tmp_path):
    from longvila_jax.train.loop import _restore, make_data, setup, to_model_batch
    from longvila_jax.train.run_checkpoint import RunCheckpoints

    first = stage(corpus, "sft", 2, batch_size=2, parallel=(1, 2, 4))
    train(first, tmp_path / "run", progress=False)
    for layout in ((1, 2, 4), (2, 1, 4), (1, 8, 1)):
        config = stage(corpus, "sft", 2, batch_size=2, parallel=layout)
        run = setup(config)
        data = make_data(config, run.model.media_tokens_per_frame)
        with RunCheckpoints(tmp_path / "run" / "checkpoints", keep=3, every=2) as ckpts:
            assert _restore(run, ckpts, data) == 2
        out = run.step_fn(run.model, run.optimizer, to_model_batch(run, next(data)))
        if layout == (1, 2, 4):
            want = float(out["loss"])
        else:
            assert abs(float(out["loss"]) - want) <= 1e-5 * want, layout


def test_bad_config_values_fail_before_compute_naming_the_key(corpus, tmp_path):
    config_file = write_config_file(tmp_path, corpus, "align", 2)
    cases = {
        "train.trainable": ["--config.train.trainable=^nothing/"],
        "optim.warmup_steps": ["--config.optim.warmup_steps=5"],
        "parallel": ["--config.parallel.local=3"],
        "model.remat": ["--config.model.remat=some"],
        "train.batch_size": ["--config.train.batch_size=0"],
    }
    for key, flags in cases.items():
        began = time.time()
        proc = cli_train(config_file, tmp_path / "bad", *flags)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        last = [line for line in err.splitlines() if line.strip()][-1]
        assert "Traceback" not in err and last.startswith("longvila-jax: error:"), err[-3000:]
        assert key in last, (key, last)
        assert time.time() - began < 60
    assert not (tmp_path / "bad" / "checkpoints").exists()
