"""Qwen2 and Llama-3 decoders (GQA, RMSNorm, SwiGLU, RoPE), layers scanned.

The two families differ only in q/k/v biases (`attention_bias`), so one module serves
both; the config's `family` is kept for import/export and chat templates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longvila_jax.kernels import flash_attention
from longvila_jax.models.layers import Linear, RMSNorm, param, scan_layers, stacked
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
        self.q_proj = Linear(d, h * hd, bias=bias, names=("embed", "q_heads"), **kw)
        self.k_proj = Linear(d, kv * hd, bias=bias, names=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, kv * hd, bias=bias, names=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(h * hd, d, bias=False, names=("q_heads", "embed"), **kw)
        self.post_attention_norm = RMSNorm(d, eps=cfg.rms_norm_eps, rngs=rngs,
                                           param_dtype=param_dtype)
        self.gate_proj = Linear(d, cfg.intermediate_size, bias=False, names=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, cfg.intermediate_size, bias=False, names=("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, d, bias=False, names=("mlp", "embed"), **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.attention_backend = attention_backend

    def __call__(self, x, positions, segment_ids, inv_freq, attend=None, return_kv=False):
        """`positions` `[b, s]` rotate q/k; `positions`/`segment_ids` None means the plain
        causal mask, which lets the attention pick a kernel without mask inputs (cuDNN).
        `attend(q, k, v, positions, segment_ids) -> out` replaces the local attention, e.g.
        with sequence-parallel attention when `x` is this device's shard of the sequence, or
        attention over a KV cache when decoding. `return_kv` also returns this layer's
        rotated keys and values `[b, s, kv_heads, head_dim]`, what a KV cache holds."""
        b, s, _ = x.shape
        y = self.input_norm(x)
        q = self.q_proj(y).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(y).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(y).reshape(b, s, self.num_kv_heads, self.head_dim)
        rope_positions = positions
        if positions is None:
            rope_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        q, k = apply_rope(q, rope_positions, inv_freq), apply_rope(k, rope_positions, inv_freq)
        if attend is None:
            attn, _ = flash_attention(q, k, v, q_positions=positions, kv_positions=positions,
                                      q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                      causal=True, backend=self.attention_backend)
        else:
            attn = attend(q, k, v, positions, segment_ids)
        x = x + self.o_proj(attn.reshape(b, s, -1))
        y = self.post_attention_norm(x)
        x = x + self.down_proj(jax.nn.silu(self.gate_proj(y)) * self.up_proj(y))
        return (x, (k, v)) if return_kv else x


class CausalLM(nnx.Module):
    """Token embedding -> scanned decoder layers -> final norm -> logits."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        cfg = model_cfg.llm
        dtype, param_dtype = _dtypes(model_cfg)
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                  param_dtype)
        self.layers = stacked(cfg.num_layers, lambda r: DecoderLayer(
            cfg, dtype=dtype, param_dtype=param_dtype,
            attention_backend=model_cfg.attention_backend, rngs=r), rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs,
                            param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_embeddings else param(
            rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)
        # A tuple, not an array: module attributes that are not Variables must be static.
        self.inv_freq = tuple(inverse_frequencies(cfg.head_dim, cfg.rope_theta,
                                                  cfg.rope_scaling).tolist())
        self.dtype, self.remat = dtype, model_cfg.remat

    def embed(self, input_ids):
        """`[batch, seq]` int -> `[batch, seq, hidden]` in the compute dtype."""
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    def hidden_states(self, x, positions=None, segment_ids=None, attend=None, gather=None):
        """Run all decoder layers and the final norm on embeddings `[batch, seq, hidden]`.

        Positions `[batch, seq]` (None: arange) and segment ids (None: one document per
        row) are global, so packed and sequence-sharded inputs need nothing else; a
        sequence shard also passes `attend` (see `DecoderLayer`), and FSDP-sharded layers
        a `gather` (see `scan_layers`)."""
        x = scan_layers(self.layers, x,
                        lambda layer, h: layer(h, positions, segment_ids, self.inv_freq, attend),
                        remat=self.remat, gather=gather)
        return self.norm(x)

    def hidden_states_and_kv(self, x, positions, attend=None, per_layer=None, segment_ids=None,
                             gather=None):
        """`hidden_states` that also returns every layer's keys and values, each
        `[layers, batch, seq, kv_heads, head_dim]`: prefill fills a KV cache with them, and a
        decode step gets its new token's. `attend(q, k, v, positions, segment_ids, xs)`, if
        given, also receives layer i's slice `xs` of `per_layer` (its part of the cache)."""

        def body(layer, h, xs):
            bound = None if attend is None else (
                lambda q, k, v, p, s: attend(q, k, v, p, s, xs))
            return layer(h, positions, segment_ids, self.inv_freq, bound, return_kv=True)

        x, kv = scan_layers(self.layers, x, body, remat="none", gather=gather, xs=per_layer,
                            collect=True)
        return self.norm(x), kv

    def output_weight(self):
        """The `[hidden, vocab]` output projection in the compute dtype (tied or not)."""
        if self.lm_head is None:
            return self.embed_tokens[...].astype(self.dtype).T
        return self.lm_head[...].astype(self.dtype)

    def logits(self, h):
        """Final hidden `[batch, seq, hidden]` -> float32 logits `[batch, seq, vocab]`."""
        return jnp.dot(h, self.output_weight(), preferred_element_type=jnp.float32)

    def from_embeddings(self, x, positions=None, segment_ids=None, attend=None, gather=None):
        """Logits for input embeddings `[batch, seq, hidden]` (see `hidden_states`)."""
        return self.logits(self.hidden_states(x, positions, segment_ids, attend, gather))

    def __call__(self, input_ids, positions=None, segment_ids=None):
        return self.from_embeddings(self.embed(input_ids), positions, segment_ids)
