"""The device mesh a config's `parallel` section asks for, its mismatches named by key."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from longvila_jax.config.schema import ConfigError
from longvila_jax.parallel.mesh import make_mesh


def mesh_from_config(config, devices=None) -> Mesh:
    """`make_mesh` from a config's `parallel` section; a size mismatch is a ConfigError."""
    p = config.parallel
    count = len(jax.devices() if devices is None else devices)
    if p.data * p.node * p.local != count:
        raise ConfigError(f"parallel: data*node*local = {p.data}*{p.node}*{p.local} = "
                          f"{p.data * p.node * p.local} but there are {count} devices")
    try:
        return make_mesh(p.data, p.node, p.local, devices)
    except ValueError as e:
        raise ConfigError(f"parallel.local: {e}") from None

