"""Checkpoints of a training run: the state pytree, its step, and the data position.

One orbax `CheckpointManager` per run directory, one step folder per save:
`<directory>/<step>/state` (the pytree, via `StandardCheckpointHandler`) and
`<directory>/<step>/data` (grain's own handler: one JSON file per process holding
`DatasetIterator.get_state()`). The data states are read back with `data_states`, all of
them, because a run resumed on another number of processes builds its readers from every
saved one (`data.pipeline.resume`). Model-only checkpoints for export are in `checkpoint.py`.

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when every item is
committed, so a run killed mid-save never shows that step; the next `RunCheckpoints` on the
directory deletes such leftovers. One writing job per directory (orbax's own rule).
"""

from __future__ import annotations

import json
from pathlib import Path

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

_STATE, _DATA = "state", "data"


def _path_str(path) -> str:
    """`a/0/mu` for a jax key path; namedtuple fields by name, as orbax's metadata has them."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(path): tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))
            for path, leaf in leaves}


class RunCheckpoints:
    """Checkpoints of a training run in `directory`: state pytree + step + data-iterator state.

    `state` is any pytree of jax Arrays (sharded or not) and python/numpy scalars: pure dicts
    from `nnx.to_pure_dict(nnx.state(...))`, optax state namedtuples included. Dtypes may change on
    restore (the abstract state's dtype wins); tree structure and shapes may not.
    """

    def __init__(self, directory, *, keep: int, every: int, async_save: bool = True):
        for name, value in (("keep", keep), ("every", every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RunCheckpoints: {name}={value!r} must be a positive int")
        self.directory = Path(directory).absolute()
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
            registry.add(_STATE, args, ocp.StandardCheckpointHandler)
        registry.add(_DATA, grain_ckpt.CheckpointSave, grain_ckpt.CheckpointHandler)
        options = ocp.CheckpointManagerOptions(
            # Orbax's default also saves the first step of an empty directory whatever its
            # number; here a save happens on multiples of `every`, on force, or when a
            # preemption notice reaches the sync point.
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(every),
                policies.PreemptionCheckpointingPolicy()]),
            preservation_policy=policies.LatestN(n=keep),
            enable_async_checkpointing=async_save,
            # Tmp folders left by a killed save can be as large as a checkpoint.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=registry)

    def latest_step(self) -> int | None:
        """The newest complete step, or None; unfinished (tmp) step folders never count."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether `save(step)` (unforced) would write."""
        return self._manager.should_save(step)

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        """Save when step % every == 0 or force; returns whether a save started.

        Async: returns while the arrays are written (`wait` blocks until done). The data
        iterator's position is read before returning, so it may advance at once. A step at
        or below the latest is skipped (False) unless forced; forcing an existing step raises.
        """
        items = {_STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[_DATA] = grain_ckpt.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int | None, abstract_state):
        """Restore `state` onto the shardings given by `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` (e.g. from
        `jax.eval_shape` plus shardings on ANY mesh / device count, not necessarily the one it
        was saved from). step None = latest. Returns the restored state pytree.
        """
        step = self._complete(step)
        self._check_abstract(step, abstract_state)
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state)})
        return self._manager.restore(step, args=args)[_STATE]

    def data_states(self, step: int | None) -> list[dict]:
        """Every process's saved data-iterator state at `step` (None = latest)."""
        folder = self.directory / str(self._complete(step)) / _DATA
        files = sorted(folder.glob("process_*-of-*.json"))
        if not files:
            raise ValueError(f"{folder}: no data position saved at this step")
        return [json.loads(f.read_text()) for f in files]

    def _complete(self, step: int | None) -> int:
        """`step`, or the latest when None, after checking it is complete."""
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step} "
                                    f"(have {steps})")
        return step

    def _check_abstract(self, step: int, abstract_state) -> None:
        """ValueError naming the first key path whose presence or shape differs from the save.

        Orbax would fail too, but deep in a traceback, or (for some shape changes) not at all.
        """
        metadata = self._manager.item_metadata(step)[_STATE]
        saved = _shapes(getattr(metadata, "tree", metadata))
        wanted = _shapes(abstract_state)
        where = f"{self.directory}/{step}"
        for key, shape in wanted.items():
            if key not in saved:
                raise ValueError(f"{where}: abstract state has {key!r}, the checkpoint does "
                                 "not")
            if saved[key] != shape:
                raise ValueError(f"{where}: {key!r} has shape {saved[key]} in the checkpoint "
                                 f"but {shape} in the abstract state")
        for key in saved:
            if key not in wanted:
                raise ValueError(f"{where}: checkpoint has {key!r}, the abstract state does "
                                 "not")
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            if getattr(leaf, "sharding", None) is None:
                raise ValueError(f"{where}: abstract state {_path_str(path)!r} has no "
                                 "sharding (give ShapeDtypeStructs with sharding=...)")

    def wait(self):
        """Block until async writes (and old-step deletions) are finished."""
        self._manager.wait_until_finished()

    def close(self):
        """Wait for pending writes, then release orbax's threads."""
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
