"""How a batch lies on the mesh: the sequence-parallel scheme and the mesh's degrees.

`Layout.lay_out` is the one host function between the data side's `Batch` (natural order)
and every sharded pass over it, training's MM-SP step, prefill and the RL passes: tokens
go into the scheme's order (zigzag over its ring, natural for Ulysses) with their global
positions, and each row's frames are padded to a multiple of the sequence group, over
which the vision tower spreads them. Everything is then sharded alike (`SPEC`): rows over
`data`, the next axis (tokens, or a row's frames) over the sequence group.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jax.sharding import PartitionSpec as P

from longvila_jax.data.batch import Batch
from longvila_jax.parallel.mesh import SEQUENCE_AXES
from longvila_jax.parallel.schemes import layout_permutation

SPEC = P("data", SEQUENCE_AXES)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A resolved scheme (`schemes.resolve_scheme`) over `data` x (`node` x `local`)."""

    scheme: str
    data: int = 1
    node: int = 1
    local: int = 1

    @property
    def group(self) -> int:
        """Devices that share one sequence."""
        return self.node * self.local

    def permutation(self, length: int) -> np.ndarray:
        """Token order of a `length`-token row (a multiple of `2 * group`)."""
        if length % (2 * self.group):
            raise ValueError(f"layout: sequence {length} is not a multiple of 2 x node x local "
                             f"= {2 * self.group}; pad it (pads get their own segment id)")
        return layout_permutation(length, self.scheme, self.node, self.local)

    def lay_out(self, batch: Batch) -> Batch:
        """`batch`'s tokens in the scheme's order (positions keep the global order), frames
        padded per row to a multiple of the group; host arrays, ready to shard as `SPEC`.

        Rows are laid out one by one, so `batch` may be a process's share of the global
        batch; that the global rows split over `data` is checked where they are assembled."""
        perm = self.permutation(np.shape(batch.input_ids)[1])
        tokens = {field.name: _permuted(getattr(batch, field.name), perm)
                  for field in dataclasses.fields(batch) if field.name != "frames"}
        frames = batch.frames
        if frames is not None:
            extra = -frames.shape[1] % self.group
            frames = np.pad(frames, [(0, 0), (0, extra)] + [(0, 0)] * (frames.ndim - 2))
        return Batch(**tokens, frames=frames)


def _permuted(tokens, perm: np.ndarray):
    return None if tokens is None else np.ascontiguousarray(np.asarray(tokens, np.int32)[:, perm])
