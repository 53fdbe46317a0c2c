"""The `longvila-jax` command: thin subcommands over importable library functions.

  longvila-jax import-hf SRC DST [--vision=DIR --projector=TYPE --media_token_id=N
                                  --newline_token_id=N]
  longvila-jax export-hf CKPT OUT [--format=longvila|llava --max_shard_gb=5]
  longvila-jax init --config=configs/tiny.py DST     (a randomly initialised checkpoint)
  longvila-jax show-config --config=configs/qwen2_7b.py:1m
  longvila-jax train --config=configs/stages/3_sft.py:qwen2_7b --workdir=DIR [--config.k=v]
  longvila-jax pipeline --config=configs/stages/pipeline.py:qwen2_7b --workdir=DIR
  longvila-jax demo [--workdir=demo]   (synthetic data, tiny model, all five stages, V-NIAH)

Bad input ends with one line on stderr naming the file/key/value and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=False)
_VISION = flags.DEFINE_string("vision", None, "import-hf: SigLIP folder to assemble with SRC.")
_PROJECTOR = flags.DEFINE_string("projector", None, "import-hf: projector type with --vision.")
_MEDIA = flags.DEFINE_integer("media_token_id", None, "import-hf: override the media token id.")
_NEWLINE = flags.DEFINE_integer("newline_token_id", None, "import-hf: override the newline id.")
_FORMAT = flags.DEFINE_enum("format", "longvila", ["longvila", "llava"], "export-hf: layout.")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "export-hf: safetensors shard size (GB).")
_QUIET = flags.DEFINE_bool("quiet", False, "Hide progress bars.")
_WORKDIR = flags.DEFINE_string("workdir", None, "train/pipeline/demo: folder for everything a "
                               "run writes (checkpoints, TensorBoard, final model).")

USAGE = ("usage: longvila-jax {import-hf SRC DST | export-hf CKPT OUT | init DST | show-config | "
         "train | pipeline | demo} [flags]; see --helpfull")


def _args(argv, names):
    if len(argv) != len(names):
        raise app.UsageError(f"expected {' '.join(names)}; got {argv!r}\n{USAGE}")
    return argv


def _need_config():
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/NAME.py is required for this command")
    from longvila_jax.config import validate

    return validate(_CONFIG.value)


def _need_workdir() -> str:
    if not _WORKDIR.value:
        raise app.UsageError("--workdir=DIR is required for this command")
    return _WORKDIR.value


def _dispatch(command: str, argv: list[str]):
    progress = not _QUIET.value
    if command == "import-hf":
        from longvila_jax.interop.hf_import import import_hf

        src, dst = _args(argv, ["SRC", "DST"])
        out = import_hf(src, dst, vision=_VISION.value, projector_type=_PROJECTOR.value,
                        media_token_id=_MEDIA.value, newline_token_id=_NEWLINE.value,
                        progress=progress)
        print(f"wrote {out}")
    elif command == "export-hf":
        from longvila_jax.interop.hf_export import export_hf

        ckpt, out = _args(argv, ["CKPT", "OUT"])
        export_hf(ckpt, out, fmt=_FORMAT.value, max_shard_bytes=int(_SHARD_GB.value * 1e9),
                  progress=progress)
        print(f"wrote {out}")
    elif command == "init":
        import numpy as np

        from longvila_jax.models.longvila import build_model
        from longvila_jax.train.checkpoint import model_params, save_checkpoint

        (dst,) = _args(argv, ["DST"])
        config = _need_config()
        params = {k: np.asarray(v) for k, v in model_params(build_model(config)).items()}
        print(f"wrote {save_checkpoint(dst, config, params)}")
    elif command == "show-config":
        _args(argv, [])
        print(_need_config())
    elif command == "train":
        from longvila_jax.train.loop import train

        _args(argv, [])
        print(f"final checkpoint: {train(_need_config(), _need_workdir(), progress=progress)}")
    elif command == "pipeline":
        from longvila_jax.train.stages import run_stages

        _args(argv, [])
        if _CONFIG.value is None:
            raise app.UsageError("--config=configs/stages/pipeline.py[:MODEL] is required")
        final = run_stages(_CONFIG.value, _need_workdir(), progress=progress)
        print(f"final checkpoint: {final}")
    elif command == "demo":
        from longvila_jax.demo import run_demo

        _args(argv, [])
        workdir = Path(_WORKDIR.value or "demo").absolute()
        final, result = run_demo(workdir, progress=progress)
        out = workdir / "eval"
        print(f"checkpoints: {final.parent.parent} (final model: {final})")
        print("needle accuracy by frames: " + ", ".join(
            f"{f}: {sum(row) / len(row):.0%}" for f, row in zip(
                result["frame_counts"], result["accuracy"], strict=True)))
        print(f"heatmap: {out / 'needle_heatmap.png'}  results: {out / 'needle.json'}")
    else:
        raise app.UsageError(f"unknown command {command!r}\n{USAGE}")


def main(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it closes at INFO
    if len(argv) < 2:
        raise app.UsageError(USAGE)
    from longvila_jax.config import ConfigError
    from longvila_jax.data.pipeline import DataError
    from longvila_jax.data.video import MediaError
    from longvila_jax.interop.safetensors_io import CheckpointError

    try:
        _dispatch(argv[1], argv[2:])
    except (CheckpointError, ConfigError, DataError, FileExistsError, FileNotFoundError,
            MediaError, ValueError) as e:
        print(f"longvila-jax: error: {e}", file=sys.stderr)
        sys.exit(2)


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
