"""Import Hugging Face / VILA checkpoints into a longvila-jax (orbax) checkpoint.

Accepted sources:
  (a) a LongVILA folder: top `config.json` with `llm_cfg`, sub-folders `llm/`,
      `vision_tower/`, `mm_projector/`;
  (b) a transformers `LlavaForConditionalGeneration` folder (4.x and 5.x key layouts);
  (c) a Qwen2/Llama folder, optionally with a separate SigLIP folder (`vision=`) and a
      projector type, to assemble a new model for stage 1 (projector freshly initialised).
Tensors stream one at a time into preallocated arrays: the model is in host memory once.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from longvila_jax.atomic import ensure_new_path
from longvila_jax.checkpoint import model_params, save_checkpoint
from longvila_jax.config import ConfigError, base_config, validate
from longvila_jax.config.schema import DTYPES
from longvila_jax.data.tokenizer import load_tokenizer
from longvila_jax.interop import hf_layouts as L
from longvila_jax.interop.safetensors_io import CheckpointError, SafetensorsFolder
from longvila_jax.models.projector import Projector


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# The tensors of one component: `local key -> (folder, key as saved)`.
Source = dict[str, tuple[SafetensorsFolder, str]]


def _plain(folder: Path, strip) -> Source:
    tensors = SafetensorsFolder(folder)
    return {strip(key): (tensors, key) for key in tensors.keys()}


def _tokenizer_ids(tokenizer_dir: Path | None):
    """(`<image>` id, newline id) from tokenizer.json; None where it has no answer."""
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").exists():
        return None, None
    tok = load_tokenizer(tokenizer_dir)
    newline = tok.encode("\n", add_special_tokens=False).ids
    return tok.token_to_id("<image>"), newline[0] if len(newline) == 1 else None


# Marks a token id that the source leaves to its tokenizer.json.
FROM_TOKENIZER = "tokenizer"


@dataclasses.dataclass
class _Detected:
    config: ml_collections.ConfigDict
    sources: dict[str, Source]  # by component: 'llm', 'vision', 'projector'
    kind: str  # 'longvila', 'llava' or 'llm' (with or without a separate SigLIP)
    tokenizer_dir: Path | None
    media_token_id: int | str | None = FROM_TOKENIZER
    newline_token_id: int | str | None = FROM_TOKENIZER
    fresh_projector: bool = False


def _detect(src: Path, vision: Path | None, projector_type: str | None) -> _Detected:
    """Recognise the source layout; fill the config and list where each tensor lives."""
    config = base_config()
    model = config.model
    top = _read_json(src / "config.json")
    sources = {}
    if "llm_cfg" in top:  # (a) LongVILA
        llm_dir = src / "llm"
        L.llm_config_from_hf(_read_json(llm_dir / "config.json"), str(llm_dir / "config.json"),
                             model.llm)
        L.vision_config_from_hf(_read_json(src / "vision_tower" / "config.json"),
                                str(src / "vision_tower" / "config.json"), model.vision)
        proj = top.get("mm_projector_cfg") or _read_json(src / "mm_projector" / "config.json")
        if not isinstance(proj, dict):
            raise CheckpointError(f"{src / 'config.json'}: 'mm_projector_cfg' must be an object")
        model.projector.type = str(proj.get("mm_projector_type", ""))
        model.vision.select_layer = L.get_int(top, "mm_vision_select_layer",
                                              str(src / "config.json"), -2)
        sources["llm"] = _plain(llm_dir, L.strip_llm_prefix)
        sources["vision"] = _plain(src / "vision_tower", L.strip_vision_prefix)
        sources["projector"] = _plain(src / "mm_projector", lambda k: k)
        tokenizer_dir = llm_dir if (llm_dir / "tokenizer.json").exists() else src
        # Exports of ours record the ids; VILA's own folders leave them to the tokenizer.
        ours, where = top.get("longvila_jax") or {}, str(src / "config.json")
        if not isinstance(ours, dict):
            raise CheckpointError(f"{where}: 'longvila_jax' must be an object")
        ids = {key: L.get_int(ours, key, where, None) if key in ours else FROM_TOKENIZER
               for key in ("media_token_id", "newline_token_id")}
        return _Detected(config, sources, "longvila", tokenizer_dir, **ids)
    if top.get("model_type") == "llava":  # (b) transformers LLaVA
        where = str(src / "config.json")
        L.llm_config_from_hf(top.get("text_config", {}), f"{where} text_config", model.llm)
        L.vision_config_from_hf(top.get("vision_config", {}), f"{where} vision_config",
                                model.vision)
        strategy = top.get("vision_feature_select_strategy", "default")
        if strategy != "full":
            raise CheckpointError(f"{where}: vision_feature_select_strategy={strategy!r} is not "
                                  "supported (SigLIP towers use 'full')")
        if top.get("projector_hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{where}: projector_hidden_act="
                                  f"{top['projector_hidden_act']!r} is not supported ('gelu')")
        model.projector.type = "mlp2x_gelu"
        model.vision.select_layer = L.get_int(top, "vision_feature_layer", where, -2)
        tensors = SafetensorsFolder(src)
        for key in tensors.keys():
            component, local = L.normalise_key(key)
            if component is None:
                raise CheckpointError(f"{tensors.key_to_file[key]}: unexpected tensor '{key}' "
                                      "in a LLaVA checkpoint")
            sources.setdefault(component, {})[local] = (tensors, key)
        return _Detected(config, sources, "llava", src,
                         media_token_id=L.get_int(top, "image_token_index", where),
                         newline_token_id=None)
    # (c) a plain LLM folder, optionally with a SigLIP folder
    L.llm_config_from_hf(top, str(src / "config.json"), model.llm)
    sources["llm"] = _plain(src, L.strip_llm_prefix)
    if vision is None:
        model.vision.enabled = False
        return _Detected(config, sources, "llm", src)
    L.vision_config_from_hf(_read_json(vision / "config.json"), str(vision / "config.json"),
                            model.vision)
    model.projector.type = projector_type or "mlp_downsample"
    sources["vision"] = _plain(vision, L.strip_vision_prefix)
    return _Detected(config, sources, "llm", src, fresh_projector=True)


def _component_rules(config, llava: bool):
    model = config.model
    rules = {"llm": (L.llm_rules(model.llm), model.llm.num_layers)}
    if model.vision.enabled:
        rules["vision"] = (L.vision_rules(), model.vision.num_layers)
        rules["projector"] = (L.projector_rules(model, llava), 0)
    return rules


def read_params(config, sources, *, llava: bool, fresh_projector: bool, progress: bool) -> dict:
    """Stream every tensor into flat `{our path: np.ndarray}`, checking names and shapes."""
    abstract = nnx.eval_shape(lambda: _model(config))
    shapes = {path: var.shape for path, var in _flat(abstract)}
    params: dict = {}
    rules = _component_rules(config, llava)
    if fresh_projector:
        rules.pop("projector")
    total = sum(len(list(L.expand(r, n))) for r, n in rules.values())
    bar = tqdm(total=total, desc="import", unit="tensor", disable=not progress)
    for component, (component_rules, num_layers) in rules.items():
        source = sources.get(component)
        if not source:
            raise CheckpointError(f"no {component} tensors found in the checkpoint")
        expected = {local for local, *_ in L.expand(component_rules, num_layers)}
        for local, (folder, saved) in source.items():
            if local not in expected and not any(p.match(local) for p in L.IGNORED):
                raise CheckpointError(f"{folder.key_to_file[saved]}: unexpected tensor '{saved}' "
                                      f"(does the config match? {component})")
        for local, path, layer, transform in L.expand(component_rules, num_layers):
            if local not in source:
                raise CheckpointError(f"{_folder_of(source)}: missing tensor for '{local}' "
                                      f"({component})")
            folder, saved = source[local]
            raw = folder.get(saved)
            want = shapes[path][1:] if layer is not None else shapes[path]
            try:
                array = L.to_ours(raw, transform)
            except ValueError:  # wrong rank for the transform
                array = None
            if array is None or tuple(array.shape) != tuple(want):
                raise CheckpointError(f"{folder.key_to_file[saved]}: '{saved}' has shape "
                                      f"{tuple(raw.shape)}, which does not match the config's "
                                      f"{tuple(want)} (in our layout)")
            bar.update()
            if layer is None:
                params[path] = np.ascontiguousarray(array)
                continue
            if path not in params:
                params[path] = np.empty((num_layers, *want), array.dtype)
            elif params[path].dtype != array.dtype:  # mixed dtypes: widen, never round
                params[path] = params[path].astype(np.result_type(params[path], array))
            params[path][layer] = array
    bar.close()
    if fresh_projector:  # stage 1 starts from a random projector, stored like the LLM
        proj = Projector(config.model, rngs=nnx.Rngs(config.seed))
        dtype = params[("llm", "embed_tokens")].dtype
        params.update({("projector", *k): np.asarray(v, dtype)
                       for k, v in model_params(proj).items()})
    return params


def _model(config):
    from longvila_jax.models.longvila import LongVILA

    return LongVILA(config.model, rngs=nnx.Rngs(0))


def _flat(model):
    return [(tuple(str(p) for p in path), var)
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def _folder_of(source: Source) -> Path:
    return next(iter(source.values()))[0].folder


def import_hf(src, dst, *, vision=None, projector_type=None, media_token_id=None,
              newline_token_id=None, progress: bool = True) -> Path:
    """Convert a Hugging Face folder to a longvila-jax checkpoint at `dst`; returns `dst`.

    `media_token_id` / `newline_token_id` override what the checkpoint or its tokenizer
    says (needed only when neither names them).
    """
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder")
    ensure_new_path(dst)
    found = _detect(src, Path(vision) if vision else None, projector_type)
    config = found.config
    if config.model.vision.enabled:
        from_tokenizer = dict(zip(("media_token_id", "newline_token_id"),
                                  _tokenizer_ids(found.tokenizer_dir), strict=True))
        given = {"media_token_id": media_token_id, "newline_token_id": newline_token_id}
        for key, value in given.items():
            if value is None:
                value = getattr(found, key)
            if value == FROM_TOKENIZER:
                value = from_tokenizer[key]
                if value is None:
                    raise CheckpointError(f"{src}: cannot tell {key}: neither the config nor a "
                                          f"tokenizer.json names it; pass {key}")
            config.model.media[key] = value
    try:
        validate(config)
    except ConfigError as e:
        raise CheckpointError(f"{src}: imported config is invalid: {e}") from None
    params = read_params(config, found.sources, llava=found.kind == "llava",
                         fresh_projector=found.fresh_projector, progress=progress)
    # Keep the checkpoint's storage dtype, so loading does not silently upcast bf16 weights.
    stored = params[("llm", "embed_tokens")].dtype.name
    if stored in DTYPES:
        config.model.param_dtype = stored
    tok_dir = found.tokenizer_dir
    has_tokenizer = tok_dir is not None and (tok_dir / "tokenizer.json").exists()
    return save_checkpoint(dst, config, params, tokenizer_dir=tok_dir if has_tokenizer else None)

