"""Models from configs and checkpoints: `build_model`, `load_model`, and model checkpoints
(`config.json` + orbax `params/` + optional `tokenizer/`, written atomically).

The glue between the config layer and the model layer, above both, so that the model
files never import configs; training, inference and import/export all load models here.
Everything is written into a hidden temporary folder beside the destination and renamed
at the end, so an interrupted or failed write never leaves a half checkpoint behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from longvila_jax.atomic import atomic_folder
from longvila_jax.config import base_config, validate
from longvila_jax.models.longvila import LongVILA
from longvila_jax.models.lora import LORA_FILTER, apply_lora, is_lora_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")


def flat_to_nested(flat: dict) -> dict:
    nested = {}
    for path, value in flat.items():
        node = nested
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return nested


def nested_to_flat(nested: dict, prefix=()) -> dict:
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(nested_to_flat(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def model_params(model: nnx.Module) -> dict:
    """Flat `{path: array}` of a model's parameters (paths as string tuples)."""
    return {tuple(str(p) for p in path): var[...]
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_checkpoint(dst, config: ml_collections.ConfigDict, params: dict, tokenizer_dir=None):
    """Write a checkpoint folder; `params` is flat `{path tuple: array}` of host arrays.

    The calling process writes alone (in a multi-process job, process 0 after gathering):
    orbax would otherwise wait at a barrier for every process of the job."""
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    with atomic_folder(dst) as tmp:
        (tmp / "config.json").write_text(config.to_json(indent=2))
        with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
            ckptr.save(tmp / "params", flat_to_nested(params))
        if tokenizer_dir is not None:
            (tmp / "tokenizer").mkdir()
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).exists():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / "tokenizer" / name)
    return Path(dst)


def load_config(ckpt) -> ml_collections.ConfigDict:
    path = Path(ckpt) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (is {ckpt} a longvila-jax checkpoint?)")
    # Over the schema's defaults, so that a checkpoint written before a key existed loads.
    config = base_config()
    config.update(json.loads(path.read_text()))
    return validate(config)


def load_params(ckpt) -> dict:
    """Flat `{path: np.ndarray}` exactly as stored (dtype preserved)."""
    path = (Path(ckpt) / "params").absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (is {ckpt} a longvila-jax checkpoint?)")
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path)
    return {k: np.asarray(v) for k, v in nested_to_flat(restored).items()}


def load_model(ckpt, config=None):
    """Build the model from a checkpoint without a throw-away random init.

    With `model.lora.rank` > 0, adapters missing from the checkpoint (a base checkpoint)
    start fresh from `config.seed` (`lora_b` = 0, so the model equals the base)."""
    config = load_config(ckpt) if config is None else validate(config)
    params = load_params(ckpt)
    model = nnx.eval_shape(lambda: LongVILA(config.model, rngs=nnx.Rngs(0)))
    dtype = np.dtype(config.model.param_dtype)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(p) for p in path)
        if key not in params:
            raise KeyError(f"{ckpt}: parameter {'/'.join(key)} missing from the checkpoint")
        var.set_value(jax.numpy.asarray(params[key], dtype))
    nnx.update(model, state)
    apply_lora(model, config.model.get("lora"), nnx.Rngs(config.seed))
    state = nnx.state(model, LORA_FILTER)
    adapters = {tuple(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}
    for key in filter(is_lora_path, params):
        if key not in adapters or adapters[key].shape != params[key].shape:
            raise KeyError(f"{ckpt}: LoRA parameter {'/'.join(key)} {params[key].shape} "
                           "does not fit the config's model.lora (rank, targets)")
        adapters[key].set_value(jax.numpy.asarray(params[key], dtype))
    nnx.update(model, state)
    return model


def build_model(config, seed: int | None = None) -> LongVILA:
    """Validate `config` and build a randomly initialised model (with LoRA adapters when
    `model.lora.rank` > 0)."""
    validate(config)
    rngs = nnx.Rngs(config.seed if seed is None else seed)
    return apply_lora(LongVILA(config.model, rngs=rngs), config.model.get("lora"), rngs)
