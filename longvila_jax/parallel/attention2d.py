"""LongVILA's 2D attention (as in USP): Ulysses inside a host, ring attention across hosts.

Within the `local` axis an all-to-all trades sequence shards for head shards over NVLink;
across the `node` axis the head-sharded sequence runs ring attention, whose point-to-point
traffic suits the slower links between hosts. Degrees of 1 collapse to pure ring
(`local` = 1) or pure Ulysses (`node` = 1).

Sequence layout: zigzag over the ring (`ring.zigzag_permutation(seq, node)`), then an even
split over the `node` x `local` devices, node-major; positions carry the global order.
"""

from __future__ import annotations

from longvila_jax.kernels import AttentionSpec, Mask
from longvila_jax.parallel.ring import ring_attention
from longvila_jax.parallel.ulysses import ulysses


def attention_2d(q, k, v, mask: Mask, spec: AttentionSpec, *, node_axis="node",
                 local_axis="local"):
    """Exact attention over a sequence sharded on (`node_axis`, `local_axis`); local (out, lse).

    Call inside `shard_map` over both axes. Local q `[b, s, h, d]`, k/v `[b, s, kh, d]`, the
    mask's positions and segments `[b, s]` with global values (required: the zigzag layout
    needs them).
    """
    def ring(q, k, v, mask):
        return ring_attention(q, k, v, mask, spec, axis_name=node_axis)

    return ulysses(ring, q, k, v, mask, axis_name=local_axis)
