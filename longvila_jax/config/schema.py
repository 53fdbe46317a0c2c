"""Config schema (ml_collections) and up-front validation.

Every key a model config may hold is created here with its type; configs (the packaged
ones in `longvila_jax/configs/`, users' files) only override values. `validate` raises
`ConfigError` naming the key, so a wrong value fails before any array is allocated. The
config layer sits above the kernels and the parallel schemes (it checks values against
their choices: backends, schemes) and below everything that reads a config; nothing below
it imports it.
"""

from __future__ import annotations

import re

import ml_collections
from ml_collections import config_dict

from longvila_jax.kernels.attention import BACKENDS
from longvila_jax.parallel.schemes import SCHEMES, resolve_scheme

LLM_FAMILIES = ("qwen2", "llama")
PROJECTORS = ("mlp2x_gelu", "mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix")
ROPE_SCALING = ("none", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
VISION_ACTS = ("gelu_pytorch_tanh", "gelu")
REMAT = ("none", "selective", "dots", "offload", "full")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DATA_KINDS = ("conversations", "text")
NONFINITE = ("stop", "skip")
OBJECTIVES = ("next_token", "grpo")
SOURCE_KEYS = ("name", "jsonl", "media_root", "weight")


class ConfigError(ValueError):
    """A config file, key or value is invalid; a key's message starts with the dotted key."""


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
    # Activation rematerialisation per decoder/encoder layer (models/layers.py `REMAT`):
    # none keeps everything, selective keeps only each layer's attention output and LSE
    # (recomputing the cheap matmuls, never the quadratic attention), dots keeps those and
    # every projection's output too (recomputing only elementwise work; Qwen2-1.5B at 32K
    # tokens: 72 GiB against selective's 37, a 5 % faster step), offload keeps selective's set
    # in host memory (device memory for longer contexts, at the cost of host transfers),
    # full keeps only the layer input.
    model.remat = "none"
    # Layers as one `lax.scan` (compile time flat in depth) or unrolled (no stacks of saved
    # activations to zero-fill and copy into: a faster step, a longer compile, more memory;
    # remat none or dots only); see models/layers.py `scan_layers`.
    model.scan_layers = True
    model.attention_backend = "auto"
    # LoRA adapters on the LLM's linear layers (models/lora.py); rank 0: none.
    model.lora = ml_collections.ConfigDict(
        dict(rank=0, alpha=16.0, targets="q_proj,k_proj,v_proj,o_proj"))

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

    # One training run (train/loop.py); the optimizer steps are `optim.total_steps`.
    train = ml_collections.ConfigDict()
    train.stage = "train"  # a name for logs and for the pipeline's stage folders
    train.init_from = ""  # a model checkpoint folder; "": random weights from `seed`
    # Comma-separated regular expressions; a parameter trains when one of them matches
    # its '/'-joined path (e.g. "llm/layers/q_proj/kernel"). Everything else is frozen.
    train.trainable = ".*"
    train.batch_size = 1  # packed rows per step, over all data-parallel replicas
    train.seq_len = 1024  # tokens per packed row
    train.max_frames = 0  # frames per packed row (0: text only)
    train.num_frames = 8  # frames sampled from each video
    train.fps = 0.0  # >0: sample one frame every 1/fps seconds, capped at num_frames
    train.checkpoint_every = 100
    train.keep = 3  # run checkpoints kept
    train.log_every = 10
    train.merge_lora = True  # fold LoRA adapters into the weights of the final checkpoint
    # A step whose loss, gradient norm or new state is not finite is never applied or
    # saved; "stop" ends the run there, "skip" goes on and stops after `nonfinite_limit`
    # such steps in a row (and a state that an update overflowed is never saved).
    train.nonfinite = "stop"
    train.nonfinite_limit = 10
    # Write the samples each step consumed to <workdir>/samples/ (loop._SampleLog).
    train.log_samples = False
    # Dense bf16 peak TFLOP/s per device for MFU; 0: known GPUs by name, else no MFU.
    train.peak_tflops = 0.0

    # What a run optimises: "next_token" (the SFT-style stages, train/loop.py) or "grpo"
    # (reinforcement learning on video questions, rl/loop.py, which reads `rl`).
    train.objective = "next_token"

    # GRPO (rl/loop.py; defaults from Long-RL's configs). A step asks `prompts_per_step`
    # questions, samples `answers` answers to each, and makes `num_iterations` passes of
    # `minibatches` optimizer steps over them.
    rl = ml_collections.ConfigDict()
    rl.questions = ""  # JSONL of {video, question, options, answer} (eval-mcq's format)
    rl.prompts_per_step = 2
    rl.answers = 8
    rl.max_new_tokens = 256
    rl.temperature = 1.0
    rl.top_p = 1.0
    # Comma-separated name=weight; a name is a built-in (rl/rewards.py) or module:function.
    rl.rewards = "mcq_accuracy=0.9,format=0.1"
    rl.drop_equal_groups = False  # DAPO's filter: groups whose rewards are all equal
    rl.clip_low = 0.2
    rl.clip_high = 0.3
    rl.dual_clip = 3.0
    rl.log_ratio_clamp = 20.0
    rl.kl = "low_var_kl"  # or "kl", "mse"
    rl.beta = 0.01  # KL weight; 0: no reference policy
    rl.num_iterations = 1
    rl.minibatches = 1
    # Old log-probabilities: the sampler's ("sampler") or the training forward's again
    # ("recompute": one more pass, exact where the sampler's precision differs).
    rl.old_logprobs = "sampler"
    # Each question's prompt computed once for all its answers in every log-probability
    # pass (rl/shared_prompt.py), exact, on one device or under Ulysses: True, False (rows
    # prompt + answer), or unset (None): wherever it can. One H200, 7B, 256 frames, 2 x 8
    # answers: the step takes 32 s with it, 204 s without; two H200: 19 s, 112 s.
    rl.shared_prompt = config_dict.placeholder(bool)

    # Training data (data/pipeline.py): conversation JSONL with media, or long text.
    data = ml_collections.ConfigDict()
    data.kind = "conversations"
    data.tokenizer = ""  # tokenizer.json or a folder holding it
    # Each source: dict(name, jsonl, media_root, weight); text data uses one {"text"} JSONL.
    data.sources = []
    data.workers = 0  # grain worker processes decoding video

    config = ml_collections.ConfigDict()
    config.model = model
    config.parallel = parallel
    config.optim = optim
    config.train = train
    config.data = data
    config.rl = rl
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
    _check(model.remat in REMAT, "model.remat", model.remat, f"one of {REMAT}")
    _check(isinstance(model.scan_layers, bool), "model.scan_layers", model.scan_layers,
           "true or false")
    # Unrolled, XLA's CSE merges a layer's recomputation with its forward (the checkpoint
    # runs with prevent_cse=False, as a scan allows), so selective/offload/full would keep
    # about what `none` keeps while claiming less; `dots` keeps somewhat more than its set
    # (measured, models/layers.py `scan_layers`).
    _check(model.scan_layers or model.remat in ("none", "dots"), "model.scan_layers",
           model.scan_layers, f"false needs model.remat none or dots, not {model.remat!r}")
    if "lora" in model:
        _validate_lora(model.lora)
    if "parallel" in config:
        _validate_parallel(config.parallel)
    if "optim" in config:
        _validate_optim(config.optim)
    if "train" in config:
        _validate_train(config.train)
    if "data" in config:
        _validate_data(config.data)
    return config


def _validate_lora(lora):
    _check(isinstance(lora.rank, int) and lora.rank >= 0, "model.lora.rank", lora.rank,
           "must be an integer >= 0 (0: no LoRA)")
    _check(lora.alpha > 0, "model.lora.alpha", lora.alpha, "must be > 0")
    targets = [t for t in lora.targets.split(",") if t]
    _check(bool(targets) and all(t in LORA_TARGETS for t in targets), "model.lora.targets",
           lora.targets, f"comma-separated names from {LORA_TARGETS}")


def _validate_train(train):
    _positive_int(train, "train", ["batch_size", "seq_len", "num_frames", "checkpoint_every",
                                   "keep", "log_every", "nonfinite_limit"])
    _check(train.nonfinite in NONFINITE, "train.nonfinite", train.nonfinite,
           f"one of {NONFINITE}")
    _check(isinstance(train.max_frames, int) and train.max_frames >= 0, "train.max_frames",
           train.max_frames, "must be an integer >= 0")
    _check(train.fps >= 0, "train.fps", train.fps, "must be >= 0 (0: uniform sampling)")
    _check(train.peak_tflops >= 0, "train.peak_tflops", train.peak_tflops, "must be >= 0")
    _check(train.objective in OBJECTIVES, "train.objective", train.objective,
           f"one of {OBJECTIVES}")
    patterns = [t for t in train.trainable.split(",") if t]
    _check(bool(patterns), "train.trainable", train.trainable, "needs at least one pattern")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"train.trainable: invalid regular expression {pattern!r} "
                              f"({e})") from None


def _validate_data(data):
    _check(data.kind in DATA_KINDS, "data.kind", data.kind, f"one of {DATA_KINDS}")
    _check(isinstance(data.workers, int) and data.workers >= 0, "data.workers", data.workers,
           "must be an integer >= 0")
    for i, source in enumerate(data.sources):
        keys = set(source.keys())
        _check(keys <= set(SOURCE_KEYS) and {"name", "jsonl"} <= keys, f"data.sources[{i}]",
               dict(source), "keys name, jsonl, optional media_root and weight")
        _check(source.get("weight", 1.0) > 0, f"data.sources[{i}].weight",
               source.get("weight"), "must be > 0")


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


def _validate_parallel(parallel):
    # Any Ulysses degree works for any heads (`parallel.ulysses.head_layout` pads them).
    _positive_int(parallel, "parallel", ["data", "node", "local"])
    _check(parallel.attention in SCHEMES, "parallel.attention", parallel.attention,
           f"one of {SCHEMES}")
    try:
        resolve_scheme(parallel.attention, parallel.node, parallel.local)
    except ValueError as e:
        raise ConfigError(f"parallel: {e} (node={parallel.node}, local={parallel.local}, "
                          f"attention={parallel.attention!r})") from None
