"""Qwen2 and Llama-3 decoders (GQA, RMSNorm, SwiGLU, RoPE), layers scanned.

The two families differ only in q/k/v biases (`attention_bias`), so one module serves
both; the config's `family` is kept for import/export and chat templates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longvila_jax.kernels import AttentionSpec, Mask, Tokens, flash_attention
from longvila_jax.models.layers import Linear, RMSNorm, param, scan_layers, stacked
from longvila_jax.models.loss import float32_logits
from longvila_jax.models.rope import apply_rope, inverse_frequencies


def _dtypes(model_cfg):
    return jnp.dtype(model_cfg.dtype), jnp.dtype(model_cfg.param_dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm attention + SwiGLU block."""

    def __init__(self, cfg, *, dtype, param_dtype, attention_backend, rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        bias = cfg.attention_bias
        self.input_norm = RMSNorm(d, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.q_proj = Linear(d, h * hd, bias=bias, **kw)
        self.k_proj = Linear(d, kv * hd, bias=bias, **kw)
        self.v_proj = Linear(d, kv * hd, bias=bias, **kw)
        self.o_proj = Linear(h * hd, d, bias=False, **kw)
        self.post_attention_norm = RMSNorm(d, eps=cfg.rms_norm_eps, rngs=rngs,
                                           param_dtype=param_dtype)
        self.gate_proj = Linear(d, cfg.intermediate_size, bias=False, **kw)
        self.up_proj = Linear(d, cfg.intermediate_size, bias=False, **kw)
        self.down_proj = Linear(cfg.intermediate_size, d, bias=False, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        # Static: every attention this layer runs, its sequence-parallel and decoding
        # ones included (they receive it through `attend`), uses the configured backend.
        self.attention = AttentionSpec(causal=True, backend=attention_backend)

    def __call__(self, x, mask: Mask | None, inv_freq, attend=None, cache=None):
        """`(x, (k, v))`: the block's output and its rotated keys and values
        `[b, s, kv_heads, head_dim]` (what a KV cache holds; unused outputs cost nothing).

        `mask`'s query positions rotate q and k; None means the plain causal mask, which
        lets the attention pick a kernel without mask inputs (cuDNN). `attend(q, k, v, mask,
        spec, cache) -> out` replaces the local attention: sequence-parallel attention when
        `x` is this device's shard of the sequence, or attention over `cache` (this layer's
        part of a KV cache) when decoding."""
        b, s, _ = x.shape
        y = self.input_norm(x)
        q = self.q_proj(y).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(y).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(y).reshape(b, s, self.num_kv_heads, self.head_dim)
        positions = Tokens.default(b, s).positions if mask is None else mask.q.positions
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if attend is None:
            attn, _ = flash_attention(q, k, v, mask, self.attention)
        else:
            attn = attend(q, k, v, mask, self.attention, cache)
        x = x + self.o_proj(attn.reshape(b, s, -1))
        y = self.post_attention_norm(x)
        x = x + self.down_proj(jax.nn.silu(self.gate_proj(y)) * self.up_proj(y))
        return x, (k, v)


class CausalLM(nnx.Module):
    """Token embedding -> scanned decoder layers -> final norm -> logits."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        cfg = model_cfg.llm
        dtype, param_dtype = _dtypes(model_cfg)
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype)
        self.layers = stacked(cfg.num_layers, lambda r: DecoderLayer(
            cfg, dtype=dtype, param_dtype=param_dtype,
            attention_backend=model_cfg.attention_backend, rngs=r), rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs,
                            param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_embeddings else param(
            rngs, (cfg.hidden_size, cfg.vocab_size), param_dtype)
        # A tuple, not an array: module attributes that are not Variables must be static.
        self.inv_freq = tuple(inverse_frequencies(cfg.head_dim, cfg.rope_theta,
                                                  cfg.rope_scaling).tolist())
        self.dtype, self.remat = dtype, model_cfg.remat
        self.scan = model_cfg.scan_layers

    def embed(self, input_ids):
        """`[batch, seq]` int -> `[batch, seq, hidden]` in the compute dtype."""
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    def hidden_states(self, x, mask: Mask | None = None, attend=None, gather=None):
        """Run all decoder layers and the final norm on embeddings `[batch, seq, hidden]`.

        The mask's positions and segment ids are global (None: positions arange, one
        document per row), so packed and sequence-sharded inputs need nothing else; a
        sequence shard also passes `attend` (see `DecoderLayer`), and FSDP-sharded layers
        a `gather` (see `scan_layers`)."""
        x, _ = scan_layers(self.layers, x, self._layer(mask, attend), remat=self.remat,
                           gather=gather, scan=self.scan)
        return self.norm(x)

    def hidden_states_and_kv(self, x, mask: Mask | None, attend=None, cache=None,
                             gather=None):
        """`hidden_states` and every layer's keys and values, each `[layers, batch, seq,
        kv_heads, head_dim]`: prefill fills a KV cache with them, and a decode step gets its
        new token's. `attend` receives layer i's slice of `cache` (its part of the cache).
        With `unstack`ed layers (inference), the keys and the values are lists of per-layer
        `[batch, seq, kv_heads, head_dim]` arrays and `cache` is a list of per-layer parts."""
        x, kv = scan_layers(self.layers, x, self._layer(mask, attend), remat="none",
                            gather=gather, xs=cache, scan=self.scan)
        if isinstance(kv, list):
            kv = ([k for k, _ in kv], [v for _, v in kv])
        return self.norm(x), kv

    def _layer(self, mask, attend):
        return lambda layer, h, cache: layer(h, mask, self.inv_freq, attend, cache)

    def output_weight(self):
        """The `[hidden, vocab]` output projection in the compute dtype (tied or not)."""
        if self.lm_head is None:
            return self.embed_tokens[...].astype(self.dtype).T
        return self.lm_head[...].astype(self.dtype)

    def logits(self, h):
        """Final hidden `[batch, seq, hidden]` -> float32 logits `[batch, seq, vocab]`."""
        return float32_logits(h, self.output_weight())

    def from_embeddings(self, x, mask: Mask | None = None, attend=None, gather=None):
        """Logits for input embeddings `[batch, seq, hidden]` (see `hidden_states`)."""
        return self.logits(self.hidden_states(x, mask, attend, gather))

    def __call__(self, input_ids, positions=None, segment_ids=None):
        """Float32 logits; `positions`/`segment_ids` `[batch, seq]` as `Mask.self_attention`
        takes them, both None for the plain causal mask."""
        return self.from_embeddings(self.embed(input_ids), self_mask(positions, segment_ids))


def self_mask(positions=None, segment_ids=None) -> Mask | None:
    """`Mask.self_attention`, or None (the plain causal mask, which cuDNN can serve) when
    neither is given."""
    if positions is None and segment_ids is None:
        return None
    return Mask.self_attention(positions, segment_ids)

