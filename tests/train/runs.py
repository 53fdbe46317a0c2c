"""Helpers for the tests that run training: stage configs on the demo corpus, the CLI in a
subprocess (one or several processes), and the scalars a run wrote to TensorBoard."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from tensorboardX.proto import event_pb2

from longvila_jax.demo import demo_config

ROOT = Path(__file__).resolve().parents[2]


def stage(corpus, name, steps, parallel=(1, 2, 4), **train):
    """The demo config of stage `name`, `steps` long, checkpointing every 2 steps."""
    config = demo_config(corpus, parallel=parallel)[name]
    config.optim.total_steps = steps
    config.optim.warmup_steps = 0
    config.train.update(checkpoint_every=2, **train)
    return config


def write_config_file(tmp_path, corpus, name, steps, parallel=(1, 2, 4)) -> Path:
    """A config file for the CLI holding a demo stage (sources are not flag-overridable)."""
    (tmp_path / "corpus.json").write_text(json.dumps(corpus))
    path = tmp_path / "stage_config.py"
    path.write_text(
        "import json\n"
        "from longvila_jax.demo import demo_config\n"
        "def get_config():\n"
        f"    corpus = json.loads(open({str(tmp_path / 'corpus.json')!r}).read())\n"
        f"    config = demo_config(corpus, parallel={tuple(parallel)!r})[{name!r}]\n"
        f"    config.optim.update(total_steps={steps}, warmup_steps=0)\n"
        "    config.train.update(checkpoint_every=2, batch_size=2)\n"
        "    return config\n")
    return path


def cli_train(config_file: Path, workdir: Path, *extra, env: dict | None = None
              ) -> subprocess.Popen:
    """`longvila-jax train` in a subprocess, `env` added to this process's environment for
    it alone (setting it here would reach this worker's JAX if not yet started). SIGINT is
    given back its default first: pytest-xdist's workers ignore it, a child inherits that,
    and Python then never raises KeyboardInterrupt (the Ctrl-C test would see a run that
    cannot be interrupted)."""
    return subprocess.Popen([sys.executable, "-m", "longvila_jax.cli", "train", "--quiet",
                             f"--config={config_file}", f"--workdir={workdir}", *extra],
                            env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_checkpoint(run: subprocess.Popen, checkpoint: Path, timeout: float = 600) -> None:
    """Block until `run` has written `checkpoint` (a folder); fail with its stderr if it
    ends or the time runs out first."""
    deadline = time.time() + timeout
    while not checkpoint.is_dir() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.is_dir(), run.communicate()[1][-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_launch(n: int, *args, log_dir: Path, timeout: int = 1200):
    """`launch/local.sh n longvila-jax ARGS`: n processes x 4 CPU devices."""
    # XLA_FLAGS cleared: this test process's own 8-device flag must not reach the children.
    env = {**os.environ, "XLA_FLAGS": "", "DEVICES_PER_PROCESS": "4", "LOG_DIR": str(log_dir),
           "LONGVILA": f"{sys.executable} -m longvila_jax.cli"}
    return subprocess.run([str(ROOT / "launch" / "local.sh"), str(n), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def scalars(workdir: Path, tag: str = "loss") -> dict[int, float]:
    """`tag` per step from a run's TensorBoard event files (TFRecord framing), read as
    TensorBoard does: a session that starts at step s purges earlier events at >= s."""
    found: dict[int, float] = {}
    for path in sorted(glob.glob(str(workdir / "tensorboard" / "events*"))):
        data, i = Path(path).read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == \
                    event.session_log.START:
                found = {s: v for s, v in found.items() if s < event.step}
            for value in event.summary.value:
                if value.tag == tag:
                    found[event.step] = value.simple_value
    return found
