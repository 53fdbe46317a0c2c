"""`flash_attention` against a float64 numpy reference: forward, LSE and the backward pass.

The reference applies the documented rule row by row (a query sees a key iff they share a
segment and, when causal, kv_pos <= q_pos) and writes the softmax-attention backward out
by hand, so it shares no code path with the library's grouped einsums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import rel_err

from longvila_jax.kernels import (
    AttentionSpec,
    Mask,
    Tokens,
    attention,
    flash_attention,
    flash_attention_bwd,
    xla,
)

FP32_RTOL = 1e-5
BF16_RTOL = 2e-2


def reference_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, scale):
    """Dense float64 attention; returns out, lse and the probabilities [b, h, q, kv]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    out = np.zeros((batch, q_len, heads, head_dim))
    lse = np.full((batch, heads, q_len), -np.inf)
    probs = np.zeros((batch, heads, q_len, kv_len))
    for b in range(batch):
        for h in range(heads):
            kh = h // groups
            for i in range(q_len):
                visible = [j for j in range(kv_len) if q_seg[b, i] == kv_seg[b, j]
                           and (not causal or kv_pos[b, j] <= q_pos[b, i])]
                if not visible:
                    continue
                scores = np.array([scale * np.dot(q[b, i, h], k[b, j, kh]) for j in visible])
                top = scores.max()
                weights = np.exp(scores - top)
                total = weights.sum()
                lse[b, h, i] = top + np.log(total)
                for w, j in zip(weights / total, visible, strict=True):
                    probs[b, h, i, j] = w
                    out[b, i, h] += w * v[b, j, kh]
    return out, lse, probs


def reference_backward(q, k, v, out, probs, d_out, d_lse, scale):
    """Analytic float64 gradients of sum(out * d_out) + sum(lse * d_lse) wrt q, k, v."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    heads, kv_heads = q.shape[2], k.shape[2]
    groups = heads // kv_heads
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(q.shape[0]):
        for h in range(heads):
            kh = h // groups
            p = probs[b, h]                                   # [q, kv]
            do = d_out[b, :, h]                               # [q, d]
            dv[b, :, kh] += p.T @ do
            dp = do @ v[b, :, kh].T                           # [q, kv]
            delta = np.sum(do * out[b, :, h], axis=-1, keepdims=True)
            ds = p * (dp - delta) + p * d_lse[b, h][:, None]
            dq[b, :, h] += scale * ds @ k[b, :, kh]
            dk[b, :, kh] += scale * ds.T @ q[b, :, h]
    return dq, dk, dv


def sorted_segments(rng, batch, length, count):
    """Packed-document segment ids: non-decreasing per row."""
    return np.sort(rng.integers(0, count, (batch, length)), axis=1).astype(np.int32)


def random_shape(rng, ratio, head_dim=None):
    """(batch, q_len, kv_len, heads, kv_heads, head_dim) with heads = ratio * kv_heads."""
    kv_heads = int(rng.integers(1, 3))
    return (int(rng.integers(1, 3)), int(rng.integers(1, 10)), int(rng.integers(1, 10)),
            ratio * kv_heads, kv_heads, head_dim or int(rng.choice([4, 8, 16])))


def random_case(rng, *, ratio=None, causal, packed, offset, shape=None, head_dim=None):
    batch, q_len, kv_len, heads, kv_heads, head_dim = shape or random_shape(rng, ratio, head_dim)
    q = rng.normal(size=(batch, q_len, heads, head_dim)).astype(np.float32)
    k = rng.normal(size=(batch, kv_len, kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(batch, kv_len, kv_heads, head_dim)).astype(np.float32)
    if offset:
        # A ring step: this shard's queries start at 37+, the visiting K/V chunk elsewhere.
        q_start = 37 + rng.integers(0, 8, (batch, 1))
        kv_start = rng.integers(30, 45, (batch, 1))
    else:
        q_start = kv_start = np.zeros((batch, 1), np.int64)
    q_pos = (q_start + np.arange(q_len)).astype(np.int32)
    kv_pos = (kv_start + np.arange(kv_len)).astype(np.int32)
    if packed:
        q_seg = sorted_segments(rng, batch, q_len, 3)
        kv_seg = sorted_segments(rng, batch, kv_len, 3)
    else:
        q_seg, kv_seg = np.zeros((batch, q_len), np.int32), np.zeros((batch, kv_len), np.int32)
    return dict(q=q, k=k, v=v, q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg, kv_seg=kv_seg,
                causal=causal)


# Jitted once per shape; tests reuse one shape across masks so each compiles little.
_attention = jax.jit(flash_attention, static_argnames=("spec",))


def mask_of(case) -> Mask:
    return Mask(Tokens(jnp.asarray(case["q_pos"]), jnp.asarray(case["q_seg"])),
                Tokens(jnp.asarray(case["kv_pos"]), jnp.asarray(case["kv_seg"])))


def run(case, scale=None):
    return _attention(jnp.asarray(case["q"]), jnp.asarray(case["k"]), jnp.asarray(case["v"]),
                      mask_of(case), spec=AttentionSpec(case["causal"], scale))


def reference(case, scale=None):
    scale = case["q"].shape[-1] ** -0.5 if scale is None else scale
    return reference_forward(case["q"], case["k"], case["v"], case["q_pos"], case["kv_pos"],
                             case["q_seg"], case["kv_seg"], case["causal"], scale)


def check_forward(out, lse, ref_out, ref_lse, rtol):
    out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    masked = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), masked)
    assert np.isfinite(lse[~masked]).all()
    assert rel_err(out, ref_out) <= rtol
    if (~masked).any():
        assert rel_err(lse[~masked], ref_lse[~masked]) <= rtol
    # Rows that see no key are exactly zero, per head: [b, q, h] vs lse's [b, h, q].
    assert (out[masked.transpose(0, 2, 1)] == 0).all()


@pytest.mark.parametrize("ratio", [1, 4, 7])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_matches_reference(rng, ratio, causal):
    shape = random_shape(rng, ratio)
    for packed, offset in [(False, False), (True, False), (False, True), (True, True)]:
        case = random_case(rng, causal=causal, packed=packed, offset=offset, shape=shape)
        out, lse = run(case)
        assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
        ref_out, ref_lse, _ = reference(case)
        check_forward(out, lse, ref_out, ref_lse, FP32_RTOL)


def test_defaults_mean_arange_positions_and_one_segment(rng):
    case = random_case(rng, ratio=2, causal=True, packed=False, offset=False)
    for causal in (False, True):
        out, lse = _attention(jnp.asarray(case["q"]), jnp.asarray(case["k"]),
                              jnp.asarray(case["v"]), None, spec=AttentionSpec(causal))
        ref_out, ref_lse, _ = reference({**case, "causal": causal})
        check_forward(out, lse, ref_out, ref_lse, FP32_RTOL)


def test_custom_softmax_scale(rng):
    case = random_case(rng, ratio=2, causal=True, packed=True, offset=True)
    scale = float(rng.uniform(0.05, 2.0))
    out, lse = run(case, scale=scale)
    ref_out, ref_lse, _ = reference(case, scale=scale)
    check_forward(out, lse, ref_out, ref_lse, FP32_RTOL)
    # The scale must matter: the default-scale lse differs measurably.
    _, default_lse, _ = reference(case)
    finite = np.isfinite(ref_lse)
    if finite.any() and abs(scale - case["q"].shape[-1] ** -0.5) > 0.02:
        assert rel_err(np.asarray(lse)[finite], default_lse[finite]) > 10 * FP32_RTOL


def masked_rows_case(rng, ratio):
    """Packed case where some query rows carry a segment id that no key has."""
    case = random_case(rng, ratio=ratio, causal=bool(rng.integers(2)), packed=True, offset=True)
    q_len = case["q"].shape[1]
    orphan = rng.random(case["q_seg"].shape) < 0.4
    orphan[0, int(rng.integers(q_len))] = True
    case["q_seg"] = np.where(orphan, 99, case["q_seg"]).astype(np.int32)
    return case, orphan


@pytest.mark.parametrize("ratio", [1, 4])
def test_fully_masked_rows_give_zero_and_minus_inf(rng, ratio):
    case, orphan = masked_rows_case(rng, ratio)
    out, lse = run(case)
    out, lse = np.asarray(out), np.asarray(lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert (out[orphan] == 0).all()
    assert np.isneginf(lse.transpose(0, 2, 1)[orphan]).all()
    ref_out, ref_lse, _ = reference(case)
    check_forward(out, lse, ref_out, ref_lse, FP32_RTOL)


@functools.partial(jax.jit, static_argnames=("spec",))
def _grads(q, k, v, mask, d_out, d_lse, *, spec):
    def loss(q, k, v):
        out, lse = flash_attention(q, k, v, mask, spec)
        finite = jnp.isfinite(lse)
        return (jnp.sum(out.astype(jnp.float32) * d_out)
                + jnp.sum(jnp.where(finite, lse * d_lse, 0.0)))

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def loss_and_grads(case, d_out, d_lse, scale=None):
    """Gradients wrt q, k, v of sum(out * d_out) + sum over finite lse of lse * d_lse."""
    return _grads(*(jnp.asarray(case[n]) for n in "qkv"), mask_of(case), jnp.asarray(d_out),
                  jnp.asarray(d_lse), spec=AttentionSpec(case["causal"], scale))


@pytest.mark.parametrize("ratio", [1, 4, 7])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_analytic_reference(rng, ratio, causal):
    case = random_case(rng, ratio=ratio, causal=causal, packed=True, offset=causal)
    scale = float(rng.uniform(0.1, 1.0))
    ref_out, ref_lse, probs = reference(case, scale=scale)
    d_out = rng.normal(size=ref_out.shape).astype(np.float32)
    d_lse = rng.normal(size=ref_lse.shape).astype(np.float32)
    grads = loss_and_grads(case, d_out, d_lse, scale)
    # The loss ignores lse where it is -inf, so the reference cotangent is zero there.
    d_lse_ref = np.where(np.isfinite(ref_lse), d_lse, 0.0)
    expected = reference_backward(case["q"], case["k"], case["v"], ref_out, probs,
                                  d_out.astype(np.float64), d_lse_ref, scale)
    for name, got, want in zip("qkv", grads, expected, strict=True):
        got = np.asarray(got)
        assert np.isfinite(got).all(), name
        if np.linalg.norm(want) == 0:
            assert (got == 0).all(), name
        else:
            assert rel_err(got, want) <= FP32_RTOL, name


def test_gradients_through_fully_masked_rows(rng):
    case, orphan = masked_rows_case(rng, ratio=int(rng.choice([1, 3])))
    ref_out, ref_lse, probs = reference(case)
    d_out = rng.normal(size=ref_out.shape).astype(np.float32)
    d_lse = rng.normal(size=ref_lse.shape).astype(np.float32)
    dq, dk, dv = (np.asarray(g) for g in loss_and_grads(case, d_out, d_lse))
    for g in (dq, dk, dv):
        assert np.isfinite(g).all()
    assert (dq[orphan] == 0).all()
    scale = case["q"].shape[-1] ** -0.5
    expected = reference_backward(case["q"], case["k"], case["v"], ref_out, probs,
                                  d_out.astype(np.float64),
                                  np.where(np.isfinite(ref_lse), d_lse, 0.0), scale)
    for got, want in zip((dq, dk, dv), expected, strict=True):
        if np.linalg.norm(want) == 0:
            assert (got == 0).all()
        else:
            assert rel_err(got, want) <= FP32_RTOL


@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_inputs(rng, ratio, causal):
    case = random_case(rng, ratio=ratio, causal=causal, packed=True, offset=causal,
                       head_dim=16)
    for name in "qkv":
        # The reference sees exactly the bf16-rounded inputs the kernel sees.
        case[name] = np.asarray(jnp.asarray(case[name], jnp.bfloat16).astype(jnp.float32))
    out, lse = _attention(
        jnp.asarray(case["q"], jnp.bfloat16), jnp.asarray(case["k"], jnp.bfloat16),
        jnp.asarray(case["v"], jnp.bfloat16), mask_of(case), spec=AttentionSpec(causal))
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    ref_out, ref_lse, _ = reference(case)
    check_forward(out.astype(jnp.float32), lse, ref_out, ref_lse, BF16_RTOL)


def test_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        AttentionSpec(backend="cudnn-magic")


def test_rejects_heads_not_multiple_of_kv_heads(rng):
    q = jnp.asarray(rng.normal(size=(1, 4, 5, 8)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.float32)
    with pytest.raises(ValueError, match="kv_heads"):
        flash_attention(q, kv, kv, None, AttentionSpec())


@pytest.mark.parametrize("block_k", [1, 3, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_xla_blocks_and_padding_match_reference(rng, block_k, causal):
    """Several KV blocks, the last one padded: forward and backward stay exact."""
    shape = (2, int(rng.integers(5, 20)), int(rng.integers(9, 24)), 4, 2, 8)
    case = random_case(rng, causal=causal, packed=True, offset=True, shape=shape)
    scale = float(rng.uniform(0.1, 1.0))
    args = [*(jnp.asarray(case[n]) for n in "qkv"), mask_of(case)]
    spec = AttentionSpec(causal, scale, "xla")
    out, lse = xla.forward(*args, spec, block_k=block_k)
    ref_out, ref_lse, probs = reference(case, scale=scale)
    check_forward(out, lse, ref_out, ref_lse, FP32_RTOL)
    d_out = rng.normal(size=ref_out.shape).astype(np.float32)
    d_lse = np.where(np.isfinite(ref_lse), rng.normal(size=ref_lse.shape), 0).astype(np.float32)
    grads = xla.backward(*args, out, lse, jnp.asarray(d_out), jnp.asarray(d_lse), spec,
                         block_k=block_k)
    expected = reference_backward(case["q"], case["k"], case["v"], ref_out, probs,
                                  d_out.astype(np.float64), d_lse.astype(np.float64), scale)
    for name, got, want in zip("qkv", grads, expected, strict=True):
        assert rel_err(got, want) <= FP32_RTOL, name


def test_public_backward_equals_autodiff(rng):
    """`flash_attention_bwd` with the final out/lse is the vjp of `flash_attention`."""
    case = random_case(rng, ratio=4, causal=True, packed=True, offset=True)
    mask, spec = mask_of(case), AttentionSpec(causal=True)
    q, k, v = (jnp.asarray(case[n]) for n in "qkv")
    (out, lse), vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, mask, spec), q, k, v)
    d_out = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))
    d_lse = jnp.where(jnp.isfinite(lse), jnp.asarray(rng.normal(size=lse.shape)), 0.0)
    d_lse = d_lse.astype(jnp.float32)
    for got, want in zip(flash_attention_bwd(q, k, v, out, lse, d_out, d_lse, mask, spec),
                         vjp((d_out, d_lse)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_auto_picks_the_fastest_correct_backend_per_case(monkeypatch):
    """On a GPU: cuDNN for plain attention, the Mosaic kernels for masked attention where
    they run, Triton where they do not, XLA for decoding rows; off GPU XLA."""
    def q(rows, head_dim, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct((1, rows, 4, head_dim), dtype)

    assert attention._choose("auto", q(512, 128), unmasked=False) == "xla"  # this CPU
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "_mosaic_supports", lambda q: q.shape[-1] in (64, 128))
    assert attention._choose("auto", q(512, 128), unmasked=True) == "cudnn"
    assert attention._choose("auto", q(512, 128), unmasked=False) == "mosaic"
    assert attention._choose("auto", q(729, 72), unmasked=False) == "triton"  # SigLIP
    assert attention._choose("auto", q(729, 72), unmasked=True) == "triton"
    assert attention._choose("auto", q(1, 128), unmasked=False) == "xla"
    assert attention._choose("auto", q(512, 128, jnp.float32), unmasked=False) == "xla"


def test_mosaic_backend_names_what_it_needs(rng):
    q = jnp.asarray(rng.normal(size=(1, 128, 4, 64)), jnp.bfloat16)
    with pytest.raises(ValueError, match="Hopper GPU, bf16 or fp16 and head dim 64 or 128"):
        flash_attention(q, q, q, None, AttentionSpec(backend="mosaic"))
