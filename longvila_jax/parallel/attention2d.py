"""LongVILA's 2D attention (as in USP): Ulysses inside a host, ring attention across hosts.

Within the `local` axis an all-to-all trades sequence shards for head shards over NVLink;
across the `node` axis the head-sharded sequence runs ring attention, whose point-to-point
traffic suits the slower links between hosts. Degrees of 1 collapse to pure ring
(`local` = 1) or pure Ulysses (`node` = 1).

Sequence layout: zigzag over the ring (`ring.zigzag_permutation(seq, node)`), then an even
split over the `node` x `local` devices, node-major; positions carry the global order.
"""

from __future__ import annotations

from longvila_jax.parallel.ring import ring_attention
from longvila_jax.parallel.ulysses import ulysses


def attention_2d(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *,
                 causal: bool, node_axis: str = "node", local_axis: str = "local",
                 softmax_scale: float | None = None, backend: str = "auto"):
    """Exact attention over a sequence sharded on (`node_axis`, `local_axis`); local (out, lse).

    Call inside `shard_map` over both axes. Local q `[b, s, h, d]`, k/v `[b, s, kh, d]`,
    positions/segments `[b, s]` with global values (required: the zigzag layout needs them).
    """
    def ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        return ring_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal=causal,
                              axis_name=node_axis, softmax_scale=softmax_scale, backend=backend)

    return ulysses(ring, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                   axis_name=local_axis)
