"""Run checkpoints: resharding restores, keep-N and `every`, the data iterator's position,
a save killed half-way, and one-line errors for bad input."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.parallel.mesh import AXES, make_mesh
from longvila_jax.train.run_checkpoint import RunCheckpoints

ALL = AXES  # one dimension split over all 8 devices


def abstract(state, sharding_of):
    """ShapeDtypeStructs of `state` with `sharding_of(key path string, shape)`."""
    def leaf(path, x):
        shape = np.shape(x)
        dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype  # python scalars
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_of(jax.tree_util.keystr(path),
                                                                       shape))
    return jax.tree_util.tree_map_with_path(leaf, state)


def assert_same_values(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_restore_onto_other_meshes(tmp_path, rng):
    mesh = make_mesh(2, 2, 2)
    split_rows, split_cols = NamedSharding(mesh, P(ALL, None)), NamedSharding(mesh, P(None, ALL))
    state = {
        "params": {
            "w": jax.device_put(rng.standard_normal((16, 8)).astype(np.float32), split_rows),
            "emb": jax.device_put(jnp.asarray(rng.standard_normal((8, 24)), jnp.bfloat16),
                                  split_cols),
            "b": jax.device_put(rng.standard_normal(8).astype(np.float32),
                                NamedSharding(mesh, P())),
        },
        "step": int(rng.integers(1, 1000)),
    }
    with RunCheckpoints(tmp_path / "run", keep=2, every=1) as ckpt:
        assert ckpt.save(state["step"], state)
        ckpt.wait()

        one = SingleDeviceSharding(jax.devices()[0])
        restored = ckpt.restore(None, abstract(state, lambda key, shape: one))
        assert_same_values(restored, state)
        assert all(x.sharding == one for x in jax.tree.leaves(restored))

        mesh8 = make_mesh(1, 1, 8)
        specs = {"['params']['w']": P(None, "local"), "['params']['emb']": P("local", None),
                 "['params']['b']": P("local"), "['step']": P()}
        wanted = abstract(state, lambda key, shape: NamedSharding(mesh8, specs[key]))
        restored = ckpt.restore(state["step"], wanted)
        assert_same_values(restored, state)
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(wanted), strict=True):
            assert got.sharding == want.sharding
            assert got.dtype == want.dtype


def test_optax_state_namedtuples_round_trip(tmp_path, rng):
    model = nnx.Linear(4, 8, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    updates, opt_state = tx.update(grads, opt_state, params)  # mu, nu, count all nonzero
    state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": 1}

    with RunCheckpoints(tmp_path / "run", keep=1, every=1, async_save=False) as ckpt:
        ckpt.save(1, state)
        one = SingleDeviceSharding(jax.devices()[0])
        restored = ckpt.restore(1, abstract(jax.eval_shape(lambda: state), lambda k, s: one))
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert_same_values(restored, state)


def test_keep_and_every(tmp_path, rng):
    state = {"w": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)}
    with RunCheckpoints(tmp_path / "keep", keep=2, every=1) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, state)
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5
    assert sorted(p.name for p in (tmp_path / "keep").iterdir() if p.is_dir()) == ["4", "5"]

    with RunCheckpoints(tmp_path / "every", keep=5, every=3) as ckpt:
        assert not ckpt.save(1, state)  # an empty directory does not save its first step
        assert ckpt.save(3, state)
        assert not ckpt.save(4, state)
        assert ckpt.save(5, state, force=True)
        assert ckpt.save(6, state)
        ckpt.wait()
        assert ckpt.all_steps() == [3, 5, 6]


def test_data_iterator_resumes_where_saved(tmp_path, rng):
    seed, offset = int(rng.integers(1 << 30)), int(rng.integers(1, 1000))

    def dataset():
        return (grain.MapDataset.range(100).shuffle(seed=seed).map(lambda x: x + offset)
                .batch(2).to_iter_dataset())

    state = {"w": jnp.asarray(rng.standard_normal(3), jnp.float32)}
    iterator = iter(dataset())
    for _ in range(7):
        next(iterator)
    with RunCheckpoints(tmp_path / "run", keep=1, every=1) as ckpt:
        ckpt.save(7, state, iterator)
        expected = [next(iterator) for _ in range(3)]  # the save must not see these
        ckpt.wait()
        fresh = iter(dataset())
        (saved,) = ckpt.data_states(None)  # one process, one file
        fresh.set_state(saved)
    got = [next(fresh) for _ in range(3)]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from longvila_jax.train.run_checkpoint import RunCheckpoints

    directory, seed = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(seed)
    w, big = rng.standard_normal((4, 8), np.float32), rng.standard_normal((256, 1024), np.float32)
    huge = rng.standard_normal((8192, 1024), np.float32)  # 32 MiB: still writing when killed
    ckpt = RunCheckpoints(directory, keep=3, every=1)
    ckpt.save(1, {"w": w, "big": big})
    ckpt.save(2, {"w": w + 1, "big": big + 1})
    ckpt.wait()
    ckpt.save(3, {"w": w + 2, "big": huge})
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_async_save_is_never_latest(tmp_path, rng):
    directory, seed = tmp_path / "run", int(rng.integers(1 << 30))
    child = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(directory), str(seed)],
                           capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert list(directory.glob("3.orbax-checkpoint-tmp*")), sorted(directory.iterdir())

    child_rng = np.random.default_rng(seed)
    w = child_rng.standard_normal((4, 8), np.float32)
    big = child_rng.standard_normal((256, 1024), np.float32)
    one = SingleDeviceSharding(jax.devices()[0])
    with RunCheckpoints(directory, keep=3, every=1) as ckpt:
        assert ckpt.latest_step() == 2
        restored = ckpt.restore(None, abstract({"w": w, "big": big}, lambda k, s: one))
        np.testing.assert_array_equal(np.asarray(restored["w"]), w + 1)
        np.testing.assert_array_equal(np.asarray(restored["big"]), big + 1)
        assert ckpt.save(3, restored)  # the resumed run saves the killed step again
    assert not list(directory.glob("*.orbax-checkpoint-tmp*"))
    assert sorted(p.name for p in directory.iterdir() if p.is_dir()) == ["1", "2", "3"]


def test_bad_input_errors(tmp_path, rng):
    one = SingleDeviceSharding(jax.devices()[0])
    state = {"a": {"w": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)},
             "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}
    with (RunCheckpoints(tmp_path / "empty", keep=1, every=1) as ckpt,
          pytest.raises(FileNotFoundError) as e):
        ckpt.restore(None, abstract(state, lambda k, s: one))
    assert str(tmp_path / "empty") in str(e.value) and "\n" not in str(e.value)

    with RunCheckpoints(tmp_path / "run", keep=1, every=1) as ckpt:
        ckpt.save(1, state)
        with pytest.raises(FileNotFoundError, match="step 2"):
            ckpt.restore(2, abstract(state, lambda k, s: one))
        renamed = {"a": state["a"], "c": state["b"]}
        with pytest.raises(ValueError, match="'c'"):
            ckpt.restore(1, abstract(renamed, lambda k, s: one))
        missing = {"a": state["a"]}
        with pytest.raises(ValueError, match="'b'"):
            ckpt.restore(1, abstract(missing, lambda k, s: one))
        reshaped = {"a": {"w": jnp.ones((4, 9))}, "b": state["b"]}
        with pytest.raises(ValueError, match="'a/w'"):
            ckpt.restore(1, abstract(reshaped, lambda k, s: one))
        unsharded = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        with pytest.raises(ValueError, match=r"'a/w'.*sharding"):
            ckpt.restore(1, unsharded)
        with pytest.raises(ValueError, match="no data position"):
            ckpt.data_states(1)
