"""Multi-process runs with real processes on localhost (CPU devices, gloo collectives).

Two processes x 4 devices train the tiny model with SP (node=2 across the processes,
local=4 inside each) and must give the losses of one process x 8 devices; the checkpoint
they write together restores in a one-process run. Start-up and failure: an unreachable
coordinator fails in seconds naming its address, and a process that dies stops the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from runs import cli_train, free_port, local_launch, scalars, stage, write_config_file


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(corpus, tmp_path):
    from longvila_jax.checkpoint import load_params
    from longvila_jax.train.loop import run_state, setup
    from longvila_jax.train.run_checkpoint import RunCheckpoints

    config_file = write_config_file(tmp_path, corpus, "sft", 3)
    log = "--config.train.log_every=1"
    one = cli_train(config_file, tmp_path / "one", log)
    two = local_launch(2, "train", "--quiet", f"--config={config_file}",
                       f"--workdir={tmp_path / 'two'}", log, log_dir=tmp_path)
    logs = "".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("process_*.log")))
    assert two.returncode == 0, two.stderr[-2000:] + logs
    _, err = one.communicate(timeout=1200)
    assert one.returncode == 0, err[-3000:]
    assert "process 0 of 2" in logs and "process 1 of 2" in logs

    want, got = scalars(tmp_path / "one"), scalars(tmp_path / "two")
    assert sorted(want) == sorted(got) == [1, 2, 3]
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got, want)

    # Process 0 alone wrote the final checkpoint; it holds the one-process parameters.
    final = load_params(tmp_path / "two" / "final")
    reference = load_params(tmp_path / "one" / "final")
    for key in reference:
        np.testing.assert_allclose(final[key], reference[key], rtol=1e-4, atol=1e-5,
                                   err_msg="/".join(key))

    # The run checkpoint both processes wrote restores on this one process's 8 devices.
    run = setup(stage(corpus, "sft", 3, batch_size=2))
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), run_state(run))
    with RunCheckpoints(tmp_path / "two" / "checkpoints", keep=3, every=2) as checkpoints:
        restored = checkpoints.restore(3, abstract)
    flat = jax.tree_util.tree_flatten_with_path(restored["params"])[0]
    assert flat
    for path, value in flat:
        key = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        np.testing.assert_allclose(np.asarray(value), reference[key], rtol=1e-4, atol=1e-5,
                                   err_msg=str(key))


def test_an_unreachable_coordinator_fails_in_seconds_naming_it(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    began = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "longvila_jax.cli", "show-config",
         "--config=tiny", f"--coordinator={address}",
         "--num_processes=2", "--process_id=1", "--distributed_timeout=3"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("longvila-jax: error:") and address in last, last
    assert "within 3 s" in last and time.time() - began < 60
    for flags, named in [(["--coordinator=localhost", "--num_processes=2", "--process_id=1"],
                          "HOST:PORT"),
                         (["--num_processes=2"], "--coordinator"),
                         ([f"--coordinator={address}", "--num_processes=2", "--process_id=2"],
                          "--process_id=2")]:
        bad = subprocess.run([sys.executable, "-m", "longvila_jax.cli", "show-config",
                              "--config=tiny", *flags],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and named in bad.stderr.splitlines()[-1], bad.stderr[-2000:]


DIES = textwrap.dedent("""
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from longvila_jax.distributed import initialize
    initialize(sys.argv[1], 2, int(sys.argv[2]), timeout_s=60, heartbeat_s=5)
    mesh = jax.make_mesh((4,), ("x",))
    x = jax.make_array_from_callback((4,), NamedSharding(mesh, P("x")),
                                     lambda i: np.arange(4.0)[i])
    print("sum", float(jax.jit(lambda a: a.sum())(x)), flush=True)
    if jax.process_index() == 1:
        os._exit(7)  # dies without a word to the coordinator
    time.sleep(600)  # the survivor must be stopped long before this
""")


def test_a_process_that_dies_stops_the_others(tmp_path):
    script = tmp_path / "dies.py"
    script.write_text(DIES)
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(script), address, str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    began = time.time()
    outs = [p.communicate(timeout=300) for p in procs]
    assert procs[1].returncode == 7, outs[1][1][-2000:]
    assert "sum 6.0" in outs[0][0], outs[0][1][-2000:]
    assert procs[0].returncode != 0 and time.time() - began < 180, outs[0][1][-2000:]


@pytest.mark.parametrize("env, want", [
    ({"SLURM_NTASKS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, [0, 1, 2, 3]),
    ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}, list(range(8))),
    ({"SLURM_NTASKS_PER_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1"}, None),  # JAX: one GPU each
    ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8", "JAX_LOCAL_DEVICE_IDS": "0"},
     None),  # the user's choice, which JAX reads
])
def test_slurm_one_task_per_node_keeps_every_gpu(monkeypatch, env, want):
    from longvila_jax.distributed import _slurm_local_devices

    for name in ("SLURM_NTASKS_PER_NODE", "CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE",
                 "JAX_LOCAL_DEVICE_IDS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _slurm_local_devices() == want


def _start(processes: int, *args) -> list[subprocess.Popen]:
    """`longvila-jax ARGS` as `processes` processes x 8/`processes` CPU devices, joined
    through a local coordinator, in the background (killable one by one, unlike
    launch/local.sh, which stops its processes with SIGTERM)."""
    port, procs = free_port(), []
    for i in range(processes):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
        flags = [f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}",
                 f"--process_id={i}"] if processes > 1 else []
        procs.append(subprocess.Popen([sys.executable, "-m", "longvila_jax.cli", *args, *flags],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _samples(workdir) -> list[tuple[str, int]]:
    """(source, stream position) of every sample the run's steps consumed, from its sample
    log, each data shard's rows once (processes that split one sequence log the same)."""
    steps = {}
    for path in (workdir / "samples").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            steps[entry["step"], tuple(entry["shard"])] = entry["rows"]
    return [(name, position) for rows in steps.values() for row in rows
            for name, position, *_ in row]


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_run_killed_on_one_process_count_resumes_on_another(corpus, tmp_path, before, after):
    """Data parallel over the processes (data=2: each of 2 processes reads its own rows, one
    process reads both): killed after checkpoint 4, resumed on the other process count.
    Every sample of the first epoch is consumed exactly once over both runs, no sample
    twice, and the loss goes on from where it was."""
    config_file = write_config_file(tmp_path, corpus, "sft", 10, parallel=(2, 1, 4))
    workdir = tmp_path / "run"
    args = ["train", "--quiet", f"--config={config_file}", f"--workdir={workdir}",
            "--config.train.log_samples=True"]
    first = _start(before, *args)
    deadline = time.time() + 900
    while not (workdir / "checkpoints" / "4").is_dir() and time.time() < deadline \
            and all(p.poll() is None for p in first):
        time.sleep(0.05)
    for proc in first:
        proc.kill()
    errors = [p.communicate()[1][-3000:] for p in first]
    assert (workdir / "checkpoints" / "4").is_dir(), errors
    if after == 1:
        resumed = cli_train(config_file, workdir, *args[4:])
        err = resumed.communicate(timeout=1200)[1]
        assert resumed.returncode == 0, err[-3000:]
    else:
        result = local_launch(after, *args, log_dir=tmp_path)
        logs = "".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("process_*.log")))
        assert result.returncode == 0, result.stderr[-2000:] + logs

    seen = _samples(workdir)
    assert len(seen) == len(set(seen)), "a sample was consumed twice"
    for source in corpus["stages"]["sft"]:
        records = len(Path(source["jsonl"]).read_text().splitlines())
        mine = {position for name, position in seen if name == source["name"]}
        assert mine >= set(range(records)), f"{source['name']}: epoch 0 not whole"
    losses = scalars(workdir)
    assert sorted(losses) == list(range(1, 11))
    assert max(losses[s] for s in range(5, 11)) < losses[1], losses
