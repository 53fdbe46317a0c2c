"""The one place that says what a config may hold, and checks it before any compute."""

from longvila_jax.config.keys import check_keys
from longvila_jax.config.mesh import mesh_from_config
from longvila_jax.config.schema import ConfigError, base_config, validate

__all__ = ["ConfigError", "base_config", "check_keys", "mesh_from_config", "validate"]
