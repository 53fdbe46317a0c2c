"""Model FLOPs of a training step, for tokens/s and MFU in the progress bar and benchmarks.

Counted from the config and the batch's masks, not from XLA: matrix multiplies (2 FLOPs
per multiply-add) of every linear layer, plus attention's two products over the keys each
query can actually see (causal, within its packed document), for the LLM and for the vision
tower's frames. Training is 3x the forward (the backward computes gradients for activations
and weights). Rematerialised forwards are not counted: MFU measures useful work.
"""

from __future__ import annotations

import numpy as np

# Dense bf16 peak TFLOP/s per device, from the vendors' data sheets (no sparsity).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0}


def peak_tflops(device_kind: str, configured: float = 0.0) -> float | None:
    """`configured` if > 0, else the table's entry whose name `device_kind` contains."""
    if configured > 0:
        return configured
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_kind), None)


def _llm_linear_params(llm) -> int:
    """Multiply-adds per token of one decoder layer's projections and MLP."""
    d, h, kv, hd = llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.head_dim
    return d * (h + 2 * kv) * hd + h * hd * d + 3 * d * llm.intermediate_size


def visible_pairs(segment_ids: np.ndarray) -> int:
    """Causal (query, key) pairs inside documents: sum of n(n+1)/2 over each row's segments
    (segment 0, padding, is not counted)."""
    total = 0
    for row in np.asarray(segment_ids).reshape(-1, np.shape(segment_ids)[-1]):
        _, counts = np.unique(row[row > 0], return_counts=True)
        total += int((counts * (counts + 1) // 2).sum())
    return total


def llm_flops(model_cfg, tokens: int, pairs: int) -> float:
    """Forward FLOPs of the LLM over `tokens` tokens with `pairs` visible (q, k) pairs."""
    llm = model_cfg.llm
    linear = 2 * tokens * (llm.num_layers * _llm_linear_params(llm)
                           + llm.hidden_size * llm.vocab_size)
    attention = 4 * pairs * llm.num_heads * llm.head_dim * llm.num_layers
    return float(linear + attention)


def vision_flops(model_cfg, frames: int) -> float:
    """Forward FLOPs of the vision tower (layers actually run) and projector for `frames`."""
    v = model_cfg.vision
    if not v.enabled or frames == 0:
        return 0.0
    patches = (v.image_size // v.patch_size) ** 2
    c = v.hidden_size
    select = v.select_layer
    layers = select if select > 0 else v.num_layers + 1 + select
    per_layer = 2 * patches * (4 * c * c + 2 * c * v.intermediate_size) + 4 * patches**2 * c
    embed = 2 * patches * v.patch_size**2 * 3 * c
    # mlp_downsample-style projectors: 4 patches concatenated -> llm width, then llm width.
    d = model_cfg.llm.hidden_size
    projector = 2 * (patches // 4) * (4 * c * d + d * d)
    return float(frames * (embed + layers * per_layer + projector))


def train_step_flops(model_cfg, segment_ids: np.ndarray, frames: int) -> float:
    """Model FLOPs of one training step on a batch with these segment ids `[b, s]` (the
    packed layout, before any sharding permutation) and `frames` real frames."""
    tokens = int((np.asarray(segment_ids) > 0).sum())
    return 3.0 * (llm_flops(model_cfg, tokens, visible_pairs(segment_ids))
                  + vision_flops(model_cfg, frames))
