"""The wheel holds everything: built, installed in a fresh venv, and its `longvila-jax` run from
another folder on the packaged configs, training a packaged stage on the demo's corpus.

The fresh venv gets the wheel and nothing else; a `.pth` line puts this env's site-packages
after its own, so jax & co. are importable without being downloaded again, while this
checkout's editable install (a finder that only this env's own `.pth` files start) is not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from longvila_jax.data.demo_corpus import write_demo_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# One CPU device, whatever this process simulates: the stage's mesh is 1 x 1 x 1.
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "XLA_FLAGS": "",
       "JAX_PLATFORMS": "cpu"}


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                            env=ENV, timeout=300)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-4000:])
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel built from this checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp / "source"
    shutil.copytree(ROOT / "longvila_jax", source / "longvila_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp / "dist", source)
    (wheel,) = (tmp / "dist").glob("longvila_jax-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
        wheel)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
                .stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


def test_the_installed_command_runs_the_packaged_configs_from_another_folder(venv, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    imported = run(venv / "bin" / "python", "-c", "import longvila_jax; "
                   "print(longvila_jax.__file__)", cwd=elsewhere).stdout.strip()
    assert Path(imported).is_relative_to(venv), imported
    command = venv / "bin" / "longvila-jax"

    # A packaged stage of the packaged demo model, as `longvila-jax demo` trains it.
    shown = yaml.safe_load(run(command, "show-config", "--config=stages/long_sft:demo",
                               cwd=elsewhere).stdout)
    assert (shown["optim"]["total_steps"], shown["model"]["llm"]["num_layers"]) == (600, 4)

    # A packaged stage trains on its placeholder sources, relative to the working folder
    # (data/align.jsonl, media under data/): here the demo corpus's align stage.
    corpus = write_demo_data(tmp_path / "corpus", scale=0.02)
    data = elsewhere / "data"
    shutil.copytree(tmp_path / "corpus" / "align", data)
    (data / "align.jsonl").write_text("".join(
        Path(source["jsonl"]).read_text() for source in corpus["stages"]["align"]))
    trained = run(command, "train", "--quiet", "--config=stages/align:demo", "--workdir=run",
                  f"--config.data.tokenizer={corpus['tokenizer']}",
                  "--config.optim.total_steps=2", cwd=elsewhere)
    assert f"final checkpoint: {elsewhere / 'run' / 'final'}" in trained.stdout
    assert (elsewhere / "run" / "final" / "config.json").is_file()
