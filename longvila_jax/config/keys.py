"""Checks that command-line overrides (`--config.KEY=VALUE`) name keys the config holds.

config_flags fails on an unknown one with a bare `AttributeError`; this names the key and
suggests the nearest one the config does hold.
"""

from __future__ import annotations

import difflib

import ml_collections
from ml_collections.config_flags import config_path

from longvila_jax.config.schema import ConfigError


def check_keys(config: ml_collections.ConfigDict, keys) -> None:
    """`ConfigError` for the first dotted key (`optim.learning_rate`, `data.sources[0].jsonl`)
    that `config` does not hold, suggesting the nearest key it does hold."""
    for key in keys:
        try:
            config_path.get_value(key, config)
        except (AttributeError, IndexError, KeyError, ValueError):
            raise ConfigError(f"{key}: no such key in the config{_near_key(config, key)}") \
                from None


def _near_key(config: ml_collections.ConfigDict, key: str) -> str:
    """'; did you mean K?' for K with the nearest last name, anywhere in the config: a typo
    (`train.bach_size`) and a key put in the wrong section (`train.learning_rat`: it is
    `optim.learning_rate`) alike. Of keys sharing that name, the one nearest in full
    (`model.llm.hidden_sise`: `model.llm.hidden_size`, not `model.vision.hidden_size`)."""
    keys = list(_leaf_keys(config))
    names = difflib.get_close_matches(_name(key), sorted({_name(k) for k in keys}), n=1)
    if not names:
        return ""
    best = difflib.get_close_matches(key, [k for k in keys if _name(k) == names[0]], n=1,
                                     cutoff=0)
    return f"; did you mean {best[0]}?"


def _name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = ""):
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaf_keys(value, f"{prefix}{name}.")
        else:
            yield prefix + name
