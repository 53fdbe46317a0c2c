"""Ring attention on 8 simulated CPU devices equals one-device attention, forward and grads.

The sequence is laid out zigzag (rank i holds chunks i and 2n-1-i), positions are global,
and the reference is `flash_attention` on the whole sequence in its original order.
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
from longvila_jax.parallel.ring import merge, ring_attention, zigzag_permutation

RTOL = 1e-5


@functools.cache
def sharded(n, causal):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("node",))
    seq, heads = P(None, "node"), P(None, None, "node")

    def f(q, k, v, pos, seg):
        return ring_attention(q, k, v, Mask.self_attention(pos, seg), AttentionSpec(causal),
                              axis_name="node")

    ring = jax.shard_map(f, mesh=mesh, in_specs=(seq,) * 5, out_specs=(seq, heads))

    @jax.jit
    def run(q, k, v, pos, seg, d_out, d_lse):
        (out, lse), vjp = jax.vjp(lambda q, k, v: ring(q, k, v, pos, seg), q, k, v)
        return out, lse, *vjp((d_out, d_lse))

    return run


@jax.jit
def reference(q, k, v, seg, d_out, d_lse, causal_flag):
    def f(q, k, v):
        return flash_attention(q, k, v, Mask.self_attention(segment_ids=seg),
                               AttentionSpec(causal_flag, backend="xla"))

    (out, lse), vjp = jax.vjp(f, q, k, v)
    return out, lse, *vjp((d_out, d_lse))


reference = jax.jit(reference.__wrapped__, static_argnums=6)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_ring_equals_single_device(rng, n, causal, packed):
    if jax.device_count() < n:
        pytest.fail(f"needs {n} devices; tests/conftest.py sets 8 CPU devices")
    b, heads, kv_heads, d = 2, 4, 2, 8
    seq = 2 * n * int(rng.integers(2, 5))
    q = rng.standard_normal((b, seq, heads, d)).astype(np.float32)
    k = rng.standard_normal((b, seq, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((b, seq, kv_heads, d)).astype(np.float32)
    seg = (np.sort(rng.integers(0, 4, (b, seq)), 1) if packed else np.zeros((b, seq))).astype(
        np.int32)
    d_out = rng.standard_normal(q.shape).astype(np.float32)
    d_lse = rng.standard_normal((b, heads, seq)).astype(np.float32)

    perm = zigzag_permutation(seq, n)
    pos = np.broadcast_to(perm.astype(np.int32), (b, seq))
    got = sharded(n, causal)(q[:, perm], k[:, perm], v[:, perm], pos, seg[:, perm],
                             d_out[:, perm], d_lse[:, :, perm])
    want = reference(q, k, v, seg, d_out, d_lse, causal)
    undo = np.argsort(perm)
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv"], got, want, strict=True):
        g = np.asarray(g)
        g = g[:, :, undo] if name == "lse" else g[:, undo]
        assert np.isfinite(g).all(), name
        assert rel_err(g, w) <= RTOL, (name, rel_err(g, w))


def test_merge_of_two_halves_is_attention_over_both(rng):
    q = rng.standard_normal((1, 6, 2, 4)).astype(np.float32)
    k = rng.standard_normal((1, 10, 2, 4)).astype(np.float32)
    v = rng.standard_normal((1, 10, 2, 4)).astype(np.float32)
    spec = AttentionSpec(causal=False)
    whole = flash_attention(q, k, v, None, spec)
    a = flash_attention(q, k[:, :4], v[:, :4], None, spec)
    b = flash_attention(q, k[:, 4:], v[:, 4:], None, spec)
    out, lse = merge(*a, *b)
    assert rel_err(out, whole[0]) <= RTOL and rel_err(lse, whole[1]) <= RTOL
    # A side that saw nothing (-inf) leaves the other unchanged; both empty stays empty.
    empty = (jnp.zeros_like(a[0]), jnp.full_like(a[1], -jnp.inf))
    out, lse = merge(*a, *empty)
    assert rel_err(out, a[0]) <= RTOL and rel_err(lse, a[1]) <= RTOL
    out, lse = merge(*empty, *empty)
    assert not np.isnan(np.asarray(out)).any() and np.isneginf(np.asarray(lse)).all()


def test_zigzag_needs_a_multiple_of_twice_the_ring():
    with pytest.raises(ValueError, match="multiple of 2 x ring size"):
        zigzag_permutation(10, 4)
