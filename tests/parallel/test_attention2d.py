"""2D attention (Ulysses over `local` x ring over `node`) equals one-device attention.

Layouts (node, local) in {(8,1), (1,8), (2,4), (4,2)} on 8 simulated CPU devices: zigzag
over the ring, then an even node-major split. Out, lse and the gradients of a jit'd
`jax.grad` through the sharded attention match `flash_attention` on the whole sequence
(fp32, relative 1e-5), causal or not, packed or not, with GQA (KV heads replicated when the
Ulysses degree exceeds them) and a padded length.
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
from longvila_jax.parallel import attention_2d, make_mesh, zigzag_permutation
from longvila_jax.parallel.mesh import SEQUENCE_AXES

RTOL = 1e-5
PAD_SEGMENT = -1  # no real token carries it


@functools.cache
def sharded_grads(node, local, causal):
    mesh = make_mesh(1, node, local)
    seq, lse_spec = P(None, SEQUENCE_AXES), P(None, None, SEQUENCE_AXES)

    def attend(q, k, v, pos, seg):
        return attention_2d(q, k, v, Mask.self_attention(pos, seg), AttentionSpec(causal))

    sharded = jax.shard_map(attend, mesh=mesh, in_specs=(seq,) * 5, out_specs=(seq, lse_spec))

    @jax.jit
    def run(q, k, v, pos, seg, d_out, d_lse):
        def loss(q, k, v):
            out, lse = sharded(q, k, v, pos, seg)
            finite = jnp.isfinite(lse)
            return (jnp.sum(out * d_out) + jnp.sum(jnp.where(finite, lse * d_lse, 0.0)),
                    (out, lse))

        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            q, k, v)
        return out, lse, *grads

    return run


@functools.partial(jax.jit, static_argnums=6)
def reference(q, k, v, seg, d_out, d_lse, causal):
    def loss(q, k, v):
        out, lse = flash_attention(q, k, v, Mask.self_attention(segment_ids=seg),
                                   AttentionSpec(causal, backend="xla"))
        finite = jnp.isfinite(lse)
        return jnp.sum(out * d_out) + jnp.sum(jnp.where(finite, lse * d_lse, 0.0)), (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, *grads


@pytest.mark.parametrize("node,local", [(8, 1), (1, 8), (2, 4), (4, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_2d_equals_single_device(rng, node, local, causal, packed):
    b, heads, kv_heads, d = 2, 8, 2, 8  # local=8 > kv_heads: KV heads get replicated
    real = 2 * node * local * int(rng.integers(1, 3)) - int(rng.integers(0, 3))
    seq = -(-real // (2 * node * local)) * 2 * node * local  # pad to the layout's multiple
    q = rng.standard_normal((b, seq, heads, d)).astype(np.float32)
    k = rng.standard_normal((b, seq, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((b, seq, kv_heads, d)).astype(np.float32)
    seg = (np.sort(rng.integers(0, 3, (b, seq)), 1) if packed else np.zeros((b, seq))).astype(
        np.int32)
    seg[:, real:] = PAD_SEGMENT
    d_out = rng.standard_normal(q.shape).astype(np.float32)
    d_lse = rng.standard_normal((b, heads, seq)).astype(np.float32)

    perm = zigzag_permutation(seq, node)
    pos = np.broadcast_to(perm.astype(np.int32), (b, seq))
    got = sharded_grads(node, local, causal)(q[:, perm], k[:, perm], v[:, perm], pos,
                                             seg[:, perm], d_out[:, perm], d_lse[:, :, perm])
    want = reference(q, k, v, seg, d_out, d_lse, causal)
    undo = np.argsort(perm)
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv"], got, want, strict=True):
        g = np.asarray(g)
        g = g[:, :, undo] if name == "lse" else g[:, undo]
        assert not np.isnan(g).any(), name
        if name == "lse":
            assert (np.isneginf(g) == np.isneginf(np.asarray(w))).all()
            g, w = g[np.isfinite(g)], np.asarray(w)[np.isfinite(g)]
        assert rel_err(g, w) <= RTOL, (name, rel_err(g, w))
