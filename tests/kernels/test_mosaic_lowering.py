"""The Mosaic GPU forward and backward lower to CUDA kernels on this CPU.

Running it needs a Hopper GPU (tests/gpu checks its numbers against the XLA reference);
lowering needs none, and it runs Pallas' tracing and Mosaic GPU's layout inference, where
most kernel mistakes surface. So CI catches them: for odd lengths (padding), both mask
kinds, GQA, and inside shard_map with positions that vary over the mesh (a loop bound
read from such an input once failed JAX's carry-type check there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.kernels import AttentionSpec, Mask, mosaic


def lower(f, *args):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,skv,head_dim", [(256, 256, 128), (200, 333, 64)])
def test_forward_lowers_for_cuda(causal, sq, skv, head_dim):
    q = jax.ShapeDtypeStruct((2, sq, 8, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, skv, 2, head_dim), jnp.bfloat16)
    spec = AttentionSpec(causal, head_dim**-0.5, "mosaic")
    text = lower(lambda q, k, v: mosaic.forward(q, k, v, Mask.default(2, sq, skv), spec),
                 q, kv, kv)
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,skv,head_dim", [(256, 256, 128), (200, 333, 64)])
def test_backward_lowers_for_cuda(causal, sq, skv, head_dim):
    q = jax.ShapeDtypeStruct((2, sq, 8, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, skv, 2, head_dim), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((2, 8, sq), jnp.float32)
    spec = AttentionSpec(causal, head_dim**-0.5, "mosaic")

    def grads(q, k, v, out, lse, d_out, d_lse):
        return mosaic.backward(q, k, v, Mask.default(2, sq, skv), out, lse, d_out, d_lse, spec)

    text = lower(grads, q, kv, kv, q, lse, q, lse)
    assert text.count("mosaic_gpu") >= 1


def test_forward_and_backward_lower_inside_shard_map_with_varying_positions():
    mesh = jax.make_mesh((2,), ("sp",), devices=jax.devices()[:2])
    spec = AttentionSpec(True, 128**-0.5, "mosaic")

    def local(q, k, v, positions):
        return mosaic.forward(q, k, v, Mask.self_attention(positions), spec)

    sharded = NamedSharding(mesh, P(None, "sp"))
    q = jax.device_put(jnp.ones((1, 512, 4, 128), jnp.bfloat16), sharded)
    kv = jax.device_put(jnp.ones((1, 512, 2, 128), jnp.bfloat16), sharded)
    positions = jax.device_put(jnp.arange(512, dtype=jnp.int32)[None], sharded)
    f = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "sp"),) * 4,
                      out_specs=(P(None, "sp"), P(None, None, "sp")))
    assert "mosaic_gpu" in lower(f, q, kv, kv, positions)

    def local_grads(q, k, v, positions):
        out, lse = mosaic.forward(q, k, v, Mask.self_attention(positions), spec)
        return mosaic.backward(q, k, v, Mask.self_attention(positions), out, lse, out, None,
                               spec)

    f = jax.shard_map(local_grads, mesh=mesh, in_specs=(P(None, "sp"),) * 4,
                      out_specs=(P(None, "sp"),) * 3)
    assert "mosaic_gpu" in lower(f, q, kv, kv, positions)
