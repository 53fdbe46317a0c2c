"""Sequence-parallel attention on the GPUs at hand, through the kernels `auto` picks (on
Hopper our Mosaic GPU forward and backward), against the blockwise XLA reference
on one device (bf16 inputs, fp32 reference).

On GPU the ring makes no `lax.cond` around piece pairs (the kernel skips hidden tiles
itself), so hidden pairs really run the kernel with nothing visible: this checks that
path, forward and gradients. With one GPU the ring has one rank (its zigzag pieces still
include a hidden pair); with several, every scheme runs over all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from numerics import rel_err

from longvila_jax.kernels import AttentionSpec, Mask, flash_attention
from longvila_jax.parallel import layout_permutation, make_mesh, sequence_parallel_attention
from longvila_jax.parallel.mesh import SEQUENCE_AXES

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def schemes(n):
    out = [("ring", n, 1)]
    if n > 1:
        out += [("ulysses", 1, n)]
    if n >= 4 and n % 2 == 0:
        out += [("2d", 2, n // 2)]
    return out


@jax.jit(static_argnums=0)
def out_and_grads(attend, q, k, v, d_out, pos, seg):
    """Under jit: jax 0.11.2 cannot run shard_map of a custom_vjp (symbolic zeros) eagerly."""
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, pos, seg), q, k, v)
    return (out, *vjp(d_out))


@pytest.mark.parametrize("packed", [False, True])
def test_schemes_match_xla_on_one_device(rng, packed):
    n = jax.device_count()
    b, heads, kv_heads, d = 1, 8, 2, 128
    seq = 2 * n * 512
    q = jnp.asarray(rng.standard_normal((b, seq, heads, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((b, seq, kv_heads, d)), jnp.bfloat16)
            for _ in range(2))
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
    seg = np.sort(rng.integers(0, 4, (b, seq)), 1) if packed else np.zeros((b, seq))
    seg = jnp.asarray(seg, jnp.int32)

    def reference(q, k, v):
        return flash_attention(q, k, v, Mask.self_attention(segment_ids=seg),
                               AttentionSpec(backend="xla"))[0]

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want_out, vjp = jax.vjp(reference, *f32)
    want = (want_out, *vjp(d_out.astype(jnp.float32)))
    for scheme, node, local in schemes(n):
        perm = layout_permutation(seq, scheme, node, local)
        pos = jnp.asarray(np.broadcast_to(perm.astype(np.int32), (b, seq)))
        spec = P(None, SEQUENCE_AXES)
        sharded = jax.shard_map(
            lambda q, k, v, p, s, scheme=scheme: sequence_parallel_attention(
                q, k, v, Mask.self_attention(p, s), AttentionSpec(), scheme=scheme)[0],
            mesh=make_mesh(1, node, local), in_specs=(spec,) * 5, out_specs=spec)
        got = out_and_grads(sharded, *(x[:, perm] for x in (q, k, v, d_out)), pos,
                            seg[:, perm])
        undo = np.argsort(perm)
        for name, g, w in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
            g = np.asarray(g.astype(jnp.float32))[:, undo]
            assert not np.isnan(g).any(), (scheme, name)
            assert rel_err(g, w) <= 1e-2, (scheme, name, rel_err(g, w))
