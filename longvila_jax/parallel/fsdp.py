"""FSDP (ZeRO-3): parameters and optimizer state sharded over every device of the mesh.

Each weight matrix is split along one dimension over all mesh axes together
(`data` x `node` x `local`), so the sequence-parallel and data-parallel devices that hold
replicas of the activations' computation share the storage of the weights instead. Inside
the MM-SP `shard_map` a weight is all-gathered right before use: the stacked layers one
layer at a time inside the layer scan (`scan_layers(gather=...)`, so peak memory holds one
gathered layer, gathered again in the backward under remat), everything else once. The
gradient of an all-gather is a reduce-scatter, so gradients come back sharded the same way
and the optimizer update runs on shards.

Vectors (norm scales, biases) and matrices with no dimension the device count divides
stay replicated: they are small, and gathering them would cost more in latency than it
saves in memory.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.models.layers import STACKED
from longvila_jax.parallel.mesh import AXES


def _names(var) -> tuple:
    return tuple(var.get_metadata().get("out_sharding") or ())


def _shard_dim(var, size: int) -> int:
    """The dimension of one parameter to split over `size` devices, -1 for none: the
    largest non-layer dimension `size` divides, for matrices only."""
    shape, names = var.shape, _names(var)
    dims = [i for i in range(len(shape)) if not (i < len(names) and names[i] == STACKED)]
    if size == 1 or len(dims) < 2:
        return -1
    dims = [i for i in dims if shape[i] % size == 0]
    return max(dims, key=lambda i: (shape[i], -i)) if dims else -1


def shard_dims(params: nnx.State, size: int) -> nnx.State:
    """`params` with each value replaced by its shard dimension over `size` devices (-1:
    replicated); the tree `gather` and `partition_specs` take."""
    return nnx.from_flat_state([(path, var.replace(_shard_dim(var, size)))
                                for path, var in nnx.to_flat_state(params)])


def spec(dim: int, ndim: int) -> P:
    """The `PartitionSpec` splitting dimension `dim` of an `ndim` array over every mesh
    axis (-1: replicated)."""
    return P() if dim < 0 else P(*(AXES if i == dim else None for i in range(ndim)))


def partition_specs(params: nnx.State, dims: nnx.State) -> nnx.State:
    """The FSDP `PartitionSpec` of every parameter in `params` (same tree), from its
    `shard_dims`."""
    return jax.tree.map(lambda d, a: spec(d, a.ndim), dims, params)


def _optimizer_specs(opt_state: nnx.State, param_specs: dict) -> nnx.State:
    """Optimizer leaves shaped like a parameter (moments, accumulated gradients) take its
    spec: their paths end with the parameter's path. Counters are replicated."""
    out = []
    for path, var in nnx.to_flat_state(opt_state):
        match = next((param_specs[path[i:]] for i in range(len(path))
                      if param_specs.get(path[i:], (None,))[0] == var.shape), (None, P()))
        out.append((path, var.replace(match[1])))
    return nnx.from_flat_state(out)


def place(model: nnx.Module, optimizer: nnx.Optimizer | None, mesh) -> None:
    """Move `model`'s parameters and `optimizer`'s state onto `mesh` with their FSDP
    shardings, in place."""
    params = nnx.state(model, nnx.Param)
    specs = partition_specs(params, shard_dims(params, mesh.devices.size))

    def put(state, specs):
        return jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    nnx.update(model, put(params, specs))
    if optimizer is not None:
        by_path = {path: (var.shape, spec.get_value()) for (path, var), (_, spec) in zip(
            nnx.to_flat_state(params), nnx.to_flat_state(specs), strict=True)}
        state = nnx.state(optimizer)
        nnx.update(optimizer, put(state, _optimizer_specs(state, by_path)))


def split_stacked(dims: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(`dims` with the stacked-layer leaves set to -1, `dims` of only the stacked leaves):
    what to gather at once, and what `scan_layers` gathers one layer at a time."""
    now, later = [], []
    for path, var in nnx.to_flat_state(dims):
        stacked = _names(var)[:1] == (STACKED,)
        now.append((path, var.replace(-1) if stacked else var))
        if stacked:
            later.append((path, var))
    return nnx.from_flat_state(now), nnx.from_flat_state(later)


def gather(tree, dims, offset: int = 0):
    """Inside `shard_map`: all-gather each sharded leaf of `tree` (dims from `shard_dims`);
    `offset` -1 for one layer's slice of a stacked state (its layer axis is gone)."""
    def one(a, d):
        return a if d < 0 else jax.lax.all_gather(a, AXES, axis=d + offset, tiled=True)

    return jax.tree.map(one, tree, dims)
