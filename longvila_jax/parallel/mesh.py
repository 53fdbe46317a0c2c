"""The one device-mesh builder for sequence parallelism, and its up-front checks.

Axes are `("data", "node", "local")`: `data` shards the batch, `node` spans hosts (ring
attention, point-to-point), `local` spans the GPUs of one host (Ulysses all-to-all). The
all-to-all is only fast over the intra-host fabric, so every `local` group must be devices of
a single process; devices are laid out process-major to guarantee it.
"""

from __future__ import annotations

from collections import Counter

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "node", "local")
# The sequence-parallel group: a sequence is sharded over both, node-major.
SEQUENCE_AXES = ("node", "local")


def make_mesh(data: int, node: int, local: int, devices=None) -> Mesh:
    """A `[data, node, local]` mesh whose `local` rows are consecutive devices of one process.

    `devices` defaults to `jax.devices()`; they are sorted by `(process_index, id)` before the
    reshape. In multi-process runs `local` must divide each process's device count.
    """
    for name, size in zip(AXES, (data, node, local), strict=True):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"make_mesh: {name}={size!r} must be a positive int")
    devices = sorted(jax.devices() if devices is None else devices,
                     key=lambda d: (d.process_index, d.id))
    if data * node * local != len(devices):
        raise ValueError(f"make_mesh: data*node*local = {data}*{node}*{local} = "
                         f"{data * node * local} but there are {len(devices)} devices")
    per_process = Counter(d.process_index for d in devices)
    if len(per_process) > 1:
        for process, count in sorted(per_process.items()):
            # Process-major order plus this divisibility is what keeps each `local` group
            # inside one process.
            if count % local:
                raise ValueError(f"make_mesh: local={local} does not divide the {count} "
                                 f"devices of process {process}, so a local group would "
                                 f"span processes")
    return Mesh(np.array(devices, dtype=object).reshape(data, node, local), AXES)
