"""LoRA adapters: the adapted decoder against a float64 numpy forward of merged kernels.

The reference is test_llm's textbook decoder run on `W + A @ B * alpha / rank` merged in
float64 here; adapters are drawn random (B too, so the adapter path is exercised), and
merging, gradients and checkpoint loading are each pinned against the unmerged model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_llm import TOL, forward, llm_params, random_batch, random_llm_config, reference_logits

from longvila_jax.checkpoint import build_model, load_model, model_params, save_checkpoint
from longvila_jax.config.schema import LORA_TARGETS
from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.models.layers import Linear
from longvila_jax.models.lora import (
    LORA_FILTER,
    LoRALinear,
    apply_lora,
    is_lora_path,
    merge_lora,
    merge_lora_params,
)
from longvila_jax.models.loss import next_token_loss


def lora_config(rng, targets=LORA_TARGETS, **llm_kwargs):
    cfg = random_llm_config(rng, attention_bias=bool(rng.integers(2)), **llm_kwargs)
    cfg.model.lora.rank = 4
    cfg.model.lora.alpha = float(rng.uniform(2.0, 8.0))
    cfg.model.lora.targets = ",".join(targets)
    return cfg


def base_of(cfg):
    base = cfg.copy_and_resolve_references()
    base.model.lora.rank = 0
    return base


def batch(rng, cfg, size=2):
    return random_batch(rng, cfg.model.llm.vocab_size, size, int(rng.integers(5, 9)))


def adapters(model) -> dict:
    return {k: v for k, v in model_params(model).items() if is_lora_path(k)}


@pytest.mark.parametrize("scan", [True, False])
def test_adapted_logits_match_float64_merged_reference(rng, random_model, scan):
    cfg = lora_config(rng)
    cfg.model.scan_layers = scan  # unrolled: the adapters unstacked with their layers
    model = random_model(lambda: build_model(cfg))  # lora_b drawn random, not zero
    layers, lora = model.llm.layers, cfg.model.lora
    assert all(isinstance(getattr(layers, t), LoRALinear) for t in LORA_TARGETS)
    ids, positions, segments = batch(rng, cfg)
    got = np.asarray(forward(model, ids, positions, segments))
    p = llm_params(model.llm)
    for name in LORA_TARGETS:
        a = np.asarray(getattr(layers, name).lora_a[...], np.float64)
        b = np.asarray(getattr(layers, name).lora_b[...], np.float64)
        assert np.abs(b).min() > 0
        p[name] = p[name] + np.einsum("lir,lro->lio", a, b) * lora.alpha / lora.rank
    for row in range(ids.shape[0]):
        want = reference_logits(p, cfg.model.llm, ids[row], positions[row], segments[row])
        assert np.max(np.abs(got[row] - want)) <= TOL, row
    # The adapters must matter: the base kernels alone give other logits.
    base = llm_params(model.llm)
    unadapted = reference_logits(base, cfg.model.llm, ids[0], positions[0], segments[0])
    assert np.max(np.abs(got[0] - unadapted)) > 1e-2


def test_fresh_adapters_leave_the_model_unchanged(rng, random_model):
    cfg = lora_config(rng, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    model = random_model(lambda: build_model(base_of(cfg)))
    base_params = model_params(model)
    ids, positions, segments = batch(rng, cfg)
    want = np.asarray(forward(model, ids, positions, segments))
    apply_lora(model, cfg.model.lora, nnx.Rngs(int(rng.integers(2**31))))
    params = model_params(model)
    # Base paths unchanged; each target gains lora_a [layers, in, r], lora_b [layers, r, out].
    assert {k: v for k, v in params.items() if not is_lora_path(k)}.keys() == base_params.keys()
    num_layers = cfg.model.llm.num_layers
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        d_in, d_out = base_params[("llm", "layers", name, "kernel")].shape[1:]
        a, b = params[("llm", "layers", name, "lora_a")], params[("llm", "layers", name, "lora_b")]
        assert a.shape == (num_layers, d_in, 4) and b.shape == (num_layers, 4, d_out)
        assert a.dtype == b.dtype == jnp.float32
        assert np.all(np.asarray(b) == 0) and np.all(np.asarray(a) != 0)
        var = getattr(model.llm.layers, name).lora_b
        assert var.get_metadata()["out_sharding"] == ("layers", None, None)  # FSDP: never axis 0
    assert len(adapters(model)) == 8
    # x @ A @ B adds exact zeros, but the compiled forward may fuse and round the base
    # products differently once the adapters are in it: equal to float32 rounding (seed
    # 1774979948 differed by 7e-7 on the base commit too).
    np.testing.assert_allclose(np.asarray(forward(model, ids, positions, segments)), want,
                               rtol=1e-5, atol=1e-6)


def test_apply_lora_rank_zero_is_a_no_op(rng, random_model):
    cfg = lora_config(rng)
    cfg.model.lora.rank = 0
    model = random_model(lambda: build_model(cfg))
    assert apply_lora(model, cfg.model.lora, nnx.Rngs(0)) is model
    assert not adapters(model) and not isinstance(model.llm.layers.q_proj, LoRALinear)


def test_merge_matches_adapted_model(rng, random_model):
    cfg = lora_config(rng)
    model = random_model(lambda: build_model(cfg))
    ids, positions, segments = batch(rng, cfg)
    want = np.asarray(forward(model, ids, positions, segments))
    unmerged = model_params(model)
    assert merge_lora(model) is model
    assert not nnx.state(model, LORA_FILTER)
    for name in LORA_TARGETS:
        linear = getattr(model.llm.layers, name)
        assert type(linear) is Linear
        assert linear.kernel.get_metadata()["out_sharding"][0] == "layers"
    got = np.asarray(forward(model, ids, positions, segments))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # The flat (checkpoint) merge is the same function: bit-identical kernels.
    merged = model_params(model)
    flat = merge_lora_params(unmerged, cfg.model.lora)
    assert flat.keys() == merged.keys()
    for key, value in merged.items():
        np.testing.assert_array_equal(flat[key], np.asarray(value), err_msg="/".join(key))


def test_merge_lora_params_is_float32_math_in_the_param_dtype(rng):
    layers, d_in, d_out, rank, alpha = 2, 12, 10, 3, float(rng.uniform(1, 32))
    kernel = rng.normal(size=(layers, d_in, d_out)) / np.sqrt(d_in)
    a, b = rng.normal(size=(layers, d_in, rank)), rng.normal(size=(layers, rank, d_out))
    flat = {("x", "kernel"): jnp.asarray(kernel, jnp.bfloat16),
            ("x", "lora_a"): jnp.asarray(a, jnp.bfloat16),
            ("x", "lora_b"): jnp.asarray(b, jnp.bfloat16),
            ("x", "bias"): jnp.asarray(rng.normal(size=d_out), jnp.bfloat16)}
    out = merge_lora_params(flat, ml_collections.ConfigDict(dict(rank=rank, alpha=alpha)))
    assert out.keys() == {("x", "kernel"), ("x", "bias")}
    assert out[("x", "kernel")].dtype == jnp.bfloat16
    f64 = {k: np.asarray(v, np.float64) for k, v in flat.items()}
    want = f64[("x", "kernel")] + np.einsum("lir,lro->lio", f64[("x", "lora_a")],
                                            f64[("x", "lora_b")]) * alpha / rank
    # One bf16 rounding of the exact value (8 significant bits).
    np.testing.assert_allclose(np.asarray(out[("x", "kernel")], np.float64), want,
                               rtol=2**-8, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[("x", "bias")]), np.asarray(flat[("x", "bias")]))


def test_gradients_reach_only_the_adapters(rng, random_model):
    cfg = lora_config(rng)
    model = random_model(lambda: build_model(cfg))  # lora_b random
    ids, positions, segments = batch(rng, cfg)
    labels = ids.copy()
    labels[:, 0] = IGNORE_INDEX

    def loss(m):
        logits = m(jnp.asarray(ids), positions=jnp.asarray(positions),
                   segment_ids=jnp.asarray(segments))
        return next_token_loss(logits, jnp.asarray(labels))

    grad = nnx.jit(lambda m: nnx.value_and_grad(loss, argnums=nnx.DiffState(0, LORA_FILTER))(m))

    def check(fresh):
        loss0, grads = grad(model)
        flat = {tuple(str(p) for p in path): np.asarray(v[...])
                for path, v in nnx.to_flat_state(grads)}
        assert flat.keys() == adapters(model).keys()
        for key, g in flat.items():
            assert np.isfinite(g).all()
            # With B = 0 (as initialised) dL/dA = x^T (dL/dy) B^T = 0 while dL/dB is not.
            if fresh and key[-1] == "lora_a":
                assert np.all(g == 0), key
            else:
                assert np.abs(g).max() > 0, key
        # One SGD step on the adapters alone lowers the loss and leaves base weights alone.
        before = model_params(model)
        state = nnx.state(model, LORA_FILTER)
        nnx.update(model, jax.tree.map(lambda p, g: p - 1e-2 * g, state, grads))
        after = model_params(model)
        for key, value in after.items():
            changed = not np.array_equal(np.asarray(value), np.asarray(before[key]))
            assert changed == (key in flat and not (fresh and key[-1] == "lora_a")), key
        assert float(grad(model)[0]) < float(loss0)

    check(fresh=False)
    for name in LORA_TARGETS:
        var = getattr(model.llm.layers, name).lora_b
        var[...] = jnp.zeros_like(var[...])
    check(fresh=True)


def test_load_base_checkpoint_with_lora_config(rng, random_model, tmp_path):
    cfg = lora_config(rng, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    base_cfg = base_of(cfg)
    model = random_model(lambda: build_model(base_cfg))
    ckpt = save_checkpoint(tmp_path / "base", base_cfg, model_params(model))
    ids, positions, segments = batch(rng, cfg)
    want = np.asarray(forward(model, ids, positions, segments))
    loaded = load_model(ckpt, cfg)
    assert isinstance(loaded.llm.layers.q_proj, LoRALinear)
    fresh = adapters(loaded)
    assert len(fresh) == 8
    assert all(np.all(np.asarray(v) == 0) for k, v in fresh.items() if k[-1] == "lora_b")
    assert all(np.all(np.asarray(v) != 0) for k, v in fresh.items() if k[-1] == "lora_a")
    # Fresh adapters come from config.seed: reloading draws the same ones.
    again = adapters(load_model(ckpt, cfg))
    assert all(np.array_equal(np.asarray(again[k]), np.asarray(v)) for k, v in fresh.items())
    np.testing.assert_allclose(np.asarray(forward(loaded, ids, positions, segments)), want,
                               rtol=1e-5, atol=1e-6)  # rounding only (see above)


def test_lora_checkpoint_round_trip_and_merged_export(rng, random_model, tmp_path):
    cfg = lora_config(rng)
    model = random_model(lambda: build_model(cfg))
    ids, positions, segments = batch(rng, cfg)
    want = np.asarray(forward(model, ids, positions, segments))
    params = model_params(model)
    ckpt = save_checkpoint(tmp_path / "lora", cfg, params)
    loaded = load_model(ckpt)
    np.testing.assert_allclose(np.asarray(forward(loaded, ids, positions, segments)), want,
                               rtol=1e-5, atol=1e-6)  # rounding only (see above)
    # Trained adapters are never silently dropped by a config without them.
    with pytest.raises(KeyError, match="lora_a"):
        load_model(ckpt, base_of(cfg))
    # A merged checkpoint is a plain base checkpoint.
    merged = save_checkpoint(tmp_path / "merged", base_of(cfg),
                             merge_lora_params(params, cfg.model.lora))
    got = np.asarray(forward(load_model(merged), ids, positions, segments))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
