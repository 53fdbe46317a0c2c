"""Ulysses (DeepSpeed) sequence parallelism: trade the sequence shard for a head shard.

Called inside a `shard_map` whose `axis_name` (normally `"local"`) splits the sequence into
`n` contiguous chunks. One all-to-all turns each device's `[b, s/n, h, d]` into the full
sequence for `h/n` heads, attention runs unsharded over the sequence, and a second all-to-all
turns the result back. Sequence lengths must be a multiple of `n`: padding is the caller's
job, with pad tokens given a segment id no real token has so that no real query sees them.

Heads need not divide `n`. `head_layout` finds the cheapest padding that makes them split
(Qwen2-7B's 28 query / 4 KV heads over 8 devices: 32 query heads, each KV head twice), so
Ulysses runs at any degree; the padded heads are wasted work (here 4/32 = 12.5 %), which is
why LongVILA's 2D attention keeps the all-to-all degree to what the heads allow.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from longvila_jax.kernels import AttentionSpec, Mask, flash_attention


class HeadLayout(NamedTuple):
    """How `h` query / `kh` KV heads are laid out for an all-to-all over `n` devices.

    KV heads are padded with zero heads to `kv_heads`, each repeated `repeat` times, and each
    KV head's query group is padded with zero query heads to `group`. Device i then holds
    copies `[i*m, (i+1)*m)` (`m = kv_heads * repeat / n`) and the `group / repeat` query
    heads of each, in the order `flash_attention`'s GQA mapping expects.
    """

    kv_heads: int
    group: int
    repeat: int
    padded: bool

    @property
    def query_heads(self) -> int:
        return self.kv_heads * self.group


def head_layout(num_heads: int, num_kv_heads: int, n: int) -> HeadLayout:
    """The layout with the fewest query heads (then KV heads) that splits evenly over `n`.

    Each candidate KV count `kv` (from `num_kv_heads` up to the next multiple of `n`) needs
    `n / gcd(n, kv)` copies of each KV head to split over `n`, and every copy needs the same
    number of query heads, so the group is rounded up to a multiple of the copies.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"ulysses: num_heads={num_heads} is not a multiple of "
                         f"num_kv_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    best = None
    for kv in range(num_kv_heads, -(-num_kv_heads // n) * n + 1):
        repeat = n // math.gcd(n, kv)
        padded_group = -(-group // repeat) * repeat
        if best is None or kv * padded_group < best.query_heads:
            best = HeadLayout(kv, padded_group, repeat,
                              padded=(kv, padded_group) != (num_kv_heads, group))
    return best


def _pad_heads(q, k, v, layout: HeadLayout):
    """q `[b, s, h, d]` -> `[b, s, kv*group, d]`; k, v -> `[b, s, kv*repeat, d]`."""
    b, s, h, d = q.shape
    kh = k.shape[2]
    if layout.padded:
        q = q.reshape(b, s, kh, h // kh, d)
        q = jnp.pad(q, ((0, 0), (0, 0), (0, layout.kv_heads - kh),
                        (0, layout.group - h // kh), (0, 0)))
        q = q.reshape(b, s, layout.query_heads, d)
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, layout.kv_heads - kh), (0, 0)))
                for x in (k, v))
    if layout.repeat > 1:
        k, v = (jnp.repeat(x, layout.repeat, axis=2) for x in (k, v))
    return q, k, v


def _unpad_heads(out, lse, heads: int, kv_heads: int, layout: HeadLayout):
    """Drop the padded heads: out `[b, s, H, d]` -> `[b, s, h, d]`, lse `[b, H, s]` likewise."""
    if not layout.padded:
        return out, lse
    b, s, _, d = out.shape
    group = heads // kv_heads
    out = out.reshape(b, s, layout.kv_heads, layout.group, d)[:, :, :kv_heads, :group]
    lse = lse.reshape(b, layout.kv_heads, layout.group, s)[:, :kv_heads, :group]
    return out.reshape(b, s, heads, d), lse.reshape(b, heads, s)


def _seq_to_heads(x, axis_name):
    """`[b, s/n, h, d]` sequence-sharded -> `[b, s, h/n, d]`; device i gets heads chunk i."""
    return jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def ulysses(attend, q, k, v, mask: Mask | None, *, axis_name="local"):
    """Run `attend` on the full sequence for `h/n` heads; results come back sequence-sharded.

    `attend(q, k, v, mask) -> (out, lse)` sees q `[b, s, h/n, d]` (s: the whole sequence of
    this `axis_name` group) and the whole sequence's mask (None stays None). This is the
    Ulysses half of 2D attention, where `attend` is ring attention over the other axis.

    GQA: when `n > kh` each KV head is repeated before the all-to-all, the least replication
    that gives every device the KV heads its query heads use (query head j uses KV head
    j // (h/kh), and the contiguous head chunks keep that); heads that cannot split are
    padded (`head_layout`).
    """
    n = jax.lax.axis_size(axis_name)
    heads, kv_heads = q.shape[2], k.shape[2]
    layout = head_layout(heads, kv_heads, n)
    q, k, v = (_seq_to_heads(x, axis_name) for x in _pad_heads(q, k, v, layout))
    out, lse = attend(q, k, v, None if mask is None else mask.all_gather(axis_name))
    out = jax.lax.all_to_all(out, axis_name, split_axis=1, concat_axis=2, tiled=True)
    lse = jax.lax.all_to_all(lse, axis_name, split_axis=2, concat_axis=1, tiled=True)
    return _unpad_heads(out, lse, heads, kv_heads, layout)


def ulysses_attention(q, k, v, mask: Mask | None, spec: AttentionSpec, *, axis_name="local"):
    """`flash_attention` over a sequence sharded along `axis_name`; returns `(out, lse)`.

    Local q `[b, s/n, h, d]`, k/v `[b, s/n, kh, d]`, the mask's positions and segment ids
    `[b, s/n]` (global values; None means `arange` and one segment over the whole
    sequence). Returns out `[b, s/n, h, d]` and lse `[b, h, s/n]` float32, both sharded like
    the input sequence.
    """
    return ulysses(lambda q, k, v, mask: flash_attention(q, k, v, mask, spec), q, k, v, mask,
                   axis_name=axis_name)
