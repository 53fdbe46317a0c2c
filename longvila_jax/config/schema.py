"""Config schema (ml_collections) and up-front validation.

Every key a model config may hold is created here with its type; config files in
`configs/` only override values. `validate` raises `ConfigError` naming the key, so a
wrong value fails before any array is allocated.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from longvila_jax.kernels.attention import BACKENDS

LLM_FAMILIES = ("qwen2", "llama")
PROJECTORS = ("mlp2x_gelu", "mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix")
ROPE_SCALING = ("none", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
VISION_ACTS = ("gelu_pytorch_tanh", "gelu")


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the dotted key."""


def base_config() -> ml_collections.ConfigDict:
    """All keys with types and neutral defaults (a tiny text+vision model)."""
    llm = ml_collections.ConfigDict()
    llm.family = "qwen2"
    llm.vocab_size = 256
    llm.hidden_size = 64
    llm.intermediate_size = 128
    llm.num_layers = 2
    llm.num_heads = 4
    llm.num_kv_heads = 2
    llm.head_dim = 16
    llm.rms_norm_eps = 1e-6
    llm.rope_theta = 10000.0
    llm.rope_scaling = ml_collections.ConfigDict(
        dict(type="none", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=8192))
    llm.max_position_embeddings = 4096
    llm.tie_embeddings = False
    llm.attention_bias = True

    vision = ml_collections.ConfigDict()
    vision.enabled = True
    vision.hidden_size = 32
    vision.intermediate_size = 64
    vision.num_layers = 3
    vision.num_heads = 4
    vision.patch_size = 14
    vision.image_size = 56
    vision.layer_norm_eps = 1e-6
    vision.select_layer = -2
    vision.hidden_act = "gelu_pytorch_tanh"

    projector = ml_collections.ConfigDict()
    projector.type = "mlp_downsample"

    media = ml_collections.ConfigDict()
    media.media_token_id = 255
    # Token whose embedding LongVILA appends after each video frame; None for images only.
    media.newline_token_id = config_dict.placeholder(int)

    model = ml_collections.ConfigDict()
    model.llm = llm
    model.vision = vision
    model.projector = projector
    model.media = media
    model.dtype = "float32"
    model.param_dtype = "float32"
    model.remat = False
    model.attention_backend = "auto"

    # Device mesh: `data` x the sequence-parallel group `node` (across hosts, ring) x
    # `local` (inside a host, all-to-all); `attention` picks the scheme (parallel/schemes.py).
    parallel = ml_collections.ConfigDict()
    parallel.data = 1
    parallel.node = 1
    parallel.local = 1
    parallel.attention = "auto"

    # Optimizer (train/optimizer.py). Defaults follow the Hugging Face Trainer that LongVILA
    # trains with: AdamW (0.9, 0.999, 1e-8), linear warmup then cosine decay, clipping at 1.
    optim = ml_collections.ConfigDict()
    optim.learning_rate = 2e-5
    optim.warmup_steps = 0
    optim.total_steps = 1000
    optim.end_lr_fraction = 0.0
    optim.weight_decay = 0.0
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8
    optim.clip_norm = 1.0  # 0: no clipping
    optim.accumulation_steps = 1

    config = ml_collections.ConfigDict()
    config.model = model
    config.parallel = parallel
    config.optim = optim
    config.seed = 0
    return config


def _check(cond: bool, key: str, value, why: str):
    if not cond:
        raise ConfigError(f"{key}: invalid value {value!r} ({why})")


def _positive_int(cfg, prefix: str, names):
    for name in names:
        value = cfg[name]
        _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
               f"{prefix}.{name}", value, "expected a positive integer")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every model key; return the config unchanged or raise `ConfigError`."""
    if "model" not in config:
        raise ConfigError("model: missing (a config must hold a `model` section)")
    model = config.model
    known = set(base_config().model.keys())
    for key in model.keys():
        _check(key in known, f"model.{key}", model[key], f"unknown key; known: {sorted(known)}")
    llm = model.llm
    _check(llm.family in LLM_FAMILIES, "model.llm.family", llm.family, f"one of {LLM_FAMILIES}")
    _positive_int(llm, "model.llm", ["vocab_size", "hidden_size", "intermediate_size",
                                     "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                     "max_position_embeddings"])
    _check(llm.num_heads % llm.num_kv_heads == 0, "model.llm.num_kv_heads", llm.num_kv_heads,
           f"must divide num_heads={llm.num_heads}")
    _check(llm.head_dim % 2 == 0, "model.llm.head_dim", llm.head_dim, "RoPE needs an even size")
    _check(llm.rope_theta > 1, "model.llm.rope_theta", llm.rope_theta, "must be > 1")
    _check(llm.rms_norm_eps > 0, "model.llm.rms_norm_eps", llm.rms_norm_eps, "must be > 0")
    scaling = llm.rope_scaling
    _check(scaling.type in ROPE_SCALING, "model.llm.rope_scaling.type", scaling.type,
           f"one of {ROPE_SCALING}")
    if scaling.type != "none":
        _check(scaling.factor >= 1, "model.llm.rope_scaling.factor", scaling.factor, "must be >= 1")
    if scaling.type == "llama3":
        _check(scaling.high_freq_factor > scaling.low_freq_factor,
               "model.llm.rope_scaling.high_freq_factor", scaling.high_freq_factor,
               "must exceed low_freq_factor")

    vision = model.vision
    if vision.enabled:
        _positive_int(vision, "model.vision", ["hidden_size", "intermediate_size", "num_layers",
                                               "num_heads", "patch_size", "image_size"])
        _check(vision.hidden_size % vision.num_heads == 0, "model.vision.num_heads",
               vision.num_heads, f"must divide hidden_size={vision.hidden_size}")
        _check(vision.image_size >= vision.patch_size, "model.vision.image_size",
               vision.image_size, f"smaller than patch_size={vision.patch_size}")
        _check(-vision.num_layers <= vision.select_layer < 0 or
               0 < vision.select_layer <= vision.num_layers, "model.vision.select_layer",
               vision.select_layer, f"must index hidden states of {vision.num_layers} layers")
        _check(vision.hidden_act in VISION_ACTS, "model.vision.hidden_act", vision.hidden_act,
               f"one of {VISION_ACTS}")
        _check(model.projector.type in PROJECTORS, "model.projector.type", model.projector.type,
               f"one of {PROJECTORS}")
        media_id = model.media.media_token_id
        _check(isinstance(media_id, int) and 0 <= media_id < llm.vocab_size,
               "model.media.media_token_id", media_id, f"must be in [0, {llm.vocab_size})")
        newline = model.media.newline_token_id
        _check(newline is None or 0 <= newline < llm.vocab_size, "model.media.newline_token_id",
               newline, f"must be None or in [0, {llm.vocab_size})")
    _check(model.attention_backend in BACKENDS, "model.attention_backend",
           model.attention_backend, f"one of {BACKENDS}")
    for key in ("dtype", "param_dtype"):
        _check(model[key] in DTYPES, f"model.{key}", model[key], f"one of {DTYPES}")
    if "parallel" in config:
        _validate_parallel(config.parallel, llm)
    if "optim" in config:
        _validate_optim(config.optim)
    return config


def _validate_optim(optim):
    _positive_int(optim, "optim", ["total_steps", "accumulation_steps"])
    _check(isinstance(optim.warmup_steps, int) and 0 <= optim.warmup_steps < optim.total_steps,
           "optim.warmup_steps", optim.warmup_steps,
           f"must be in [0, total_steps={optim.total_steps})")
    _check(optim.learning_rate > 0, "optim.learning_rate", optim.learning_rate, "must be > 0")
    _check(0 <= optim.end_lr_fraction <= 1, "optim.end_lr_fraction", optim.end_lr_fraction,
           "must be in [0, 1]")
    _check(optim.weight_decay >= 0, "optim.weight_decay", optim.weight_decay, "must be >= 0")
    for key in ("b1", "b2"):
        _check(0 <= optim[key] < 1, f"optim.{key}", optim[key], "must be in [0, 1)")
    _check(optim.eps > 0, "optim.eps", optim.eps, "must be > 0")
    _check(optim.clip_norm >= 0, "optim.clip_norm", optim.clip_norm, "must be >= 0 (0: off)")


def _validate_parallel(parallel, llm):
    # Imported here: the parallel package imports the kernels, which import this module.
    from longvila_jax.parallel.mesh import check_ulysses
    from longvila_jax.parallel.schemes import SCHEMES, resolve_scheme, ulysses_degree

    _positive_int(parallel, "parallel", ["data", "node", "local"])
    _check(parallel.attention in SCHEMES, "parallel.attention", parallel.attention,
           f"one of {SCHEMES}")
    try:
        scheme = resolve_scheme(parallel.attention, parallel.node, parallel.local)
        check_ulysses(llm.num_heads, llm.num_kv_heads,
                      ulysses_degree(scheme, parallel.node, parallel.local))
    except ValueError as e:
        raise ConfigError(f"parallel: {e} (node={parallel.node}, local={parallel.local}, "
                          f"attention={parallel.attention!r})") from None
