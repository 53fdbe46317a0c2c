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

import dataclasses
import logging
import time
from pathlib import Path

import jax
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.config import ConfigError, validate
from longvila_jax.data import pipeline
from longvila_jax.data.text_sources import TextJsonlSource
from longvila_jax.data.tokenizer import load_tokenizer, token_id
from longvila_jax.models.longvila import build_model
from longvila_jax.parallel import fsdp, mesh_from_config, resolve_scheme
from longvila_jax.parallel.mmsp import SP_AXES, loss_fn, prepare_batch
from longvila_jax.train import flops
from longvila_jax.train.checkpoint import load_model, model_params, save_checkpoint
from longvila_jax.train.optimizer import schedule
from longvila_jax.train.run_checkpoint import RunCheckpoints
from longvila_jax.train.step import make_optimizer_state, make_train_step, trainable_filter

# The token that separates long-text documents, per chat family.
END_OF_TEXT = {"qwen2": "<|endoftext|>", "llama": "<|end_of_text|>"}


@dataclasses.dataclass
class Run:
    """Everything one run holds between steps (for the loop, tests and benchmarks)."""

    config: object
    mesh: object
    scheme: str
    model: object
    optimizer: object
    step_fn: object
    trainable: object
    # (first, count): the data groups (rows of the mesh's `data` axis) whose devices this
    # process holds; it reads and decodes exactly their rows.
    data_groups: tuple[int, int] = (0, 1)


def _tokenizer_path(config) -> str:
    path = Path(config.data.tokenizer)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: {config.data.tokenizer!r} is not a tokenizer.json "
                          "or a folder holding one")
    return str(path)


def _sources(config) -> list[pipeline.Source]:
    if not config.data.sources:
        raise ConfigError("data.sources: empty (a run needs at least one data source)")
    sources = []
    for i, s in enumerate(config.data.sources):
        if not Path(s["jsonl"]).is_file():
            raise ConfigError(f"data.sources[{i}].jsonl: {s['jsonl']!r} does not exist")
        sources.append(pipeline.Source(name=s["name"], jsonl=s["jsonl"],
                                       media_root=s.get("media_root", ""),
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


def make_data(config, tokens_per_frame: int, data_groups: tuple[int, int] | None = None):
    """This process's iterator of packed batches for the config's `data` and `train`: the
    rows of `data_groups` (`process_data_groups`; default: every group)."""
    train, data = config.train, config.data
    multiple = 2 * config.parallel.node * config.parallel.local
    first, count = data_groups or (0, config.parallel.data)
    rows = train.batch_size // config.parallel.data * count
    shard = (first // count, config.parallel.data // count)
    tokenizer = _tokenizer_path(config)
    if data.kind == "text":
        tok = load_tokenizer(tokenizer)
        source = TextJsonlSource(_sources(config)[0].jsonl, tok, train.seq_len,
                                 token_id(tok, END_OF_TEXT[config.model.llm.family]))
        return iter(pipeline.build_text(source, batch_size=rows, seed=config.seed,
                                        shard=shard))
    spec = pipeline.SampleSpec(family=config.model.llm.family,
                               media_token_id=config.model.media.media_token_id,
                               tokens_per_frame=tokens_per_frame,
                               num_frames=train.num_frames,
                               image_size=config.model.vision.image_size,
                               fps=train.fps or None)
    return iter(pipeline.build(_sources(config), spec, tokenizer, tokens=train.seq_len,
                               frames=train.max_frames, batch_size=rows,
                               pad_multiple=multiple, seed=config.seed,
                               workers=data.workers, shard=shard))


def to_model_batch(run: Run, packed: dict) -> dict:
    """A packed host batch -> the MM-SP batch on the mesh (tokens in the scheme's layout)."""
    p = run.config.parallel
    frames = None
    if "frames" in packed:
        real = packed["frame_segment_ids"] > 0
        frames = packed["frames"][real]  # row-major: the order of the media positions
    batch = prepare_batch(packed["input_ids"], packed["labels"], frames,
                          media_token_id=run.model.media_token_id,
                          tokens_per_frame=_tokens_per_frame(run.model),
                          scheme=run.scheme, data=run.data_groups[1], node=p.node,
                          local=p.local,
                          positions=packed["positions"], segment_ids=packed["segment_ids"],
                          frame_slots=len(packed["input_ids"]) // run.data_groups[1]
                          * run.config.train.max_frames)
    # Global arrays from this process's rows, those of the data groups its devices hold
    # (`process_data_groups`); every other dimension is whole on every process.
    sharding = NamedSharding(run.mesh, P("data", SP_AXES))
    share = p.data // run.data_groups[1]
    return {k: jax.make_array_from_process_local_data(
        sharding, v, (v.shape[0] * share, *v.shape[1:])) for k, v in batch.items()}


def _tokens_per_frame(model) -> int:
    return model.media_tokens_per_frame if model.vision_tower is not None else 1


def setup(config) -> Run:
    """Mesh, model (from `train.init_from` or random), optimizer for the trainable
    parameters, all placed with FSDP shardings, and the jitted step."""
    config = validate(config)
    mesh = mesh_from_config(config)
    p = config.parallel
    scheme = resolve_scheme(p.attention, p.node, p.local)
    if config.train.batch_size % p.data:
        raise ConfigError(f"train.batch_size: {config.train.batch_size} is not a multiple of "
                          f"parallel.data={p.data}")
    data_groups = process_data_groups(mesh)
    init = config.train.init_from
    if init and not Path(init).is_dir():
        raise ConfigError(f"train.init_from: {init!r} is not a checkpoint folder")
    model = load_model(init, config) if init else build_model(config)
    trainable = trainable_filter(config.train.trainable)
    if not nnx.to_flat_state(nnx.state(model, trainable)):
        raise ConfigError(f"train.trainable: {config.train.trainable!r} matches no parameter")
    optimizer = make_optimizer_state(model, config.optim, trainable)
    fsdp.place(model, optimizer, mesh)
    step_fn = make_train_step(loss_fn(mesh, scheme), trainable)
    return Run(config, mesh, scheme, model, optimizer, step_fn, trainable, data_groups)


def _state(run: Run) -> dict:
    return {"params": nnx.to_pure_dict(nnx.state(run.model, nnx.Param)),
            "optimizer": nnx.to_pure_dict(nnx.state(run.optimizer))}


def _restore(run: Run, checkpoints: RunCheckpoints, data) -> int:
    step = checkpoints.latest_step()
    if step is None:
        return 0
    state = _state(run)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored = checkpoints.restore(step, abstract, data)
    for target, key in ((run.model, "params"), (run.optimizer, "optimizer")):
        current = nnx.state(target, nnx.Param) if key == "params" else nnx.state(target)
        nnx.replace_by_pure_dict(current, restored[key])
        nnx.update(target, current)
    logging.info("resumed from step %d", step)
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
        metrics.update(pipeline.skip_counts(data))
    return metrics


def train(config, workdir, *, progress: bool = True) -> Path:
    """Run (or resume, or skip if finished) one training run; returns its final checkpoint."""
    workdir = Path(workdir).absolute()
    final = workdir / "final"
    if final.is_dir():
        logging.info("%s exists: run finished", final)
        return final
    run = setup(config)
    config = run.config
    data = make_data(config, _tokens_per_frame(run.model), run.data_groups)
    writer = None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tensorboard"))
    try:
        _loop(run, data, writer, workdir, progress)
    finally:
        if writer is not None:
            writer.close()
    return _write_final(run, final)


def _loop(run: Run, data, writer, workdir: Path, progress: bool) -> None:
    """Steps from the latest checkpoint to `optim.total_steps`. A step's metrics are read
    after the next step is dispatched, so the host decodes the next batch while the device
    computes instead of waiting for each step to finish."""
    config = run.config
    total = config.optim.total_steps
    with RunCheckpoints(workdir / "checkpoints", keep=config.train.keep,
                        every=config.train.checkpoint_every) as checkpoints:
        start = _restore(run, checkpoints, data)
        bar = tqdm.tqdm(range(start, total), initial=start, total=total,
                        desc=config.train.stage, disable=not progress or writer is None)
        pending, last = None, time.perf_counter()
        for step in bar:
            packed = next(data)
            out = run.step_fn(run.model, run.optimizer, to_model_batch(run, packed))
            if pending is not None:
                last = _report(run, *pending, last, data, writer, bar)
            pending = (step, out, packed)
            checkpoints.save(step + 1, _state(run), data, force=step + 1 == total)
        if pending is not None:
            _report(run, *pending, last, data, writer, bar)
        checkpoints.wait()


def _report(run: Run, step: int, out, packed: dict, last: float, data, writer, bar) -> float:
    """Log one finished step; its time is from the previous step's end to its own."""
    out = jax.device_get(out)  # waits for this step
    now = time.perf_counter()
    config = run.config
    metrics = _metrics(run, out, packed, now - last, data)
    lr = schedule(config.optim)(step // config.optim.accumulation_steps)
    metrics["learning_rate"] = float(lr)
    if writer is not None and (step + 1) % config.train.log_every == 0:
        for key, value in metrics.items():
            writer.add_scalar(key, value, step + 1)
    bar.set_postfix(_postfix(metrics), refresh=False)
    return now


def _postfix(metrics: dict) -> dict:
    shown = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
    if "mfu" in metrics:
        shown["mfu"] = f"{100 * metrics['mfu']:.1f}%"
    return shown


def _write_final(run: Run, final: Path) -> Path:
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
        tokenizer = Path(_tokenizer_path(config)).parent
        save_checkpoint(final, config, params, tokenizer_dir=tokenizer)
    return final
