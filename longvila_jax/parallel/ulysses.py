"""Ulysses (DeepSpeed) sequence parallelism: trade the sequence shard for a head shard.

Called inside a `shard_map` whose `axis_name` (normally `"local"`) splits the sequence into
`n` contiguous chunks. One all-to-all turns each device's `[b, s/n, h, d]` into the full
sequence for `h/n` heads, attention runs unsharded over the sequence, and a second all-to-all
turns the result back. Sequence lengths must be a multiple of `n`: padding is the caller's
job, with pad tokens given a segment id no real token has so that no real query sees them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longvila_jax.kernels import flash_attention
from longvila_jax.parallel.mesh import check_ulysses


def _seq_to_heads(x, axis_name):
    """`[b, s/n, h, d]` sequence-sharded -> `[b, s, h/n, d]`; device i gets heads chunk i."""
    return jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def _gather_seq(x, axis_name):
    """`[b, s/n]` -> `[b, s]`: positions and segment ids are small, so every device gets all."""
    return None if x is None else jax.lax.all_gather(x, axis_name, axis=1, tiled=True)


def ulysses(attend, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *,
            axis_name: str = "local"):
    """Run `attend` on the full sequence for `h/n` heads; results come back sequence-sharded.

    `attend(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids) -> (out, lse)`
    sees q `[b, s, h/n, d]` (s: the whole sequence of this `axis_name` group). This is the
    Ulysses half of 2D attention, where `attend` is ring attention over the other axis.

    GQA: when `n > kh` each KV head is repeated `n // kh` times before the all-to-all, the
    least replication that gives every device the one KV head its `h/n` query heads use
    (query head j uses KV head j // (h/kh), and the contiguous head chunks keep that).
    """
    n = jax.lax.axis_size(axis_name)
    heads, kv_heads = q.shape[2], k.shape[2]
    check_ulysses(heads, kv_heads, n)
    if kv_heads < n:
        k, v = (jnp.repeat(x, n // kv_heads, axis=2) for x in (k, v))
    q, k, v = (_seq_to_heads(x, axis_name) for x in (q, k, v))
    out, lse = attend(q, k, v, *(_gather_seq(x, axis_name) for x in (
        q_positions, kv_positions, q_segment_ids, kv_segment_ids)))
    out = jax.lax.all_to_all(out, axis_name, split_axis=1, concat_axis=2, tiled=True)
    lse = jax.lax.all_to_all(lse, axis_name, split_axis=2, concat_axis=1, tiled=True)
    return out, lse


def ulysses_attention(q, k, v, q_positions=None, kv_positions=None, q_segment_ids=None,
                      kv_segment_ids=None, *, causal: bool, axis_name: str = "local",
                      softmax_scale: float | None = None, backend: str = "auto"):
    """`flash_attention` over a sequence sharded along `axis_name`; returns `(out, lse)`.

    Local q `[b, s/n, h, d]`, k/v `[b, s/n, kh, d]`, positions and segment ids `[b, s/n]`
    (global values; None means `arange` / one segment over the whole sequence). Returns out
    `[b, s/n, h, d]` and lse `[b, h, s/n]` float32, both sharded like the input sequence.
    """
    def attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        return flash_attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos,
                               q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal,
                               softmax_scale=softmax_scale, backend=backend)

    return ulysses(attend, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                   axis_name=axis_name)
