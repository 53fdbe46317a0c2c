"""The `longvila-jax` command: thin subcommands over importable library functions.

  longvila-jax import-hf SRC DST [--vision=DIR --projector=TYPE --media_token_id=N
                                  --newline_token_id=N]
  longvila-jax export-hf CKPT OUT [--format=longvila|llava --max_shard_gb=5]
  longvila-jax init --config=tiny DST     (a randomly initialised checkpoint)
  longvila-jax show-config --config=qwen2_7b:1m
  longvila-jax train --config=stages/sft:qwen2_7b --workdir=DIR [--config.k=v]
  longvila-jax pipeline --config=stages/pipeline:qwen2_7b --workdir=DIR
  longvila-jax demo [--workdir=demo] [--rl]   (synthetic data, demo model, all five stages,
                    V-NIAH; --rl: then CoT SFT and GRPO, eval-mcq before and after)
  longvila-jax generate --checkpoint=DIR --video=FILE --prompt="..." [--num-frames=N
                        --max-new-tokens=N --temperature=T --top-p=P --stop=S --mesh=N,L]
  longvila-jax eval-needle --checkpoint=DIR --out=DIR [--haystack=FILE --needles=JSONL
                           --frame-counts=32,64 --depths=0,0.2,...,1 --generate --mesh=N,L]
  longvila-jax eval-mcq --checkpoint=DIR --questions=JSONL --out=DIR [--style=r1] [--subtitles
                        --num-frames=N --limit=N]
  longvila-jax serve --checkpoint=DIR [--host=127.0.0.1 --port=8000 --media-root=DIR
                     --api-key=KEY --allow-remote-media]   (OpenAI-compatible HTTP server)

`longvila-jax --help` lists the commands, `longvila-jax COMMAND --help` one command's flags.
JAX's persistent compilation cache is on (`--compilation-cache=DIR`, default
~/.cache/longvila-jax/xla; `--compilation-cache=` turns it off), so a second run of a
command does not compile again.

`--config=NAME[:ARG]` names a packaged config (longvila_jax/configs/): the models tiny, demo,
qwen2_1_5b, qwen2_7b (`:1m`), llama3_8b, and the stages stages/align, stages/pretrain,
stages/sft, stages/context, stages/long_sft, stages/cot_sft, stages/grpo, stages/pipeline,
which take the model (`stages/sft:tiny`; qwen2_7b if none); `--config=FILE.py[:ARG]` is a
config file of your own.
Flags may be spelt with '-' or '_' (`--num-frames`, `--num_frames`). Inference runs on every
device, the sequence sharded over `--mesh=NODE,LOCAL` (default 1,<all devices>).
Multi-host: `--coordinator=HOST:PORT --num_processes=N --process_id=I` on every command, or
nothing under SLURM / Open MPI / a Kubernetes indexed Job (see `launch/`).
Bad input ends with one line on stderr naming the file/key/value and exit status 2; a
training run stopped on non-finite numbers ends with one line naming the step, the values
and the last good checkpoint, and exit status 3.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags


class _ConfigFile(flags.ArgumentParser):
    """`--config=NAME[:ARG]` or `--config=FILE.py[:ARG]` by `configs.load_file`, its errors one
    line (config_flags' parser defers a missing file's error to first use and wraps
    `get_config`'s in a traceback). It also checks that the `--config.KEY=VALUE` overrides
    name keys of the config: config_flags applies them right after this, and fails on an
    unknown one with a bare AttributeError."""

    def parse(self, argument):
        from longvila_jax.config import ConfigError, check_keys
        from longvila_jax.configs import load_file

        try:
            config = load_file(argument)
            check_keys(config, _override_keys())
        except ConfigError as e:  # absl would prefix a ValueError with "flag --config=ARG"
            raise flags.IllegalFlagValueError(str(e)) from None
        return config

    def flag_type(self):
        return "config object"


def _override_keys() -> list[str]:
    """The KEYs of the `--config.KEY[=VALUE]` arguments, read where config_flags reads them:
    `sys.argv`, flag files expanded."""
    argv = flags.FLAGS.read_flags_from_files(sys.argv, force_gnu=False)
    return [m[2] for m in (re.match(r"--?(no)?config\.([^=]+)", a) for a in argv) if m]


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config: a packaged one by name (tiny, qwen2_7b:1m, stages/sft:MODEL, "
    "stages/pipeline:MODEL, ...) or a file of your own, FILE.py[:ARG].", lock_config=False)
flags.FLAGS[_CONFIG.name].parser = _ConfigFile()
_VISION = flags.DEFINE_string("vision", None, "import-hf: SigLIP folder to assemble with SRC.")
_PROJECTOR = flags.DEFINE_string("projector", None, "import-hf: projector type with --vision.")
_MEDIA = flags.DEFINE_integer("media_token_id", None, "import-hf: override the media token id.")
_NEWLINE = flags.DEFINE_integer("newline_token_id", None, "import-hf: override the newline id.")
_FORMAT = flags.DEFINE_enum("format", "longvila", ["longvila", "llava"], "export-hf: layout.")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "export-hf: safetensors shard size (GB).")
_QUIET = flags.DEFINE_bool("quiet", False, "Hide progress bars.")
_RL = flags.DEFINE_bool("rl", False, "demo: then LongVILA-R1's CoT SFT and GRPO stages, "
                        "with eval-mcq before and after.")
_WORKDIR = flags.DEFINE_string("workdir", None, "train/pipeline/demo: folder for everything a "
                               "run writes (checkpoints, TensorBoard, final model).")
# Inference and evaluation.
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "generate/eval: model checkpoint folder.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "generate/eval: tokenizer.json (default: "
                                 "the checkpoint's, else the one it was trained with).")
_VIDEO = flags.DEFINE_string("video", None, "generate: the video (or image) to ask about.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "generate: a question; repeat for a batch.")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 8, "generate/eval-mcq: frames sampled.")
_FPS = flags.DEFINE_float("fps", None, "generate/eval-mcq: sample at this rate (at most "
                          "--num-frames frames).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "generate/eval-mcq: answer length cap.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "generate: 0 is greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "generate: nucleus sampling mass.")
_STOP = flags.DEFINE_multi_string("stop", [], "generate: stop string; repeatable.")
_SEED = flags.DEFINE_integer("seed", 0, "generate: sampling seed.")
_MESH = flags.DEFINE_string("mesh", None, "generate/eval: NODE,LOCAL sequence-parallel mesh.")
_ATTENTION = flags.DEFINE_string("attention", "auto", "generate/eval: auto|ring|ulysses|2d.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "generate/eval-mcq: keep video "
                                 "embeddings here across runs.")
_OUT = flags.DEFINE_string("out", None, "eval: folder for the results JSON (and heatmap).")
_HAYSTACK = flags.DEFINE_string("haystack", None, "eval-needle: haystack video (default: a "
                                "synthetic one written to --out).")
_NEEDLES = flags.DEFINE_string("needles", None, "eval-needle: JSONL of {image|video, question, "
                               "answer[, num_frames]} (default: synthetic needles).")
_NUM_NEEDLES = flags.DEFINE_integer("num_needles", 10, "eval-needle: synthetic needles.")
_FRAME_COUNTS = flags.DEFINE_list("frame_counts", ["32", "64"], "eval-needle: frame counts.")
_DEPTHS = flags.DEFINE_list("depths", ["0", "0.2", "0.4", "0.6", "0.8", "1"],
                            "eval-needle: needle depths in [0, 1].")
_GENERATE = flags.DEFINE_bool("generate", False, "eval-needle: also score free generation.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "eval-needle: needles per forward pass.")
_QUESTIONS = flags.DEFINE_string("questions", None, "eval-mcq: questions JSONL.")
_SUBTITLES = flags.DEFINE_bool("subtitles", False, "eval-mcq: prefix each video's subtitles.")
_LIMIT = flags.DEFINE_integer("limit", None, "eval-mcq: only the first N questions.")
_STYLE = flags.DEFINE_enum("style", "videomme", ["videomme", "r1"], "eval-mcq: VideoMME's "
                           "prompt and letter, or LongVILA-R1's <think>/<answer> format.")
# Serving.
_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve: address to bind (localhost only by "
                            "default; 0.0.0.0 for every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "serve: TCP port.")
_MEDIA_ROOT = flags.DEFINE_string("media_root", None, "serve: the folder video URLs may name "
                                  "(none: text only).")
_API_KEY = flags.DEFINE_string("api_key", None, "serve: require `Authorization: Bearer KEY` "
                               "(default: the LONGVILA_API_KEY environment variable, if set).")
_REMOTE = flags.DEFINE_bool("allow_remote_media", False, "serve: also fetch http(s) video URLs.")
_MODEL_NAME = flags.DEFINE_string("served_model_name", None, "serve: the model's name in the "
                                  "API (default: the checkpoint folder's name).")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 256, "serve: most frames a request may ask.")
_MAX_VIDEO_MB = flags.DEFINE_integer("max_video_mb", 2048, "serve: largest video file (MB).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "serve: most answers decoded together.")
_MAX_BATCH_TOKENS = flags.DEFINE_integer("max_batch_tokens", 1 << 18, "serve: most prompt "
                                         "positions prefilled together (a 7B model's 256-"
                                         "frame prompt is 50K).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "JAX's persistent compilation cache folder (default: "
    "$XDG_CACHE_HOME or ~/.cache, then longvila-jax/xla); empty to turn it off.")
# Multi-host (see longvila_jax/distributed.py; SLURM / Open MPI / Kubernetes are detected).
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0's "
                                   "jax.distributed coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DIST_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for the "
                                     "coordinator and every process to join.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds after which a silent "
                                  "process counts as dead and the others stop.")

# Each command: its arguments, what it does (one line), and the flags it reads.
_INFER = ["checkpoint", "tokenizer", "mesh", "attention", "quiet"]
_MULTI_HOST = ["coordinator", "num_processes", "process_id", "distributed_timeout",
               "heartbeat_timeout"]
COMMANDS = {
    "import-hf": ("SRC DST", "convert a Hugging Face / VILA checkpoint into ours",
                  ["vision", "projector", "media_token_id", "newline_token_id", "quiet"]),
    "export-hf": ("CKPT OUT", "write a checkpoint in the Hugging Face / VILA layout",
                  ["format", "max_shard_gb", "quiet"]),
    "init": ("DST", "write a randomly initialised checkpoint of a config", ["config"]),
    "show-config": ("", "print a config, overrides applied", ["config"]),
    "train": ("", "run (or resume) one training stage", ["config", "workdir", "quiet",
                                                        *_MULTI_HOST]),
    "pipeline": ("", "run the stages of a pipeline config in order",
                 ["config", "workdir", "quiet", *_MULTI_HOST]),
    "demo": ("", "the whole recipe in miniature on synthetic videos, then V-NIAH",
             ["workdir", "rl", "quiet"]),
    "generate": ("", "answer prompts about a video", [
        *_INFER, "video", "prompt", "num_frames", "fps", "max_new_tokens", "temperature",
        "top_p", "stop", "seed", "cache_dir"]),
    "eval-needle": ("", "video needle-in-a-haystack grid and heatmap", [
        *_INFER, "out", "haystack", "needles", "num_needles", "frame_counts", "depths",
        "generate", "batch_size"]),
    "eval-mcq": ("", "multiple-choice video QA accuracy (VideoMME-style or R1)", [
        *_INFER, "questions", "out", "style", "subtitles", "num_frames", "fps",
        "max_new_tokens", "limit", "cache_dir"]),
    "serve": ("", "OpenAI-compatible chat server (video parts, streaming, batching)", [
        *_INFER, "host", "port", "media_root", "api_key", "allow_remote_media",
        "served_model_name", "num_frames", "max_frames", "max_video_mb", "max_new_tokens",
        "max_batch", "max_batch_tokens", "cache_dir"]),
}
COMMON = ["compilation_cache"]
USAGE = ("usage: longvila-jax COMMAND [ARGS] [--flags]; commands: " + ", ".join(COMMANDS)
         + "; longvila-jax --help lists them, longvila-jax COMMAND --help shows its flags")


def help_text(command: str | None = None) -> str:
    """The commands with one line each, or one command's usage and its flags with their
    help (not absl's dump of every flag of every library)."""
    if command is None:
        width = max(map(len, COMMANDS))
        lines = ["usage: longvila-jax COMMAND [ARGS] [--flags]", "", "commands:"]
        lines += [f"  {name:<{width}}  {summary}" for name, (_, summary, _) in COMMANDS.items()]
        lines += ["", "longvila-jax COMMAND --help shows a command's flags; --helpfull shows "
                  "every flag."]
        return "\n".join(lines)
    arguments, summary, names = COMMANDS[command]
    lines = [f"usage: longvila-jax {command} {arguments} [--flags]".replace("  ", " "),
             "", summary, "", "flags:"]
    for name in [*names, *COMMON]:
        flag = flags.FLAGS[name]
        default = "" if flag.default in (None, False, [], "") else f" (default: {flag.default})"
        text = re.sub(r"^[a-z/-]+: ", "", flag.help)  # "generate/eval: ..." names the users
        lines.append(f"  --{name.replace('_', '-')}: {text}{default}")
    return "\n".join(lines)


def _nearest(command: str) -> str:
    import difflib

    close = difflib.get_close_matches(command, COMMANDS, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; commands: {', '.join(COMMANDS)}"


def _args(argv, names):
    if len(argv) != len(names):
        raise app.UsageError(f"expected {' '.join(names) or 'no arguments'}; got {argv!r}")
    return argv


def _need_config():
    if _CONFIG.value is None:
        raise app.UsageError("--config=NAME[:ARG] or --config=FILE.py[:ARG] is required for "
                             "this command")
    from longvila_jax.config import validate

    return validate(_CONFIG.value)


def _need_workdir() -> str:
    if not _WORKDIR.value:
        raise app.UsageError("--workdir=DIR is required for this command")
    return _WORKDIR.value


def _need(flag, usage: str):
    if not flag.value:
        raise app.UsageError(f"--{flag.name.replace('_', '-')}={usage} is required for this "
                             "command")
    return flag.value


def _mesh():
    """`--mesh`'s mesh, or None (every device, one group)."""
    if not _MESH.value:
        return None
    from longvila_jax.parallel.mesh import make_mesh

    try:
        node, local = (int(x) for x in _MESH.value.split(","))
    except ValueError:
        raise ValueError(f"--mesh: expected NODE,LOCAL (two integers), got "
                         f"{_MESH.value!r}") from None
    import jax

    return make_mesh(1, node, local, jax.devices()[: node * local])


def _generator():
    """A `Generator` for `--checkpoint` on `--mesh`."""
    from longvila_jax.infer.generate import Generator

    return Generator.from_checkpoint(_need(_CHECKPOINT, "DIR"), tokenizer=_TOKENIZER.value,
                                     mesh=_mesh(), scheme=_ATTENTION.value,
                                     cache_dir=_CACHE_DIR.value)


def _numbers(flag, kind):
    try:
        return [kind(x) for x in flag.value]
    except ValueError:
        raise ValueError(f"--{flag.name.replace('_', '-')}: expected comma-separated "
                         f"{kind.__name__}s, got {','.join(flag.value)!r}") from None


def _eval_needle(progress: bool):
    from longvila_jax.data.synthetic import write_haystack_video
    from longvila_jax.eval.needle import evaluate, load_needles, make_needles

    out = Path(_need(_OUT, "DIR"))
    frame_counts, depths = _numbers(_FRAME_COUNTS, int), _numbers(_DEPTHS, float)
    generator = _generator()
    size = generator.model.vision_tower.image_size
    haystack = _HAYSTACK.value
    if haystack is None:
        haystack = out / "haystack.mp4"
        if not haystack.exists():
            write_haystack_video(haystack, num_frames=max(frame_counts), width=size,
                                 height=size, seed=1)
    needles = (load_needles(_NEEDLES.value) if _NEEDLES.value
               else make_needles(_NUM_NEEDLES.value, size, size, seed=1_000_003))
    result = evaluate(generator.model, generator.tokenizer_path, family=generator.family,
                      haystack=haystack, frame_counts=frame_counts, depths=depths,
                      needles=needles, image_size=size, out_dir=out,
                      batch_size=_BATCH.value, progress=progress, engine=generator.engine,
                      generate=_GENERATE.value)
    for name in ("accuracy", "generation_accuracy"):
        if name in result:
            print(f"{name} by frames: " + ", ".join(
                f"{f}: {np.mean(row):.0%}" for f, row in zip(frame_counts, result[name],
                                                            strict=True)))
    print(f"heatmap: {out / 'needle_heatmap.png'}  results: {out / 'needle.json'}")


def _eval_mcq(progress: bool):
    from longvila_jax.eval.mcq import evaluate_mcq, format_table

    questions, out = _need(_QUESTIONS, "JSONL"), _need(_OUT, "DIR")
    generator = _generator()

    def answer(video, prompts):
        return generator.generate(prompts, video=video, num_frames=_NUM_FRAMES.value,
                                  fps=_FPS.value, max_new_tokens=_MAX_NEW.value)

    result = evaluate_mcq(questions, answer, out, subtitles=_SUBTITLES.value,
                          progress=progress, limit=_LIMIT.value, style=_STYLE.value)
    print(format_table(result))
    print(f"results: {Path(out) / 'mcq.json'}")


# Commands that only read and write files on the host: in a multi-process job, process 0 runs
# them and the others stop (they would race to create the same output).
HOST_ONLY = ("import-hf", "export-hf", "init", "show-config")


def _serve():
    import os

    from longvila_jax.serve.app import Settings, serve

    checkpoint = Path(_need(_CHECKPOINT, "DIR"))
    settings = Settings(
        model_name=_MODEL_NAME.value or checkpoint.absolute().name,
        api_key=_API_KEY.value or os.environ.get("LONGVILA_API_KEY") or None,
        media_root=_MEDIA_ROOT.value, allow_remote_media=_REMOTE.value,
        download_dir=str(Path(_cache_root(), "downloads")), num_frames=_NUM_FRAMES.value,
        max_frames=_MAX_FRAMES.value, max_video_bytes=_MAX_VIDEO_MB.value << 20,
        max_tokens=_MAX_NEW.value, max_rows=_MAX_BATCH.value,
        max_batch_tokens=_MAX_BATCH_TOKENS.value)
    serve(checkpoint, settings, host=_HOST.value, port=_PORT.value, tokenizer=_TOKENIZER.value,
          mesh=_mesh(), cache_dir=_CACHE_DIR.value)


def _cache_root() -> Path:
    """The user's cache folder for this project (XDG's rule)."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "longvila-jax")


def _compilation_cache() -> None:
    """JAX's persistent compilation cache on, in `--compilation-cache` (default: the user's
    cache folder), so that a second `demo`, `generate` or `serve` loads its programs
    instead of compiling them again; empty turns it off."""
    folder = _COMPILATION_CACHE.value
    if folder is None:
        folder = str(_cache_root() / "xla")
    if not folder:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    # Every program: the tiny ones too add up to seconds at start-up on a CPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _dispatch(command: str, argv: list[str], primary: bool = True):
    progress = not _QUIET.value
    if command not in COMMANDS:
        raise app.UsageError(f"unknown command {command!r}{_nearest(command)}")
    if command in HOST_ONLY and not primary:
        return
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

        from longvila_jax.checkpoint import build_model, model_params, save_checkpoint

        (dst,) = _args(argv, ["DST"])
        config = _need_config()
        params = {k: np.asarray(v) for k, v in model_params(build_model(config)).items()}
        print(f"wrote {save_checkpoint(dst, config, params)}")
    elif command == "show-config":
        _args(argv, [])
        print(_need_config())
    elif command == "train":
        from longvila_jax.recipe import run_stage

        _args(argv, [])
        final = run_stage(_need_config(), _need_workdir(), progress=progress)
        print(f"final checkpoint: {final}")
    elif command == "pipeline":
        from longvila_jax.recipe import run_stages

        _args(argv, [])
        if _CONFIG.value is None:
            raise app.UsageError("--config=stages/pipeline[:MODEL] is required")
        final = run_stages(_CONFIG.value, _need_workdir(), progress=progress)
        print(f"final checkpoint: {final}")
    elif command == "demo":
        from longvila_jax.demo import run_demo

        _args(argv, [])
        workdir = Path(_WORKDIR.value or "demo").absolute()
        final, result, r1 = run_demo(workdir, progress=progress, rl=_RL.value)
        out = workdir / "eval"
        print(f"checkpoints: {final.parent.parent} (final model: {final})")
        print("needle accuracy by frames: " + ", ".join(
            f"{f}: {sum(row) / len(row):.0%}" for f, row in zip(
                result["frame_counts"], result["accuracy"], strict=True)))
        print(f"heatmap: {out / 'needle_heatmap.png'}  results: {out / 'needle.json'}")
        if r1 is not None:
            print(f"R1 (CoT SFT, then GRPO), held-out {r1['questions']} questions at "
                  f"{r1['frames']} frames: accuracy {r1['accuracy_before']:.0%} -> "
                  f"{r1['accuracy_after']:.0%}; reward curve: {r1['rewards_png']}; "
                  f"summary: {workdir / 'r1.json'}")
    elif command == "generate":
        _args(argv, [])
        prompts = _PROMPT.value or []
        if not prompts:
            raise app.UsageError('--prompt="..." is required for this command')
        answers = _generator().generate(
            prompts, video=_VIDEO.value, num_frames=_NUM_FRAMES.value, fps=_FPS.value,
            max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
            stop=_STOP.value, seed=_SEED.value)
        print("\n".join(answers))
    elif command == "eval-needle":
        _args(argv, [])
        _eval_needle(progress)
    elif command == "eval-mcq":
        _args(argv, [])
        _eval_mcq(progress)
    elif command == "serve":
        _serve()


def main(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it closes at INFO
    if len(argv) < 2:
        _fail(USAGE)
    from longvila_jax.config import ConfigError
    from longvila_jax.data.pipeline import DataError
    from longvila_jax.data.video import MediaError
    from longvila_jax.distributed import DistributedError, initialize
    from longvila_jax.interop.safetensors_io import CheckpointError
    from longvila_jax.train.loop import Diverged, Interrupted

    try:
        _compilation_cache()
        primary = True
        if initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                      timeout_s=_DIST_TIMEOUT.value, heartbeat_s=_HEARTBEAT.value):
            import jax

            primary = jax.process_index() == 0
            if not primary:  # one process logs; the others only fail loudly
                logging.set_verbosity(logging.ERROR)
        _dispatch(argv[1], argv[2:], primary)
    except (CheckpointError, ConfigError, DataError, DistributedError, FileExistsError,
            FileNotFoundError, MediaError, ValueError, app.UsageError) as e:
        _fail(e)
    except Diverged as e:
        _fail(e, status=DIVERGED)
    except Interrupted as e:
        _fail(e, status=INTERRUPTED)
    except KeyboardInterrupt:
        _fail("interrupted", status=INTERRUPTED)


# Exit status of a training run stopped on non-finite numbers (2 is bad input), and of a
# command stopped by Ctrl-C (the shell's 128 + SIGINT).
DIVERGED = 3
INTERRUPTED = 130


def _fail(error: Exception | str, status: int = 2) -> NoReturn:
    print(f"longvila-jax: error: {error}", file=sys.stderr)
    sys.exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, a bad flag (`--config` file, key or value included) reported like
    every other user error: one line, exit status 2 (absl: a two-line FATAL, status 1)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(e)


def _underscored(argv: list[str]) -> list[str]:
    """`--num-frames=8` -> `--num_frames=8`: absl flags are defined with underscores."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def _help(argv: list[str]) -> None:
    """`--help`/`-h` anywhere: the command list, or the named command's flags; exit 0."""
    if not any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        return
    command = argv[1] if not argv[1].startswith("-") else None  # the command comes first
    if command is not None and command not in COMMANDS:
        _fail(f"unknown command {command!r}{_nearest(command)}")
    print(help_text(command))
    sys.exit(0)


def run():
    """Console-script entry point."""
    argv = _underscored(sys.argv)
    _help(argv)
    app.run(main, argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
