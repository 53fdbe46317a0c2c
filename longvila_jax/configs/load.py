"""Loading a config by name: `NAME[:ARG]`, a packaged one (`longvila_jax/configs/NAME.py`:
`tiny`, `stages/sft:qwen2_7b`), or `FILE.py[:ARG]`, a file of your own; either defines
`get_config([arg])` returning a ConfigDict, and ARG is passed to it (config_flags' syntax).

ml_collections' own loader defers a missing file's error to the config's first use and buries
`get_config`'s in a traceback; these errors are one line naming the config or the argument.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path

import ml_collections

from longvila_jax.config import ConfigError

PACKAGED = __package__


def load_file(spec: str) -> ml_collections.ConfigDict:
    """`NAME[:ARG]` or `FILE.py[:ARG]` -> its `get_config(ARG)`; `ConfigError` naming the
    config or ARG."""
    name, *args = spec.split(":", 1)
    get_config = _get_config(name) if name.endswith(".py") else _packaged_get_config(name)
    signature = inspect.signature(get_config)
    try:
        signature.bind(*args)
    except TypeError as e:
        raise ConfigError(f"{spec}: get_config{signature} called with {tuple(args)}: {e}") \
            from None
    try:
        config = get_config(*args)
    except ValueError as e:  # the config rejects ARG (an unknown model or variant)
        raise ConfigError(f"{spec}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{spec}: get_config() returned {type(config).__name__}, not a "
                          "ConfigDict")
    return config


def packaged_names() -> list[str]:
    """The packaged configs' names, models first: `demo`, ..., `stages/align`, ..."""
    package = importlib.import_module(PACKAGED)
    names = (module.name.removeprefix(f"{PACKAGED}.").replace(".", "/")
             for module in pkgutil.walk_packages(package.__path__, f"{PACKAGED}.")
             if not module.ispkg and module.name != __name__)  # not this loader
    return sorted(names, key=lambda name: (name.count("/"), name))


def _packaged_get_config(name: str):
    """The packaged config `name`'s `get_config` function."""
    names = packaged_names()
    if name not in names:
        near = _near_name(name, names)
        hint = f"; did you mean {near!r}?" if near else ""
        raise ConfigError(f"config {name!r} is not a packaged one{hint} (packaged: "
                          f"{', '.join(names)}; a file of your own: FILE.py[:ARG])")
    return importlib.import_module(f"{PACKAGED}.{name.replace('/', '.')}").get_config


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
    """'; did you mean F?' for a file F beside `path`, else for the packaged config nearest
    its stem (`configs/stages/3_sft.py`: `stages/sft`, as these were once spelt)."""
    near = difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*.py")], n=1)
    if near:
        return f"; did you mean {str(path.parent / near[0])!r}?"
    name = _near_name(path.stem, packaged_names())
    return f"; did you mean the packaged {name!r}?" if name else ""


def _near_name(name: str, names: list[str]) -> str | None:
    """The name in `names` nearest `name` in full, else by its last part (`sft`, `3_sft`:
    `stages/sft`)."""
    near = difflib.get_close_matches(name, names, n=1)
    if near:
        return near[0]
    last = {n.rsplit("/", 1)[-1]: n for n in names}
    near = difflib.get_close_matches(name.rsplit("/", 1)[-1], list(last), n=1)
    return last[near[0]] if near else None


