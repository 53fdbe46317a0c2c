"""How our parameter tree maps to Hugging Face / VILA tensor names, and configs both ways.

One table per component lists (HF name, our path, transform); import and export both
walk the same table, so the two directions cannot drift apart. HF names here are local
to a component (no `model.` / `vision_model.` prefixes); `normalise_key` strips the
prefixes that the different saved layouts use.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from longvila_jax.interop.safetensors_io import CheckpointError
from longvila_jax.models.projector import layer_specs


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # may contain '{i}' for a per-layer tensor
    ours: tuple[str, ...]  # path in nnx.state(model, nnx.Param)
    transform: str = "copy"  # 'copy', 'linear' (transpose) or 'patch' (conv -> matmul)


def _linear(hf, ours, bias=True):
    rules = [Rule(f"{hf}.weight", (*ours, "kernel"), "linear")]
    return rules + ([Rule(f"{hf}.bias", (*ours, "bias"))] if bias else [])


def _norm(hf, ours, bias):
    rules = [Rule(f"{hf}.weight", (*ours, "scale"))]
    return rules + ([Rule(f"{hf}.bias", (*ours, "bias"))] if bias else [])


def llm_rules(llm_cfg):
    b = llm_cfg.attention_bias
    rules = [Rule("embed_tokens.weight", ("llm", "embed_tokens")),
             *_norm("norm", ("llm", "norm"), bias=False)]
    if not llm_cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("llm", "lm_head"), "linear"))
    layer = ("llm", "layers")
    for name in ("q_proj", "k_proj", "v_proj"):
        rules += _linear(f"layers.{{i}}.self_attn.{name}", (*layer, name), bias=b)
    rules += _linear("layers.{i}.self_attn.o_proj", (*layer, "o_proj"), bias=False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules += _linear(f"layers.{{i}}.mlp.{name}", (*layer, name), bias=False)
    rules += _norm("layers.{i}.input_layernorm", (*layer, "input_norm"), bias=False)
    rules += _norm("layers.{i}.post_attention_layernorm", (*layer, "post_attention_norm"),
                   bias=False)
    return rules


def vision_rules():
    t = ("vision_tower",)
    rules = [Rule("embeddings.patch_embedding.weight", (*t, "patch_kernel"), "patch"),
             Rule("embeddings.patch_embedding.bias", (*t, "patch_bias")),
             Rule("embeddings.position_embedding.weight", (*t, "position_embedding")),
             *_norm("post_layernorm", (*t, "post_layernorm"), bias=True)]
    layer = (*t, "layers")
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += _linear(f"encoder.layers.{{i}}.self_attn.{name}", (*layer, name))
    for name in ("fc1", "fc2"):
        rules += _linear(f"encoder.layers.{{i}}.mlp.{name}", (*layer, name))
    for name in ("layer_norm1", "layer_norm2"):
        rules += _norm(f"encoder.layers.{{i}}.{name}", (*layer, name), bias=True)
    return rules


LLAVA_PROJECTOR_NAMES = {"0": "linear_1", "2": "linear_2"}


def projector_rules(model_cfg, llava: bool):
    rules = []
    specs = layer_specs(model_cfg.projector.type, model_cfg.vision.hidden_size,
                        model_cfg.llm.hidden_size)
    for index, op, _, _ in specs:
        if op == "gelu":
            continue
        ours = ("projector", "layers", str(index))
        hf = LLAVA_PROJECTOR_NAMES[str(index)] if llava else f"layers.{index}"
        if op == "linear":
            rules += _linear(hf, ours)
        elif op == "ln":
            rules += _norm(hf, ours, bias=True)
    return rules


def expand(rules, num_layers):
    """Yield `(hf_key, our_path, layer_index_or_None, transform)` for every tensor."""
    for rule in rules:
        if "{i}" in rule.hf:
            for i in range(num_layers):
                yield rule.hf.format(i=i), rule.ours, i, rule.transform
        else:
            yield rule.hf, rule.ours, None, rule.transform


def to_ours(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return array.T
    if transform == "patch":  # [C, 3, p, p] -> [(p, p, 3), C]
        return array.transpose(2, 3, 1, 0).reshape(-1, array.shape[0])
    return array


def to_hf(array: np.ndarray, transform: str, patch_size: int = 0) -> np.ndarray:
    if transform == "linear":
        return array.T
    if transform == "patch":
        c = array.shape[-1]
        return array.reshape(patch_size, patch_size, 3, c).transpose(3, 2, 0, 1)
    return array


# Saved layouts put components under different prefixes (transformers 4.x vs 5.x,
# LLaVA vs plain models); each pattern maps a saved key to (component, local key).
_PREFIXES = [
    (r"^(?:model\.language_model\.|language_model\.model\.)(.*)$", "llm"),
    (r"^(?:language_model\.)?(lm_head\..*)$", "llm"),
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.*)$", "vision"),
    (r"^(?:model\.)?multi_modal_projector\.(.*)$", "projector"),
]


def normalise_key(key: str):
    """Map a LLaVA-layout key to `(component, local key)`."""
    for pattern, component in _PREFIXES:
        m = re.match(pattern, key)
        if m:
            return component, m.group(1)
    return None, key


def strip_llm_prefix(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def strip_vision_prefix(key: str) -> str:
    return key[len("vision_model."):] if key.startswith("vision_model.") else key


# Tensors some checkpoints carry that the model does not use.
IGNORED = (re.compile(r"^head\."), re.compile(r".*rotary_emb\.inv_freq$"))


# ----------------------------------------------------------------------------- configs


_MISSING = object()


def _need(cfg: dict, key: str, where: str, default=_MISSING):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is _MISSING:
        raise CheckpointError(f"{where}: missing key '{key}'")
    return default


def get_int(cfg: dict, key: str, where: str, default=_MISSING) -> int:
    value = _need(cfg, key, where, default)
    if value is default:
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{where}: '{key}' must be an integer, got {value!r}")
    return value


def get_float(cfg: dict, key: str, where: str, default=_MISSING) -> float:
    value = _need(cfg, key, where, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise CheckpointError(f"{where}: '{key}' must be a number, got {value!r}")
    return float(value)


def llm_config_from_hf(hf: dict, where: str, into):
    """Fill `into` (a model.llm ConfigDict) from a transformers Qwen2/Llama config dict."""
    model_type = hf.get("model_type")
    if model_type not in ("qwen2", "llama"):
        raise CheckpointError(f"{where}: unknown model_type {model_type!r} (expected 'qwen2' "
                              "or 'llama')")
    into.family = model_type
    into.vocab_size = get_int(hf, "vocab_size", where)
    into.hidden_size = get_int(hf, "hidden_size", where)
    into.intermediate_size = get_int(hf, "intermediate_size", where)
    into.num_layers = get_int(hf, "num_hidden_layers", where)
    into.num_heads = get_int(hf, "num_attention_heads", where)
    if into.num_heads <= 0 or into.hidden_size % into.num_heads:
        raise CheckpointError(f"{where}: 'num_attention_heads' = {into.num_heads} does not "
                              f"divide hidden_size = {into.hidden_size}")
    into.num_kv_heads = get_int(hf, "num_key_value_heads", where, into.num_heads)
    into.head_dim = get_int(hf, "head_dim", where, into.hidden_size // into.num_heads)
    into.rms_norm_eps = get_float(hf, "rms_norm_eps", where, 1e-6)
    into.max_position_embeddings = get_int(hf, "max_position_embeddings", where, 4096)
    into.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    into.attention_bias = True if model_type == "qwen2" else bool(hf.get("attention_bias", False))
    rope = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    if not isinstance(rope, dict) or not isinstance(legacy, dict):
        raise CheckpointError(f"{where}: 'rope_parameters'/'rope_scaling' must be objects")
    kind = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    params = {**legacy, **rope}
    into.rope_theta = get_float(rope, "rope_theta", where, get_float(hf, "rope_theta", where, 1e4))
    scaling = f"{where} rope scaling"
    if kind == "default":
        into.rope_scaling.type = "none"
    elif kind in ("linear", "llama3"):
        into.rope_scaling.type = kind
        into.rope_scaling.factor = get_float(params, "factor", scaling)
        if kind == "llama3":
            into.rope_scaling.low_freq_factor = get_float(params, "low_freq_factor", scaling)
            into.rope_scaling.high_freq_factor = get_float(params, "high_freq_factor", scaling)
            into.rope_scaling.original_max_position_embeddings = get_int(
                params, "original_max_position_embeddings", scaling)
    else:
        raise CheckpointError(f"{where}: unsupported rope scaling type {kind!r} "
                              "(supported: default, linear, llama3)")


def llm_config_to_hf(llm) -> dict:
    arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[llm.family]
    rope = {"rope_type": "default", "rope_theta": llm.rope_theta}
    if llm.rope_scaling.type != "none":
        rope["rope_type"] = llm.rope_scaling.type
        rope["factor"] = llm.rope_scaling.factor
    if llm.rope_scaling.type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            rope[key] = llm.rope_scaling[key]
    out = {
        "architectures": [arch], "model_type": llm.family, "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads, "head_dim": llm.head_dim,
        "hidden_act": "silu", "rms_norm_eps": llm.rms_norm_eps,
        "max_position_embeddings": llm.max_position_embeddings,
        "tie_word_embeddings": llm.tie_embeddings, "rope_parameters": rope,
        # transformers 4.x reads these two; 5.x reads rope_parameters.
        "rope_theta": llm.rope_theta,
        "rope_scaling": None if llm.rope_scaling.type == "none" else rope,
    }
    if llm.family == "llama":
        out["attention_bias"] = llm.attention_bias
        out["mlp_bias"] = False
    return out


def vision_config_from_hf(hf: dict, where: str, into):
    if hf.get("model_type") not in ("siglip_vision_model", "siglip"):
        raise CheckpointError(f"{where}: unknown model_type {hf.get('model_type')!r} "
                              "(expected 'siglip_vision_model')")
    hf = hf.get("vision_config", hf) if hf.get("model_type") == "siglip" else hf
    into.enabled = True
    into.hidden_size = get_int(hf, "hidden_size", where)
    into.intermediate_size = get_int(hf, "intermediate_size", where)
    into.num_layers = get_int(hf, "num_hidden_layers", where)
    into.num_heads = get_int(hf, "num_attention_heads", where)
    into.patch_size = get_int(hf, "patch_size", where)
    into.image_size = get_int(hf, "image_size", where)
    into.layer_norm_eps = get_float(hf, "layer_norm_eps", where, 1e-6)
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if not isinstance(act, str):
        raise CheckpointError(f"{where}: 'hidden_act' must be a string, got {act!r}")
    into.hidden_act = act


def vision_config_to_hf(vision) -> dict:
    return {
        "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
        "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
        "num_hidden_layers": vision.num_layers, "num_attention_heads": vision.num_heads,
        "patch_size": vision.patch_size, "image_size": vision.image_size, "num_channels": 3,
        "layer_norm_eps": vision.layer_norm_eps, "hidden_act": vision.hidden_act,
        "vision_use_head": False,
    }


