"""Sequence-parallel prefill: a long prompt's KV cache, sharded over the mesh, in one pass.

The prompt is laid out as MM-SP's stage two lays out a training sequence
(`schemes.layout_permutation`: zigzag over a ring, natural order for Ulysses) and sharded over
the sequence group (`node` x `local`); every layer runs the scheme's attention and hands its
rotated keys and values out, so each device keeps the cache of its own token shard and no
device ever holds the whole cache. Media positions are filled from a frame-embedding table
(`engine.encode` or the embedding cache), so a video is encoded once however many prompts
and passes read it.

Only the logits of a few chosen positions per row are formed (`window`): the next token
after each prompt, or the answer span a teacher-forced evaluation scores; `[seq, vocab]`
logits of a long video would not fit in memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from longvila_jax.data.batch import Batch
from longvila_jax.kernels import Mask
from longvila_jax.models.longvila import splice_media
from longvila_jax.parallel.mesh import SEQUENCE_AXES
from longvila_jax.parallel.schemes import sequence_parallel_attention

# Inference shares one sequence group among its prompts (no `data` axis over them).
# [batch, seq] tokens, and each layer's [batch, seq, kv_heads, head_dim] keys and values,
# sharded over the sequence group on seq.
TOKENS = P(None, SEQUENCE_AXES)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptCache:
    """Keys and values of a prefilled batch of prompts, in the scheme's token layout.

    `k`/`v` hold one `[batch, seq, kv_heads, head_dim]` array per layer (each read in place
    by decoding, see `models.layers.unstack`), `positions` `[batch, seq]` each slot's
    global position; all are sharded over the sequence group on `seq`. `lengths` `[batch]`
    are the prompt lengths, so slots at positions >= length are padding.
    """

    k: list[jax.Array]
    v: list[jax.Array]
    positions: jax.Array
    lengths: jax.Array


CACHE_SPECS = PromptCache(k=TOKENS, v=TOKENS, positions=TOKENS, lengths=P())


def make_prefill(graphdef, mesh, scheme: str):
    """Jitted `prefill(params, batch, table, window) -> (logits, k, v)`.

    `batch` is a laid-out `data.batch.Batch` (its `media_rows` index `table`, no targets, no
    frames), sharded as `TOKENS`; `table` `[rows, hidden]` holds frame embeddings
    (replicated); `window` `[batch, w]` global positions whose logits are returned, float32
    `[batch, w, vocab]`; k/v (lists over layers) are sharded as `TOKENS`. `params` are
    replicated over `mesh`, with the LLM's layers `unstack`ed.
    `scheme` is a resolved scheme ('none' for a group of one).
    """
    return jax.jit(jax.shard_map(_pass(graphdef, scheme), mesh=mesh, in_specs=IN_SPECS,
                                 out_specs=(P(), TOKENS, TOKENS)))


def make_window_logits(graphdef, mesh, scheme: str):
    """Jitted `window_logits(params, batch, table, window) -> logits`: `make_prefill`'s
    logits alone, for teacher-forced scoring (the KV cache is never written out)."""
    window_pass = _pass(graphdef, scheme)
    return jax.jit(jax.shard_map(lambda *args: window_pass(*args)[0], mesh=mesh,
                                 in_specs=IN_SPECS, out_specs=P()))


IN_SPECS = (P(), TOKENS, P(), P())


def _pass(graphdef, scheme: str):
    """The per-device pass both share: `(window logits, k, v)` of this device's tokens."""

    def attend(q, k, v, mask, spec, _):
        return sequence_parallel_attention(q, k, v, mask, spec, scheme=scheme)[0]

    def local(params, batch: Batch, table, window):
        model = nnx.merge(graphdef, params)
        x = splice_media(model.llm.embed(batch.input_ids), table, batch.media_rows)
        positions = batch.positions
        if scheme == "none":  # natural order on one device: the plain causal kernel (cuDNN)
            h, (k, v) = model.llm.hidden_states_and_kv(x, None)
        else:
            mask = Mask.self_attention(positions, batch.segment_ids)
            h, (k, v) = model.llm.hidden_states_and_kv(x, mask, attend)
        # The window's hidden states, wherever they live: one-hot rows, summed over shards.
        pick = (positions[:, :, None] == window[:, None, :]).astype(h.dtype)
        picked = jnp.einsum("bsw,bsd->bwd", pick, h, preferred_element_type=jnp.float32)
        picked = jax.lax.psum(picked, SEQUENCE_AXES).astype(h.dtype)
        return model.llm.logits(picked), k, v

    return local
