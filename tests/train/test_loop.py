"""Training runs end to end on the demo corpus with the demo model, on 8 simulated devices.

Stage freezing, LoRA merged into the final checkpoint, exact resume after `kill -9`
(subprocesses through the CLI), resuming onto another mesh layout, `export-hf` of a stage's
final checkpoint, and bad config values failing before any compute with the key named.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from runs import cli_train, scalars, stage, wait_for_checkpoint, write_config_file

from longvila_jax.checkpoint import load_config, load_params
from longvila_jax.interop.hf_export import export_hf
from longvila_jax.train.loop import train


def changed(before: dict, after: dict) -> set[str]:
    return {"/".join(k) for k in before if not np.array_equal(before[k], after[k])}


def test_align_trains_only_the_projector(corpus, tmp_path):
    from longvila_jax.checkpoint import model_params
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
                    "--config=demo", base], check=True,
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


@pytest.mark.slow
def test_kill_9_then_resume_gives_bit_identical_parameters(corpus, tmp_path):
    config_file = write_config_file(tmp_path, corpus, "sft", 8)
    whole = cli_train(config_file, tmp_path / "whole")
    killed = cli_train(config_file, tmp_path / "killed")
    checkpoint = tmp_path / "killed" / "checkpoints" / "4"
    wait_for_checkpoint(killed, checkpoint)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "final").exists()
    # TensorBoard was flushed when the checkpoint was saved: nothing it holds is lost.
    assert set(scalars(tmp_path / "killed")) >= {1, 2, 3, 4}
    # What a kill while `final/` was written leaves: the resumed run removes it.
    stale = tmp_path / "killed" / ".final.tmp-0123abcd"
    (stale / "params").mkdir(parents=True)
    resumed = cli_train(config_file, tmp_path / "killed")
    errs = []
    for proc in (whole, resumed):
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        errs.append(err)
    # It says what it did: where the logs are, where it resumed from.
    logs = tmp_path / "killed" / "tensorboard"
    assert f"TensorBoard logs: {logs} (view: tensorboard --logdir {logs})" in errs[1]
    assert f"resuming from step 4 (checkpoint {checkpoint})" in errs[1], errs[1][-3000:]
    assert "resuming" not in errs[0]
    again = cli_train(config_file, tmp_path / "whole")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "whole: already finished" in err and "skipped" in err
    want = load_params(tmp_path / "whole" / "final")
    got = load_params(tmp_path / "killed" / "final")
    assert want.keys() == got.keys()
    for key in want:  # bit for bit
        assert np.array_equal(want[key], got[key]), "/".join(key)
    assert not stale.exists()
    # Every step logged once, as the uninterrupted run logged it (a kill's unsaved steps
    # are purged at the resume).
    assert scalars(tmp_path / "killed") == scalars(tmp_path / "whole")
    assert sorted(scalars(tmp_path / "whole")) == list(range(1, 9))


def test_ctrl_c_is_one_line_naming_the_checkpoint_to_resume_from(corpus, tmp_path):
    config_file = write_config_file(tmp_path, corpus, "sft", 200)
    run = cli_train(config_file, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "2"
    wait_for_checkpoint(run, checkpoint)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("longvila-jax: error: interrupted; running the same command again "
                           f"resumes from {tmp_path / 'run' / 'checkpoints'}/"), last
    step = int(last.rsplit("/", 1)[1])
    assert step >= 2 and (tmp_path / "run" / "checkpoints" / str(step)).is_dir()


@pytest.mark.slow
def test_resume_on_another_mesh_layout_continues_the_run(corpus, tmp_path):
    from longvila_jax.train.loop import make_data, restore_run, setup, to_model_batch
    from longvila_jax.train.run_checkpoint import RunCheckpoints

    first = stage(corpus, "sft", 2, batch_size=2, parallel=(1, 2, 4))
    train(first, tmp_path / "run", progress=False)
    for layout in ((1, 2, 4), (2, 1, 4), (1, 8, 1)):
        config = stage(corpus, "sft", 2, batch_size=2, parallel=layout)
        run = setup(config)
        with RunCheckpoints(tmp_path / "run" / "checkpoints", keep=3, every=2) as ckpts:
            assert restore_run(run, ckpts) == 2
            data = make_data(config, run.model.media_tokens_per_frame,
                             saved=ckpts.data_states(2))
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
