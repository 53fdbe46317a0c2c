"""One training run (one LongVILA stage) from a config: `train(config, workdir)`.

`workdir` holds everything the run writes: `checkpoints/` (run checkpoints: parameters,
optimizer, step and data position, for resuming), `tensorboard/` (event files) and, when
the run finishes, `final/` (a model checkpoint the next stage or `export-hf` starts from).
A run whose `final/` exists is finished; a run with run checkpoints resumes from the
latest one, exactly where it stopped (same parameters and the same next batch).

Every step goes through the MM-SP loss on the config's mesh, also on one device (a 1x1x1
mesh), so there is one code path; parameters and optimizer state are FSDP-sharded over
the whole mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from longvila_jax.atomic import atomic_file, remove_temporaries
from longvila_jax.checkpoint import build_model, load_model, model_params, save_checkpoint
from longvila_jax.config import ConfigError, mesh_from_config, validate
from longvila_jax.data import pipeline
from longvila_jax.data.batch import Batch
from longvila_jax.data.text_sources import TextJsonlSource
from longvila_jax.data.tokenizer import load_tokenizer, token_id
from longvila_jax.models.longvila import LongVILA
from longvila_jax.parallel import fsdp, resolve_scheme
from longvila_jax.parallel.layout import SPEC, Layout
from longvila_jax.parallel.mmsp import loss_fn
from longvila_jax.train import flops
from longvila_jax.train.optimizer import schedule
from longvila_jax.train.run_checkpoint import RunCheckpoints
from longvila_jax.train.step import (
    make_optimizer_state,
    make_train_step,
    state_is_finite,
    trainable_filter,
)

# The token that separates long-text documents, per chat family.
END_OF_TEXT = {"qwen2": "<|endoftext|>", "llama": "<|end_of_text|>"}


@dataclasses.dataclass
class Run:
    """Everything one run holds between steps (for the loop, tests and benchmarks)."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    layout: Layout  # how a batch lies on `mesh`
    model: LongVILA
    optimizer: nnx.Optimizer
    # `step(model, optimizer, batch) -> metrics`, updating both (`train.step`).
    step_fn: Callable[[LongVILA, nnx.Optimizer, Batch], dict]
    trainable: Callable[[tuple, object], bool]  # the nnx filter of `train.trainable`
    # (first, count): the data groups (rows of the mesh's `data` axis) whose devices this
    # process holds; it reads and decodes exactly their rows.
    data_groups: tuple[int, int] = (0, 1)


def tokenizer_path(config) -> str:
    path = Path(config.data.tokenizer)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: {config.data.tokenizer!r} is not a tokenizer.json "
                          "or a folder holding one")
    return str(path)


def _sources(config) -> list[pipeline.Source]:
    """The config's data sources, each JSONL (and a conversation source's media root) checked
    to exist: a missing media root would otherwise show only as every sample skipped."""
    if not config.data.sources:
        raise ConfigError("data.sources: empty (a run needs at least one data source)")
    sources = []
    for i, s in enumerate(config.data.sources):
        if not Path(s["jsonl"]).is_file():
            raise ConfigError(f"data.sources[{i}].jsonl: {s['jsonl']!r} does not exist")
        root = s.get("media_root", "")
        if config.data.kind == "conversations" and root and not Path(root).is_dir():
            raise ConfigError(f"data.sources[{i}].media_root: {root!r} is not a folder")
        sources.append(pipeline.Source(name=s["name"], jsonl=s["jsonl"], media_root=root,
                                       weight=float(s.get("weight", 1.0))))
    return sources


def process_data_groups(mesh) -> tuple[int, int]:
    """`(first, count)` of the `data`-axis indices whose devices this process holds.

    Processes that hold parts of one data group (a sequence split over hosts by `node`)
    read the same rows; processes holding several groups read all of theirs.
    """
    mine = sorted({index[0] for index, device in np.ndenumerate(mesh.devices)
                   if device.process_index == jax.process_index()})
    if mine != list(range(mine[0], mine[0] + len(mine))) or mesh.devices.shape[0] % len(mine):
        raise ConfigError(f"parallel.data: this process holds data groups {mine} of "
                          f"{mesh.devices.shape[0]}; they must be an even, contiguous share")
    return mine[0], len(mine)


def make_data(config, tokens_per_frame: int, data_groups: tuple[int, int] | None = None,
              saved: list[dict] | None = None):
    """This process's iterator of packed batches for the config's `data` and `train`: the
    rows of `data_groups` (`process_data_groups`; default: every group), continuing from
    a run checkpoint's `saved` data states (`RunCheckpoints.data_states`) when given."""
    train, data = config.train, config.data
    multiple = 2 * config.parallel.node * config.parallel.local
    first, count = data_groups or (0, config.parallel.data)
    rows = train.batch_size // config.parallel.data * count
    shard = (first // count, config.parallel.data // count)
    tokenizer = tokenizer_path(config)
    if data.kind == "text":
        tok = load_tokenizer(tokenizer)
        source = TextJsonlSource(_sources(config)[0].jsonl, tok, train.seq_len,
                                 token_id(tok, END_OF_TEXT[config.model.llm.family]))
        return iter(pipeline.build_text(source, batch_size=rows, seed=config.seed,
                                        shard=shard, saved=saved))
    spec = pipeline.SampleSpec(family=config.model.llm.family,
                               media_token_id=config.model.media.media_token_id,
                               tokens_per_frame=tokens_per_frame,
                               num_frames=train.num_frames,
                               image_size=config.model.vision.image_size,
                               fps=train.fps or None)
    return iter(pipeline.build(_sources(config), spec, tokenizer, tokens=train.seq_len,
                               frames=train.max_frames, batch_size=rows,
                               pad_multiple=multiple, seed=config.seed,
                               workers=data.workers, shard=shard, saved=saved))


def to_model_batch(run: Run, packed: dict) -> Batch:
    """This process's rows of a packed batch -> the `Batch` on the mesh, laid out
    (`Layout.lay_out`) and assembled into global arrays from every process's rows, those of
    the data groups its devices hold (`process_data_groups`)."""
    batch = run.layout.lay_out(Batch(*(packed.get(name) for name in BATCH_FIELDS)))
    sharding = NamedSharding(run.mesh, SPEC)
    share = run.layout.data // run.data_groups[1]
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(
        sharding, v, (v.shape[0] * share, *v.shape[1:])), batch)


BATCH_FIELDS = tuple(field.name for field in dataclasses.fields(Batch))


def _tokens_per_frame(model) -> int:
    return model.media_tokens_per_frame if model.vision_tower is not None else 1


def setup(config) -> Run:
    """Mesh, model (from `train.init_from` or random), optimizer for the trainable
    parameters, all placed with FSDP shardings, and the jitted step.

    The files the config names (tokenizer, data sources, `train.init_from`) are checked
    first: a missing one fails in a second, not after a 7B model has filled the devices. A
    config naming no data at all (a benchmark's synthetic batches) has none to check.
    """
    config = validate(config)
    if config.data.tokenizer or config.data.sources:
        tokenizer_path(config)
        if config.train.objective == "next_token":  # GRPO reads `rl.questions` instead
            _sources(config)
    init = config.train.init_from
    if init and not Path(init).is_dir():
        raise ConfigError(f"train.init_from: {init!r} is not a checkpoint folder")
    p = config.parallel
    if config.train.batch_size % p.data:
        raise ConfigError(f"train.batch_size: {config.train.batch_size} is not a multiple of "
                          f"parallel.data={p.data}")
    mesh = mesh_from_config(config)
    llm = config.model.llm
    layout = Layout(resolve_scheme(p.attention, p.node, p.local,
                                   (llm.num_heads, llm.num_kv_heads)), p.data, p.node, p.local)
    data_groups = process_data_groups(mesh)
    model = load_model(init, config) if init else build_model(config)
    trainable = trainable_filter(config.train.trainable)
    if not nnx.to_flat_state(nnx.state(model, trainable)):
        raise ConfigError(f"train.trainable: {config.train.trainable!r} matches no parameter")
    optimizer = make_optimizer_state(model, config.optim, trainable)
    fsdp.place(model, optimizer, mesh)
    step_fn = make_train_step(loss_fn(mesh, layout.scheme), trainable)
    return Run(config, mesh, layout, model, optimizer, step_fn, trainable, data_groups)


def run_state(run: Run) -> dict:
    return {"params": nnx.to_pure_dict(nnx.state(run.model, nnx.Param)),
            "optimizer": nnx.to_pure_dict(nnx.state(run.optimizer))}


def restore_run(run: Run, checkpoints: RunCheckpoints) -> int:
    """Parameters and optimizer state from the latest run checkpoint; its step (0: none)."""
    step = checkpoints.latest_step()
    if step is None:
        return 0
    state = run_state(run)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored = checkpoints.restore(step, abstract)
    for target, key in ((run.model, "params"), (run.optimizer, "optimizer")):
        current = nnx.state(target, nnx.Param) if key == "params" else nnx.state(target)
        nnx.replace_by_pure_dict(current, restored[key])
        nnx.update(target, current)
    return step


def _metrics(run: Run, out: dict, packed: dict, seconds: float, data) -> dict:
    cfg = run.config
    frames = int((packed["frame_segment_ids"] > 0).sum()) if "frame_segment_ids" in packed \
        else 0
    # This process's rows are `count` of the `data` groups; the step ran all of them.
    share = cfg.parallel.data // run.data_groups[1]
    tokens = int((packed["segment_ids"] > 0).sum()) * share
    model_flops = flops.train_step_flops(cfg.model, packed["segment_ids"], frames) * share
    peak = flops.peak_tflops(jax.devices()[0].device_kind, cfg.train.peak_tflops)
    metrics = {"loss": float(out["loss"]), "grad_norm": float(out["grad_norm"]),
               "tokens_per_s": tokens / seconds, "step_s": seconds}
    if peak:
        metrics["mfu"] = model_flops / seconds / (peak * 1e12 * run.mesh.devices.size)
    if cfg.data.kind == "conversations":
        metrics.update(data.skip_counts())
    return metrics


class Diverged(RuntimeError):
    """A step's numbers were not finite; the message names the step, the values and the
    last good run checkpoint."""


class Interrupted(Exception):
    """Ctrl-C during a run; the message names the checkpoint a rerun resumes from."""


def say(message: str) -> None:
    """One line to the user on stderr, from process 0 only, between progress-bar redraws."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stderr)


def finished(workdir: Path) -> bool:
    """Whether the run in `workdir` has finished (its `final/` exists); says so."""
    final = workdir / "final"
    if final.is_dir():
        say(f"{workdir.name}: already finished ({final}), skipped")
    return final.is_dir()


def resumed(start: int, checkpoints: RunCheckpoints) -> None:
    """Says where a run starts."""
    if start:
        say(f"resuming from step {start} (checkpoint {checkpoints.directory / str(start)})")


def tensorboard_note(logs: Path) -> None:
    """Says where a run's TensorBoard events go and how to look at them."""
    say(f"TensorBoard logs: {logs} (view: tensorboard --logdir {logs})")


def interrupted(checkpoints: RunCheckpoints) -> Interrupted:
    """The `Interrupted` to raise on Ctrl-C, once the checkpoints being written are done."""
    checkpoints.wait()
    last = checkpoints.latest_step()
    where = f"from {checkpoints.directory / str(last)}" if last else "from the start (no " \
        "checkpoint yet)"
    return Interrupted(f"interrupted; running the same command again resumes {where}")


@contextlib.contextmanager
def stop_on_ctrl_c() -> Iterator[Callable[[], bool]]:
    """Within the block, Ctrl-C asks the run to stop at the next step boundary (the yielded
    function says whether it was asked), where it saves a checkpoint and raises; a second
    Ctrl-C interrupts at once. A KeyboardInterrupt at an arbitrary point could land inside
    an asynchronous checkpoint save and leave its writer thread behind. Where SIGINT is not
    Python's (ignored, as in a background job, or taken by the caller) nothing changes."""
    asked = []
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return

    def ask(_signum, _frame):
        asked.append(True)
        say("stopping after this step (Ctrl-C again to stop at once)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, ask)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def train(config, workdir, *, progress: bool = True) -> Path:
    """Run (or resume, or skip if finished) one training run; returns its final checkpoint.

    Raises `Diverged` when a step's loss, gradient norm or new state is not finite (with
    `train.nonfinite='skip'`: after `train.nonfinite_limit` such steps in a row); nothing
    non-finite is ever written.
    """
    workdir = Path(workdir).absolute()
    final = workdir / "final"
    if finished(workdir):
        return final
    # A run reads data: a config naming none fails here, before the model fills the devices
    # (`setup` checks only the data a config names, so that benchmarks run without any).
    tokenizer_path(config)
    _sources(config)
    if jax.process_index() == 0:
        remove_temporaries(workdir)
    run = setup(config)
    config = run.config
    with RunCheckpoints(workdir / "checkpoints", keep=config.train.keep,
                        every=config.train.checkpoint_every) as checkpoints:
        start = restore_run(run, checkpoints)
        saved = checkpoints.data_states(start) if start else None
        data = make_data(config, _tokens_per_frame(run.model), run.data_groups, saved)
        resumed(start, checkpoints)
        with _Reporter(run, workdir, start, progress) as reporter, \
                stop_on_ctrl_c() as stop_asked:
            try:
                _loop(run, data, checkpoints, start, reporter, stop_asked)
            except KeyboardInterrupt:
                raise interrupted(checkpoints) from None
            except _NonFinite as e:
                checkpoints.wait()
                good = checkpoints.latest_step()
                where = checkpoints.directory / str(good) if good else "none"
                raise Diverged(f"{e}; last good checkpoint: {where}") from None
    return write_final(run, final)


class _NonFinite(Exception):
    pass


def _loop(run: Run, data, checkpoints: RunCheckpoints, start: int, reporter,
          stop_asked: Callable[[], bool]) -> None:
    """Steps from `start` to `optim.total_steps`. A step's metrics are read after the next
    step is dispatched, so the host decodes the next batch while the device computes
    instead of waiting for each step to finish; before a checkpoint (the last step always
    saves) the step being saved is read too and the state checked finite, so no save holds
    a step not yet checked."""
    total = run.config.optim.total_steps
    pending = None
    for step in range(start, total):
        packed = next(data)
        out = run.step_fn(run.model, run.optimizer, to_model_batch(run, packed))
        if pending is not None:
            reporter.report(*pending, data)
        pending = (step, out, packed)
        stopping = stop_asked()
        if step + 1 == total or checkpoints.should_save(step + 1) or stopping:
            reporter.report(*pending, data)
            pending = None
            state = run_state(run)
            if not state_is_finite(state):
                raise _NonFinite(f"step {step + 1}: the parameters or optimizer state are not "
                                 "finite although every step's loss and gradient norm were "
                                 "(an update overflowed; learning rate too high?)")
            checkpoints.save(step + 1, state, data, force=True)
            reporter.flush()
        if stopping:
            raise KeyboardInterrupt


class _Reporter:
    """Logs each finished step (progress bar, TensorBoard from process 0, the sample log)
    and applies `train.nonfinite`.

    TensorBoard's events past the step a run resumes from are purged, so a killed run's
    unsaved steps do not show twice; events are flushed whenever a checkpoint is saved, so
    a kill loses none that a resume will not write again.
    """

    def __init__(self, run: Run, workdir: Path, start: int, progress: bool):
        self._run = run
        config = run.config
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            logs = workdir / "tensorboard"
            self._writer = SummaryWriter(str(logs), purge_step=start + 1 if start else None)
            tensorboard_note(logs)
        self._samples = (_SampleLog(workdir, start, config, run.data_groups)
                         if config.train.log_samples else None)
        self._bar = tqdm.tqdm(total=config.optim.total_steps, initial=start,
                              desc=config.train.stage,
                              disable=not progress or self._writer is None)
        self._last = time.perf_counter()
        self._in_a_row = 0
        self._skipped = 0

    def report(self, step: int, out, packed: dict, data) -> None:
        """Log one finished step (its time runs from the previous step's end to its own);
        raise `_NonFinite` when the config says the run must stop."""
        out = jax.device_get(out)  # waits for this step
        now = time.perf_counter()
        self._check(step, out)
        config = self._run.config
        metrics = _metrics(self._run, out, packed, now - self._last, data)
        lr = schedule(config.optim)(step // config.optim.accumulation_steps)
        metrics.update(learning_rate=float(lr), nonfinite_skipped=self._skipped)
        if self._writer is not None and (step + 1) % config.train.log_every == 0:
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, step + 1)
        if self._samples is not None:
            self._samples.write(step + 1, packed["sample_ids"])
        self._bar.update()
        self._bar.set_postfix(_postfix(metrics), refresh=False)
        self._last = now

    def _check(self, step: int, out: dict) -> None:
        train = self._run.config.train
        values = f"loss {float(out['loss'])}, gradient norm {float(out['grad_norm'])}"
        if out["applied"]:
            self._in_a_row = 0
            return
        self._in_a_row += 1
        self._skipped += 1
        if train.nonfinite == "stop":
            raise _NonFinite(f"step {step + 1}: {values}, not finite; the update was not "
                             "applied (train.nonfinite='stop')")
        logging.warning("step %d: %s; update skipped (%d in a row)", step + 1, values,
                        self._in_a_row)
        if self._in_a_row >= train.nonfinite_limit:
            raise _NonFinite(f"step {step + 1}: {self._in_a_row} steps in a row not finite, "
                             f"the last with {values} (train.nonfinite_limit="
                             f"{train.nonfinite_limit})")

    def flush(self) -> None:
        for log in (self._writer, self._samples):
            if log is not None:
                log.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._bar.close()
        for log in (self._writer, self._samples):
            if log is not None:
                log.close()


class _SampleLog:
    """`<workdir>/samples/process_<i>-of-<n>.jsonl`: per step, the samples this process's
    rows consumed, as `[source name, stream position, record index, skipped]` (see
    `pipeline.ID_COLUMNS`), with the data shard that read them. Lines of steps past the
    one a run resumes from are dropped, as TensorBoard's are: each process drops its own
    file's, process 0 also those of files another process count wrote."""

    def __init__(self, workdir: Path, start: int, config, data_groups: tuple[int, int]):
        folder = workdir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        count = jax.process_count()
        path = folder / f"process_{jax.process_index()}-of-{count}.jsonl"
        others = [p for p in folder.glob("*.jsonl") if not p.name.endswith(f"-of-{count}.jsonl")]
        for stale in [path, *others] if jax.process_index() == 0 else [path]:
            if stale.exists():
                kept = [line for line in stale.read_text().splitlines(keepends=True)
                        if json.loads(line)["step"] <= start]
                with atomic_file(stale) as tmp:
                    tmp.write_text("".join(kept))
        self._file = open(path, "a")  # noqa: SIM115 (closed by close())
        first, groups = data_groups
        self._shard = [first // groups, config.parallel.data // groups]
        self._names = [s["name"] for s in config.data.sources]

    def write(self, step: int, sample_ids: list) -> None:
        columns = [pipeline.ID_COLUMNS.index(c) for c in ("position", "record", "skipped")]
        rows = [[[self._names[ids[0]], *(int(ids[c]) for c in columns)] for ids in row]
                for row in sample_ids]
        self._file.write(json.dumps({"step": step, "shard": self._shard, "rows": rows}) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _postfix(metrics: dict) -> dict:
    shown = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
    if "mfu" in metrics:
        shown["mfu"] = f"{100 * metrics['mfu']:.1f}%"
    if metrics["nonfinite_skipped"]:
        shown["skipped"] = metrics["nonfinite_skipped"]
    return shown


def write_final(run: Run, final: Path) -> Path:
    """The model checkpoint of a finished run, LoRA merged when `train.merge_lora`."""
    from longvila_jax.models.lora import merge_lora

    config = run.config.copy_and_resolve_references()
    model = run.model
    if config.model.lora.rank > 0 and config.train.merge_lora:
        model = merge_lora(model)
        config.model.lora.rank = 0
    # Every process takes part in the gathers (arrays span hosts); process 0 writes.
    params = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
              for k, v in model_params(model).items()}
    if jax.process_index() == 0:
        tokenizer = Path(tokenizer_path(config)).parent
        save_checkpoint(final, config, params, tokenizer_dir=tokenizer)
    return final
