"""Multi-process runs with real processes on localhost (CPU devices, gloo collectives).

Two processes x 4 devices train the tiny model with SP (node=2 across the processes,
local=4 inside each) and must give the losses of one process x 8 devices; the checkpoint
they write together restores in a one-process run. Start-up and failure: an unreachable
coordinator fails in seconds naming its address, and a process that dies stops the others.
"""

from __future__ import annotations

import glob
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from longvila_jax.data.demo_corpus import write_demo_data

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from test_loop import cli_train, stage, write_config_file  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("corpus"), scale=0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(workdir: Path) -> dict[int, float]:
    """`loss` per step from the run's TensorBoard event files (TFRecord framing)."""
    found = {}
    for path in sorted(glob.glob(str(workdir / "tensorboard" / "events*"))):
        data, i = Path(path).read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                if value.tag == "loss":
                    found[event.step] = value.simple_value
    return found


def local_launch(n: int, *args, log_dir: Path, timeout: int = 1200):
    # XLA_FLAGS cleared: this test process's own 8-device flag must not reach the children.
    env = {**os.environ, "XLA_FLAGS": "", "DEVICES_PER_PROCESS": "4", "LOG_DIR": str(log_dir),
           "LONGVILA": f"{sys.executable} -m longvila_jax.cli"}
    return subprocess.run([str(ROOT / "launch" / "local.sh"), str(n), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(corpus, tmp_path):
    from longvila_jax.train.checkpoint import load_params
    from longvila_jax.train.loop import _state, setup
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

    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
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
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), _state(run))
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
         f"--config={ROOT / 'configs' / 'tiny.py'}", f"--coordinator={address}",
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
                              f"--config={ROOT / 'configs' / 'tiny.py'}", *flags],
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
