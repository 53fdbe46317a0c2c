"""Runs whose numbers go non-finite never finish green and never write a non-finite
checkpoint: `train.nonfinite` 'stop' ends the run with one line and exit status 3, 'skip'
leaves parameters and optimizer state bit-identical and stops after too many in a row."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from runs import cli_train, scalars, stage, write_config_file

from longvila_jax.checkpoint import load_params
from longvila_jax.train import loop


def _finite_checkpoints(workdir) -> list[int]:
    """The run checkpoints' steps, after checking every array in each is finite."""
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    for step in steps:
        state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            if np.issubdtype(np.asarray(leaf).dtype, np.floating):
                assert np.isfinite(leaf).all(), (step, jax.tree_util.keystr(path))
    return steps


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_line_and_leaves_only_finite_checkpoints(corpus,
                                                                                tmp_path):
    config_file = write_config_file(tmp_path, corpus, "sft", 8)
    proc = cli_train(config_file, tmp_path / "run", "--config.optim.learning_rate=1e30",
                     "--config.train.checkpoint_every=1")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 3, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("longvila-jax: error: step "), err
    steps = _finite_checkpoints(tmp_path / "run")
    assert steps, "the steps before the divergence were saved"
    assert f"last good checkpoint: {tmp_path / 'run' / 'checkpoints' / str(steps[-1])}" \
        in lines[-1]
    assert "nan" in lines[-1] or "inf" in lines[-1]
    assert not (tmp_path / "run" / "final").exists()


def _poisoned(batch: dict) -> dict:
    """The batch with NaN frames: the loss is NaN, the shapes unchanged."""
    return dataclasses.replace(batch, frames=batch.frames * np.nan)


def _values(run) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves((nnx.state(run.model),
                                                    nnx.state(run.optimizer)))]


def test_a_skipped_step_leaves_parameters_and_optimizer_bit_identical(corpus):
    run = loop.setup(stage(corpus, "sft", 4, batch_size=2, nonfinite="skip"))
    data = loop.make_data(run.config, run.model.media_tokens_per_frame)
    step = lambda batch: jax.device_get(run.step_fn(run.model, run.optimizer, batch))
    out = step(loop.to_model_batch(run, next(data)))
    assert out["applied"]
    before = _values(run)
    out = step(_poisoned(loop.to_model_batch(run, next(data))))
    assert not out["applied"] and np.isnan(out["loss"])
    after = _values(run)
    assert len(before) == len(after)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    out = step(loop.to_model_batch(run, next(data)))  # a good batch trains again
    assert out["applied"] and not all(np.array_equal(a, b) for a, b in
                                      zip(after, _values(run), strict=True))


@pytest.mark.slow
def test_skip_counts_skipped_steps_and_stops_after_the_limit(corpus, tmp_path, monkeypatch):
    poison = set()
    batches = iter(range(10**6))
    real = loop.to_model_batch

    def to_model_batch(run, packed):
        batch = real(run, packed)
        return _poisoned(batch) if next(batches) in poison else batch

    monkeypatch.setattr(loop, "to_model_batch", to_model_batch)
    poison.add(2)  # the third step
    config = stage(corpus, "sft", 6, batch_size=2, nonfinite="skip", nonfinite_limit=2)
    final = loop.train(config, tmp_path / "skip", progress=False)
    assert scalars(tmp_path / "skip", "nonfinite_skipped") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1,
                                                               6: 1}
    assert all(np.isfinite(v).all() for v in load_params(final).values())

    batches = iter(range(10**6))
    poison.update({3, 4, 5})  # steps 3 to 6: two in a row stop the run at step 4
    with pytest.raises(loop.Diverged, match=r"^step 4: 2 steps in a row not finite.*"
                                            r"last good checkpoint: .*checkpoints/2$"):
        loop.train(config, tmp_path / "stop", progress=False)
    assert _finite_checkpoints(tmp_path / "stop") == [2]
    assert not (tmp_path / "stop" / "final").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 1e39 in float32, on purpose
def test_an_update_that_overflows_the_state_is_never_saved(corpus, tmp_path):
    """A learning rate of 1e39 is infinite in float32: the first update, from a finite loss
    and gradient, makes every parameter it moves infinite. The check before the first
    checkpoint stops the run; nothing is written."""
    config = stage(corpus, "sft", 4, batch_size=2, nonfinite="skip")
    config.optim.learning_rate = 1e39
    config.train.checkpoint_every = 1
    with pytest.raises(loop.Diverged, match=r"^step 1: the parameters or optimizer state are "
                                            r"not finite.*last good checkpoint: none$"):
        loop.train(config, tmp_path / "run", progress=False)
    assert _finite_checkpoints(tmp_path / "run") == []
    assert not (tmp_path / "run" / "final").exists()
