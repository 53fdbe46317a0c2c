"""Who sees whom in attention, as one value: global positions and segment ids.

A query sees a key iff they share a segment id and, in causal attention, the key's
position is not after the query's. Positions and segment ids carried with the tokens are
all the mask this project needs: packed documents (segments), sequence shards, ring pieces
and zigzag halves (global positions travel with their tokens), padding (a segment of its
own), a KV cache (each slot's position). One side's pair is a `Tokens`; a `Mask` is the
queries' and the keys' (the habit of Pallas splash attention's `SegmentIds(q, kv)`).
Both are registered pytrees, so they cross `jit`, `shard_map` and collectives whole.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tokens:
    """Global `positions` and `segment_ids`, int32 `[batch, seq]`, of one side's tokens."""

    positions: jax.Array
    segment_ids: jax.Array

    @classmethod
    def default(cls, batch: int, length: int) -> Tokens:
        """Positions 0..length-1, one segment: an unpacked sequence."""
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        return cls(positions, jnp.zeros((batch, length), jnp.int32))

    def split(self, pieces: int) -> list[Tokens]:
        """`pieces` equal runs along the sequence (ring attention's chunks)."""
        return [Tokens(p, s) for p, s in zip(jnp.split(self.positions, pieces, axis=1),
                                             jnp.split(self.segment_ids, pieces, axis=1),
                                             strict=True)]

    def all_gather(self, axis_name) -> Tokens:
        """The whole sequence from its shards on `axis_name` (they are small: Ulysses gives
        every device all of them)."""
        return jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True),
                            self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """The queries' `q` and the keys' `kv` positions and segment ids."""

    q: Tokens
    kv: Tokens

    @classmethod
    def self_attention(cls, positions=None, segment_ids=None) -> Mask:
        """Queries and keys are the same tokens; `positions` None: arange, `segment_ids`
        None: one segment (one of them is needed for the shape)."""
        if positions is None:
            positions = Tokens.default(*segment_ids.shape).positions
        segments = jnp.zeros_like(positions) if segment_ids is None else segment_ids
        tokens = Tokens(positions, segments)
        return cls(tokens, tokens)

    @classmethod
    def default(cls, batch: int, q_len: int, kv_len: int) -> Mask:
        """`Tokens.default` on both sides (what no mask means)."""
        return cls(Tokens.default(batch, q_len), Tokens.default(batch, kv_len))

    def all_gather(self, axis_name) -> Mask:
        return Mask(self.q.all_gather(axis_name), self.kv.all_gather(axis_name))

    def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """`(q positions, kv positions, q segments, kv segments)`, as kernels take them."""
        return self.q.positions, self.kv.positions, self.q.segment_ids, self.kv.segment_ids
