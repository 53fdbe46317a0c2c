"""The config-selected sequence-parallel schemes equal one-device attention, and the config
checks of the `parallel` section fail early with the key named.

On a (2, 4) and a (4, 2) mesh of 8 simulated CPU devices: ring over the whole group,
Ulysses over the whole group and 2D, each in its own token layout, against
`flash_attention` on the whole sequence (fp32, relative 1e-5), forward and gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from numerics import rel_err

from longvila_jax.config import mesh_from_config
from longvila_jax.config.schema import ConfigError, base_config, validate
from longvila_jax.kernels import AttentionSpec, Mask, flash_attention
from longvila_jax.parallel import layout_permutation, resolve_scheme, sequence_parallel_attention
from longvila_jax.parallel.mesh import SEQUENCE_AXES
from longvila_jax.parallel.schemes import host_degrees

RTOL = 1e-5


@functools.cache
def sharded_grads(node, local, scheme):
    config = base_config()
    config.parallel.node, config.parallel.local = node, local
    mesh = mesh_from_config(config)
    seq, lse_spec = P(None, SEQUENCE_AXES), P(None, None, SEQUENCE_AXES)

    def attend(q, k, v, pos, seg):
        return sequence_parallel_attention(q, k, v, Mask.self_attention(pos, seg),
                                           AttentionSpec(causal=True), scheme=scheme)

    sharded = jax.shard_map(attend, mesh=mesh, in_specs=(seq,) * 5, out_specs=(seq, lse_spec))

    @jax.jit
    def run(q, k, v, pos, seg, d_out):
        def loss(q, k, v):
            out, _ = sharded(q, k, v, pos, seg)
            return jnp.sum(out * d_out), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, *grads

    return run


@jax.jit
def reference(q, k, v, seg, d_out):
    def loss(q, k, v):
        out, _ = flash_attention(q, k, v, Mask.self_attention(segment_ids=seg),
                                 AttentionSpec(causal=True, backend="xla"))
        return jnp.sum(out * d_out), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, *grads


@pytest.mark.parametrize("node,local", [(2, 4), (4, 2)])
@pytest.mark.parametrize("scheme", ["ring", "ulysses", "2d"])
def test_scheme_equals_single_device(rng, node, local, scheme):
    check_scheme(rng, node, local, scheme, heads=8, kv_heads=2)  # Ulysses over 8 repeats KV


@pytest.mark.parametrize("scheme", ["ulysses", "2d"])
def test_padded_heads_equal_single_device(rng, scheme):
    """Qwen2-7B's 7 query heads per KV head on a (2, 4) mesh: 14 heads are padded to 16."""
    check_scheme(rng, 2, 4, scheme, heads=14, kv_heads=2)


def check_scheme(rng, node, local, scheme, *, heads, kv_heads):
    b, d = 1, 8
    seq = 2 * node * local * int(rng.integers(2, 4))
    q = rng.standard_normal((b, seq, heads, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, seq, kv_heads, d)).astype(np.float32) for _ in range(2))
    seg = np.sort(rng.integers(0, 3, (b, seq)), 1).astype(np.int32)
    d_out = rng.standard_normal(q.shape).astype(np.float32)
    perm = layout_permutation(seq, scheme, node, local)
    pos = np.broadcast_to(perm.astype(np.int32), (b, seq))
    got = sharded_grads(node, local, scheme)(q[:, perm], k[:, perm], v[:, perm], pos,
                                             seg[:, perm], d_out[:, perm])
    want = reference(q, k, v, seg, d_out)
    undo = np.argsort(perm)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        g = np.asarray(g)[:, undo]
        assert rel_err(g, w) <= RTOL, (name, rel_err(g, w))


@pytest.mark.parametrize("scheme,node,local,want", [
    ("auto", 1, 1, "none"), ("auto", 4, 1, "ring"), ("auto", 1, 4, "ulysses"),
    ("auto", 2, 4, "2d"), ("2d", 1, 8, "ulysses"), ("2d", 8, 1, "ring"),
    ("ring", 2, 4, "ring"), ("ulysses", 2, 4, "ulysses"), ("none", 1, 1, "none")])
def test_resolve_scheme(scheme, node, local, want):
    assert resolve_scheme(scheme, node, local) == want


@pytest.mark.parametrize("scheme,node,local,heads,want", [
    ("auto", 1, 8, (32, 8), "ulysses"),  # Llama-3-8B: 32 heads split over 8
    ("auto", 1, 8, (28, 4), "ring"),  # Qwen2-7B: 28 would be padded to 32
    ("auto", 2, 4, (28, 4), "2d"),  # ... but split over 4
    ("auto", 2, 4, (4, 2), "2d"),  # the tiny model: 4 heads over 4 (KV heads repeated)
    ("auto", 1, 8, (4, 2), "ring"),
    ("ulysses", 1, 8, (28, 4), "ulysses"),  # asked for: padded
])
def test_auto_takes_the_ring_rather_than_pad_heads(scheme, node, local, heads, want):
    assert resolve_scheme(scheme, node, local, heads) == want


@pytest.mark.parametrize("heads,want", [((28, 4), (2, 4)), ((32, 8), (1, 8)), ((4, 2), (2, 4)),
                                        ((3, 3), (8, 1))])
def test_host_degrees_take_the_widest_all_to_all_without_padding(heads, want):
    assert host_degrees(8, heads) == want


def test_layouts_are_permutations_zigzag_only_with_a_ring():
    assert (layout_permutation(32, "ulysses", 2, 4) == np.arange(32)).all()
    for scheme in ("ring", "2d"):
        perm = layout_permutation(48, scheme, 2, 4)
        assert sorted(perm) == list(range(48)) and (perm != np.arange(48)).any()


@pytest.mark.parametrize("changes,message", [
    (dict(attention="zigzag"), "parallel.attention: invalid value 'zigzag'"),
    (dict(attention="none", node=2), "parallel: parallel.attention: 'none' with node=2"),
    (dict(data=0), "parallel.data: invalid value 0"),
])
def test_bad_parallel_section_names_the_key(changes, message):
    config = base_config()  # 4 query heads, 2 KV heads
    for key, value in changes.items():
        config.parallel[key] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(config)


def test_mesh_size_must_match_the_devices():
    config = base_config()
    config.parallel.node, config.parallel.local = 2, 2
    with pytest.raises(ConfigError, match=r"parallel: data\*node\*local = 1\*2\*2 = 4 but "
                                          r"there are 8 devices"):
        mesh_from_config(config)
    config.parallel.data = 2
    assert mesh_from_config(config).shape == {"data": 2, "node": 2, "local": 2}
