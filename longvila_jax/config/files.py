"""Config files and the keys that command-line overrides name, checked with one-line errors.

A config file is Python defining `get_config([arg])` that returns a ConfigDict; `FILE:ARG`
passes ARG (config_flags' syntax). ml_collections' own loader defers a missing file's error to
the config's first use and buries `get_config`'s in a traceback; an override naming no key
fails there with a bare `AttributeError`. These name the file, the argument or the key.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from pathlib import Path

import ml_collections
from ml_collections.config_flags import config_path

from longvila_jax.config.schema import ConfigError


def load_file(spec: str) -> ml_collections.ConfigDict:
    """`FILE[:ARG]` -> FILE's `get_config(ARG)`; `ConfigError` naming FILE or ARG."""
    path, *args = spec.split(":", 1)
    get_config = _get_config(path)
    signature = inspect.signature(get_config)
    try:
        signature.bind(*args)
    except TypeError as e:
        raise ConfigError(f"{spec}: get_config{signature} called with {tuple(args)}: {e}") \
            from None
    try:
        config = get_config(*args)
    except ValueError as e:  # the file rejects ARG (an unknown model or variant)
        raise ConfigError(f"{spec}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{spec}: get_config() returned {type(config).__name__}, not a "
                          "ConfigDict")
    return config


def _get_config(path: str):
    """The file's `get_config` function."""
    if not Path(path).is_file():
        raise ConfigError(f"config file {path!r} does not exist{_near_file(Path(path))}")
    spec = importlib.util.spec_from_file_location(f"longvila_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    return module.get_config


def _near_file(path: Path) -> str:
    near = difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*.py")], n=1)
    return f"; did you mean {str(path.parent / near[0])!r}?" if near else ""


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
