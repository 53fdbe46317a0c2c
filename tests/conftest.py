"""Shared set-up: 8 simulated CPU devices, the PyTorch reference env, fresh random seeds."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# XLA reads this once, when the first backend starts; pytest (and every xdist worker)
# imports this file before any test module, so the sequence-parallel tests under
# tests/parallel see 8 CPU devices. It changes nothing for GPU platforms.
SIMULATED_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={SIMULATED_DEVICES}").strip()

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).parent / "reference"


def _reference_python() -> Path:
    """Create (once, under a file lock) and return the reference env's interpreter.

    The env lives in `$LONGVILA_REF_ENV` (default `.ref-env/` in the repo) and is rebuilt
    when `tests/reference/requirements.txt` changes. `$LONGVILA_REF_PYTHON` picks the
    interpreter that creates it (default python3.11: the only CPU torch wheel here).
    """
    env_dir = Path(os.environ.get("LONGVILA_REF_ENV", ROOT / ".ref-env"))
    requirements = REFERENCE / "requirements.txt"
    stamp = hashlib.sha256(requirements.read_bytes()).hexdigest()
    python = env_dir / "bin" / "python"
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(str(env_dir) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (env_dir / "stamp").exists() and (env_dir / "stamp").read_text() == stamp:
            return python
        creator = os.environ.get("LONGVILA_REF_PYTHON", "python3.11")
        # pyenv machines: pick the 3.11 install even where .python-version says 3.12.
        env = {**os.environ, "PYENV_VERSION": os.environ.get("PYENV_VERSION", "3.11")}
        start = time.time()
        print(f"\ncreating the PyTorch reference env in {env_dir} ...", file=sys.stderr)
        subprocess.run([creator, "-m", "venv", "--clear", str(env_dir)], check=True, env=env)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
                       check=True)
        (env_dir / "stamp").write_text(stamp)
        print(f"reference env ready in {time.time() - start:.0f}s", file=sys.stderr)
    return python


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Run a list of actions in the reference env (see tests/reference/hf_reference.py)."""
    python = _reference_python()
    counter = iter(range(10**6))

    def run(actions):
        job = tmp_path_factory.mktemp("job") / f"job{next(counter)}.json"
        job.write_text(json.dumps(actions))
        result = subprocess.run([str(python), str(REFERENCE / "hf_reference.py"), str(job)],
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"reference job failed:\n{result.stderr[-4000:]}")

    return run


@pytest.fixture(scope="module")
def module_seed() -> int:
    """The seed of every random draw in one test module: `$LONGVILA_TEST_SEED`, else fresh.

    One seed per module, not per test, so that a test and the module-scoped fixtures it
    uses replay together from the one seed it prints (`_print_seed`).
    """
    return int(os.environ.get("LONGVILA_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


@pytest.fixture(autouse=True)
def _print_seed(request):
    """Print the seed in every test that draws from it, so a failure shows it (pytest shows a
    failing test's captured output), whichever test first built the module's fixtures."""
    if "module_seed" in request.fixturenames:
        print(f"{request.node.name}: LONGVILA_TEST_SEED={request.getfixturevalue('module_seed')}")


@pytest.fixture
def rng(module_seed):
    """A fresh random generator per test, from the module's printed seed."""
    return np.random.default_rng(module_seed)


@pytest.fixture(scope="module")
def module_rng(module_seed):
    """`rng` for module-scoped fixtures: one generator per module, on a stream of its own
    (a test's `rng` draws must not repeat its fixtures' draws). Fixtures draw from it in the
    order they are built, which depends on the tests selected: a module's second seeded
    fixture needs a stream of its own (`default_rng([module_seed, 2])`) to replay alone."""
    return np.random.default_rng([module_seed, 1])
