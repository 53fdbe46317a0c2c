"""Ulysses attention over 8 simulated devices against one-device `flash_attention`.

`flash_attention` itself is pinned to a float64 numpy reference in tests/kernels; here the
whole sequence goes through it on one device, so any error in the all-to-alls, the gathered
positions and segment ids, or the GQA head mapping shows up as a mismatch in out, lse or
the gradients of a random-cotangent loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from numerics import rel_err

from longvila_jax.kernels import AttentionSpec, Mask, flash_attention
from longvila_jax.parallel import HeadLayout, head_layout, make_mesh, ulysses_attention

FP32_RTOL = 1e-5
HEAD_DIM = 8
SEQ_SPEC = P("data", "local")  # batch over data, sequence over local, heads replicated


def packed_masks(rng, batch, length, documents):
    """Sorted segment ids and positions that restart at 0 in every document."""
    seg = np.sort(rng.integers(0, documents, (batch, length)), axis=1).astype(np.int32)
    index = np.arange(length)
    starts = np.array([[np.flatnonzero(row == s)[0] for s in row] for row in seg])
    return (index - starts).astype(np.int32), seg


def draw(rng, batch, length, heads, kv_heads):
    def normal(shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q = normal((batch, length, heads, HEAD_DIM))
    k, v = (normal((batch, length, kv_heads, HEAD_DIM)) for _ in range(2))
    d_out = normal(q.shape)
    d_lse = normal((batch, heads, length))
    return q, k, v, d_out, d_lse


def with_grads(attention, q, k, v, pos, seg, d_out, d_lse):
    """`(out, lse, (dq, dk, dv))` of `sum(out * d_out) + sum(lse * d_lse)`."""

    @jax.jit
    def run(q, k, v, pos, seg, d_out, d_lse):
        def loss(q, k, v):
            out, lse = attention(q, k, v, pos, seg)
            return jnp.sum(out * d_out) + jnp.sum(lse * d_lse), (out, lse)

        (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        return out, lse, grads

    return run(q, k, v, pos, seg, d_out, d_lse)


def single_device(causal):
    def attention(q, k, v, pos, seg):
        return flash_attention(q, k, v, Mask.self_attention(pos, seg),
                               AttentionSpec(causal, backend="xla"))

    return attention


def sharded(mesh, causal):
    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(SEQ_SPEC,) * 3 + (SEQ_SPEC, SEQ_SPEC),
                       out_specs=(SEQ_SPEC, P("data", None, "local")))
    def attention(q, k, v, pos, seg):
        return ulysses_attention(q, k, v, Mask.self_attention(pos, seg),
                                 AttentionSpec(causal, backend="xla"))

    return attention


def sharded_no_masks(mesh, causal):
    """Positions and segment ids omitted: `arange` and one segment over the full sequence."""

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(SEQ_SPEC,) * 3,
                       out_specs=(SEQ_SPEC, P("data", None, "local")))
    def attention(q, k, v):
        return ulysses_attention(q, k, v, None, AttentionSpec(causal, backend="xla"))

    return lambda q, k, v, pos, seg: attention(q, k, v)


def assert_close(actual, expected):
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), jax.tree.leaves(actual),
                          jax.tree.leaves(expected), strict=True):
        err = rel_err(a, e)
        assert err < FP32_RTOL, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dims, heads, kv_heads, causal", [
    ((1, 1, 8), 16, 2, True),    # kv heads repeated 4x
    ((2, 1, 4), 16, 2, False),   # kv heads repeated 2x, batch over data
    ((1, 1, 8), 32, 4, True),    # kv heads repeated 2x
    ((1, 1, 8), 8, 8, False),    # one query and one kv head per device
    ((2, 1, 4), 16, 8, True),    # kv heads split 2 per device, no repeat
])
def test_packed_matches_single_device(rng, dims, heads, kv_heads, causal):
    batch, length = 2, 8 * dims[2]
    q, k, v, d_out, d_lse = draw(rng, batch, length, heads, kv_heads)
    pos, seg = packed_masks(rng, batch, length, documents=3)
    args = (q, k, v, pos, seg, d_out, d_lse)
    expected = with_grads(single_device(causal), *args)
    assert_close(with_grads(sharded(make_mesh(*dims), causal), *args), expected)


@pytest.mark.parametrize("causal", [True, False])
def test_default_masks_span_the_full_sequence(rng, causal):
    batch, length = 2, 32
    q, k, v, d_out, d_lse = draw(rng, batch, length, 8, 2)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    seg = np.zeros((batch, length), np.int32)
    args = (q, k, v, pos, seg, d_out, d_lse)
    expected = with_grads(single_device(causal), *args)
    assert_close(with_grads(sharded_no_masks(make_mesh(2, 1, 4), causal), *args), expected)


def test_padding_with_an_unmatched_segment(rng):
    """The caller pads to a multiple of n; pad tokens get a segment id no real token has."""
    batch, length, padded, heads, kv_heads = 2, 27, 32, 8, 4
    q, k, v, d_out, d_lse = draw(rng, batch, length, heads, kv_heads)
    pos, seg = packed_masks(rng, batch, length, documents=2)
    expected = with_grads(single_device(True), q, k, v, pos, seg, d_out, d_lse)

    def pad(x, axis, value=0):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, padded - length)
        return jnp.pad(x, widths, constant_values=value)

    pad_args = (pad(q, 1), pad(k, 1), pad(v, 1), pad(pos, 1), pad(seg, 1, value=-1),
                pad(d_out, 1), pad(d_lse, 2))  # zero cotangents: pads add nothing to the loss
    out, lse, (dq, dk, dv) = with_grads(sharded(make_mesh(1, 1, 8), True), *pad_args)
    assert_close((out[:, :length], lse[..., :length],
                  (dq[:, :length], dk[:, :length], dv[:, :length])), expected)
    assert not np.any(dk[:, length:]) and not np.any(dv[:, length:])


@pytest.mark.parametrize("heads, kv_heads, n, want", [
    (16, 2, 8, HeadLayout(2, 8, 4, padded=False)),   # KV repeated 4x
    (16, 8, 4, HeadLayout(8, 2, 1, padded=False)),   # KV split, 2 per device
    (32, 8, 8, HeadLayout(8, 4, 1, padded=False)),   # Llama-3-8B over 8
    (28, 4, 4, HeadLayout(4, 7, 1, padded=False)),   # Qwen2-7B over 4
    (28, 4, 8, HeadLayout(4, 8, 2, padded=True)),    # Qwen2-7B over 8: 32 query heads
    (28, 28, 8, HeadLayout(32, 1, 1, padded=True)),  # MHA: pad KV heads, not 2x copies
    (12, 3, 2, HeadLayout(3, 4, 2, padded=False)),   # neither KV count nor n divides
    (6, 2, 4, HeadLayout(2, 4, 2, padded=True)),
])
def test_head_layout_is_the_cheapest_even_split(heads, kv_heads, n, want):
    layout = head_layout(heads, kv_heads, n)
    assert layout == want
    copies = layout.kv_heads * layout.repeat
    assert layout.query_heads % n == 0 and copies % n == 0
    assert layout.group % layout.repeat == 0 and layout.query_heads >= heads


def test_head_layout_rejects_uneven_groups():
    with pytest.raises(ValueError, match="num_heads=12 is not a multiple of num_kv_heads=8"):
        head_layout(12, 8, 4)


@pytest.mark.parametrize("dims, heads, kv_heads", [
    ((1, 1, 8), 14, 2),  # Qwen2-7B's 7 query heads per KV head, 8-way: pad 14 -> 16
    ((2, 1, 4), 3, 3),   # MHA, 3 heads 4-way: a zero KV head and its query head
    ((4, 1, 2), 12, 3),  # KV repeated 2x with no padding
])
def test_heads_that_do_not_split_are_padded_exactly(rng, dims, heads, kv_heads):
    """Padded heads must not leak into the real heads' out, lse or gradients."""
    batch, length = dims[0], 8 * dims[2]
    q, k, v, d_out, d_lse = draw(rng, batch, length, heads, kv_heads)
    pos, seg = packed_masks(rng, batch, length, documents=2)
    args = (q, k, v, pos, seg, d_out, d_lse)
    expected = with_grads(single_device(True), *args)
    assert_close(with_grads(sharded(make_mesh(*dims), True), *args), expected)
