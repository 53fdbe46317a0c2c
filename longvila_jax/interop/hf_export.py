"""Export a longvila-jax checkpoint to Hugging Face / VILA folders (safetensors via numpy).

`longvila` writes VILA's layout (`llm/`, `vision_tower/`, `mm_projector/`, top
`config.json`), whose sub-folders load with `AutoModelForCausalLM` and
`SiglipVisionModel`; a text-only model is written as a plain causal-LM folder.
`llava` writes a `LlavaForConditionalGeneration` folder (mlp2x_gelu projector only).
The output appears only when complete (written to a temporary folder, then renamed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from longvila_jax.atomic import atomic_folder, ensure_new_path
from longvila_jax.checkpoint import load_config, load_params
from longvila_jax.interop import hf_layouts as L
from longvila_jax.interop.safetensors_io import CheckpointError, write_sharded

FORMATS = ("longvila", "llava")
SHARD_BYTES = 5 * 10**9


def _tensors(params, rules, num_layers, prefix, patch_size, bar):
    for local, path, layer, transform in L.expand(rules, num_layers):
        array = params[path] if layer is None else params[path][layer]
        bar.update()
        yield prefix + local, L.to_hf(np.asarray(array), transform, patch_size)


def _write_json(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_tokenizer(src: Path | None, dst: Path):
    if src is not None and src.is_dir():
        for file in src.iterdir():
            shutil.copy2(file, dst / file.name)


def export_hf(ckpt, out, *, fmt: str = "longvila", max_shard_bytes: int = SHARD_BYTES,
              progress: bool = True) -> Path:
    """Write checkpoint `ckpt` as a Hugging Face folder `out` in format `fmt`; returns `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: expected one of {FORMATS}")
    ckpt = Path(ckpt)
    ensure_new_path(out)
    return write_hf(load_config(ckpt), load_params(ckpt), out, fmt=fmt,
                    tokenizer=ckpt / "tokenizer", max_shard_bytes=max_shard_bytes,
                    progress=progress, source=str(ckpt))


def write_hf(config, params: dict, out, *, fmt: str = "longvila", tokenizer: Path | None = None,
             max_shard_bytes: int = SHARD_BYTES, progress: bool = True,
             source: str = "model") -> Path:
    """`export_hf` of parameters in memory (`{path tuple: array}` as `load_params` gives
    them, layers stacked) under `config`: the same random weights in both frameworks for a
    baseline, without writing our checkpoint first."""
    ensure_new_path(out)
    model = config.model
    if fmt == "llava" and (not model.vision.enabled or model.projector.type != "mlp2x_gelu"):
        raise CheckpointError(f"{source}: --format llava needs a vision model with an "
                              f"mlp2x_gelu projector (this one: {model.projector.type!r}, "
                              f"vision enabled={model.vision.enabled})")
    dtype = str(next(iter(params.values())).dtype)
    llm_cfg = {**L.llm_config_to_hf(model.llm), "dtype": dtype, "torch_dtype": dtype}
    vis_cfg = {**L.vision_config_to_hf(model.vision), "dtype": dtype, "torch_dtype": dtype}
    patch = model.vision.patch_size
    llm_rules = (L.llm_rules(model.llm), model.llm.num_layers)
    groups = [llm_rules]
    if model.vision.enabled:
        groups += [(L.vision_rules(), model.vision.num_layers),
                   (L.projector_rules(model, fmt == "llava"), 0)]
    total = sum(len(list(L.expand(r, n))) for r, n in groups)
    bar = tqdm(total=total, desc="export", unit="tensor", disable=not progress)
    shard = dict(max_shard_bytes=max_shard_bytes)

    def llm_tensors(prefix_model, prefix_head):
        for key, array in _tensors(params, *llm_rules, "", patch, bar):
            yield (prefix_head if key.startswith("lm_head.") else prefix_model) + key, array

    with atomic_folder(out) as tmp:
        if not model.vision.enabled:
            write_sharded(llm_tensors("model.", ""), tmp, **shard)
            _write_json(tmp / "config.json", llm_cfg)
            _copy_tokenizer(tokenizer, tmp)
        elif fmt == "longvila":
            for sub in ("llm", "vision_tower", "mm_projector"):
                (tmp / sub).mkdir()
            write_sharded(llm_tensors("model.", ""), tmp / "llm", **shard)
            write_sharded(_tensors(params, *groups[1], "vision_model.", patch, bar),
                          tmp / "vision_tower", **shard)
            write_sharded(_tensors(params, *groups[2], "", patch, bar), tmp / "mm_projector",
                          **shard)
            proj_cfg = {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector",
                        "mm_projector_type": model.projector.type}
            _write_json(tmp / "llm" / "config.json", llm_cfg)
            _write_json(tmp / "vision_tower" / "config.json", vis_cfg)
            _write_json(tmp / "mm_projector" / "config.json", proj_cfg)
            _write_json(tmp / "config.json", {
                "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
                "llm_cfg": {**llm_cfg, "_name_or_path": "./llm"},
                "vision_tower_cfg": {**vis_cfg, "_name_or_path": "./vision_tower"},
                "mm_projector_cfg": {**proj_cfg, "_name_or_path": "./mm_projector"},
                "mm_vision_select_layer": model.vision.select_layer,
                "mm_vision_select_feature": "cls_patch",
                "hidden_size": model.llm.hidden_size, "mm_hidden_size": model.vision.hidden_size,
                "longvila_jax": {"media_token_id": model.media.media_token_id,
                                 "newline_token_id": model.media.newline_token_id},
            })
            _copy_tokenizer(tokenizer, tmp / "llm")
        else:
            tensors = [llm_tensors("language_model.model.", "language_model."),
                       _tensors(params, *groups[1], "vision_tower.", patch, bar),
                       _tensors(params, *groups[2], "multi_modal_projector.", patch, bar)]
            write_sharded((t for group in tensors for t in group), tmp, **shard)
            grid = model.vision.image_size // patch
            _write_json(tmp / "config.json", {
                "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                "text_config": llm_cfg, "vision_config": vis_cfg,
                "image_token_index": model.media.media_token_id,
                "image_seq_length": grid * grid,
                "vision_feature_layer": model.vision.select_layer,
                "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
                "multimodal_projector_bias": True,
                "tie_word_embeddings": model.llm.tie_embeddings, "dtype": dtype,
            })
            _copy_tokenizer(tokenizer, tmp)
        bar.close()
    return Path(out)
