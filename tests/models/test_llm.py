"""The Qwen2/Llama decoder against a float64 numpy forward written from the textbook.

RMSNorm, half-split RoPE (with none/linear/Llama-3.1 scaling), causal GQA attention with
segment masking, SwiGLU and the (tied or separate) output head are re-derived here one
token and one head at a time; parameters are drawn fresh from the test's seed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from longvila_jax.checkpoint import build_model
from longvila_jax.config import base_config
from longvila_jax.data.media import IGNORE_INDEX, expand_media_tokens
from longvila_jax.models.loss import next_token_loss
from longvila_jax.models.rope import inverse_frequencies

TOL = 1e-4


# ----------------------------------------------------------------------------- reference


def reference_inv_freq(head_dim, theta, scaling):
    """Per-pair inverse frequency, with Llama-3.1's banded scaling written branch by branch."""
    out = []
    for d in range(head_dim // 2):
        inv = 1.0 / theta ** (2 * d / head_dim)
        if scaling["type"] == "linear":
            inv /= scaling["factor"]
        elif scaling["type"] == "llama3":
            factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]
            low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
            wavelen = 2 * math.pi / inv
            if wavelen < orig / high:
                pass
            elif wavelen > orig / low:
                inv /= factor
            else:
                smooth = (orig / wavelen - low) / (high - low)
                inv = (1 - smooth) * inv / factor + smooth * inv
        out.append(inv)
    return np.array(out)


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x, positions, inv_freq):
    """x `[seq, heads, head_dim]`: rotate each pair (d, d + half) by positions * inv_freq[d]."""
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    for t, pos in enumerate(positions):
        for d in range(half):
            c, s = math.cos(pos * inv_freq[d]), math.sin(pos * inv_freq[d])
            a, b = x[t, :, d], x[t, :, d + half]
            out[t, :, d] = a * c - b * s
            out[t, :, d + half] = b * c + a * s
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def llm_params(llm):
    """The decoder's parameters as float64 numpy arrays (layer params keep the leading axis)."""
    f = lambda v: np.asarray(v[...], np.float64)
    layers = llm.layers
    p = {name: f(getattr(layers, name).kernel) for name in
         ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    for name in ("q_proj", "k_proj", "v_proj"):
        bias = getattr(layers, name).bias
        p[name + "_bias"] = None if bias is None else f(bias)
    p["input_norm"] = f(layers.input_norm.scale)
    p["post_norm"] = f(layers.post_attention_norm.scale)
    p["embed"], p["norm"] = f(llm.embed_tokens), f(llm.norm.scale)
    p["lm_head"] = None if llm.lm_head is None else f(llm.lm_head)
    return p


def reference_logits(p, cfg, ids, positions, segments):
    """float64 logits `[seq, vocab]` for one row."""
    heads, kv_heads, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    inv_freq = reference_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling)
    seq = len(ids)
    h = p["embed"][ids]
    for layer in range(cfg.num_layers):
        y = rms_norm(h, p["input_norm"][layer], eps)
        proj = {}
        for name, n in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            z = y @ p[name][layer]
            if p[name + "_bias"] is not None:
                z = z + p[name + "_bias"][layer]
            proj[name] = z.reshape(seq, n, hd)
        q = rope(proj["q_proj"], positions, inv_freq)
        k = rope(proj["k_proj"], positions, inv_freq)
        v = proj["v_proj"]
        attn = np.zeros((seq, heads, hd))
        for head in range(heads):
            kv = head // (heads // kv_heads)
            for i in range(seq):
                keys = [j for j in range(seq)
                        if segments[j] == segments[i] and positions[j] <= positions[i]]
                scores = np.array([q[i, head] @ k[j, kv] for j in keys]) / math.sqrt(hd)
                w = np.exp(scores - scores.max())
                attn[i, head] = (w / w.sum()) @ v[keys, kv]
        h = h + attn.reshape(seq, heads * hd) @ p["o_proj"][layer]
        y = rms_norm(h, p["post_norm"][layer], eps)
        gated = silu(y @ p["gate_proj"][layer]) * (y @ p["up_proj"][layer])
        h = h + gated @ p["down_proj"][layer]
    h = rms_norm(h, p["norm"], eps)
    return h @ (p["embed"].T if p["lm_head"] is None else p["lm_head"])


# ----------------------------------------------------------------------------- helpers


def random_llm_config(rng, *, attention_bias=True, tie=False, scaling="none"):
    cfg = base_config()
    cfg.model.vision.enabled = False
    llm = cfg.model.llm
    llm.head_dim = int(rng.choice([8, 16]))
    llm.num_kv_heads = int(rng.integers(1, 3))
    llm.num_heads = llm.num_kv_heads * int(rng.integers(1, 4))
    llm.hidden_size = int(rng.integers(12, 33))
    llm.intermediate_size = int(rng.integers(16, 48))
    llm.vocab_size = int(rng.integers(40, 90))
    llm.num_layers = int(rng.integers(1, 4))
    llm.rms_norm_eps = float(rng.choice([1e-6, 1e-5]))
    llm.rope_theta = float(rng.uniform(5e3, 5e4))
    llm.attention_bias = attention_bias
    llm.tie_embeddings = tie
    llm.rope_scaling.type = scaling
    if scaling == "linear":
        llm.rope_scaling.factor = float(rng.uniform(2.0, 8.0))
    elif scaling == "llama3":
        # Bands chosen so head_dim 8-16 frequencies land in all three regions.
        llm.rope_scaling.factor = float(rng.uniform(4.0, 16.0))
        llm.rope_scaling.low_freq_factor = 1.0
        llm.rope_scaling.high_freq_factor = 4.0
        llm.rope_scaling.original_max_position_embeddings = int(rng.choice([64, 128, 256]))
    return cfg


_forward = nnx.jit(lambda m, i, p, s: m(i, positions=p, segment_ids=s))


def forward(model, ids, positions, segments):
    return _forward(model, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(segments))


def random_batch(rng, vocab, batch, seq):
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    # Offset positions so RoPE (and its scaling) rotates by sizeable angles.
    positions = (rng.integers(0, 200, (batch, 1)) + np.arange(seq)).astype(np.int32)
    segments = np.sort(rng.integers(0, 2, (batch, seq)), axis=1).astype(np.int32)
    return ids, positions, segments


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scaling", ["none", "linear", "llama3"])
def test_inverse_frequencies_match_reference(rng, scaling):
    head_dim = int(rng.choice([16, 32]))
    scaling_cfg = dict(type=scaling, factor=float(rng.uniform(2, 16)), low_freq_factor=1.0,
                       high_freq_factor=float(rng.choice([2.0, 4.0])),
                       original_max_position_embeddings=int(rng.choice([256, 512, 1024])))
    theta = float(rng.uniform(5e3, 5e5))
    got = inverse_frequencies(head_dim, theta, scaling_cfg)
    want = reference_inv_freq(head_dim, theta, scaling_cfg)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    if scaling == "llama3":
        wavelen = 2 * np.pi / (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim))
        orig = scaling_cfg["original_max_position_embeddings"]
        assert (wavelen < orig / scaling_cfg["high_freq_factor"]).any()
        assert (wavelen > orig).any()


@pytest.mark.parametrize("attention_bias,tie,scaling", [
    (True, False, "none"), (False, True, "none"), (True, True, "linear"),
    (False, False, "linear"), (True, False, "llama3"), (False, True, "llama3")])
def test_logits_match_reference(rng, random_model, attention_bias, tie, scaling):
    cfg = random_llm_config(rng, attention_bias=attention_bias, tie=tie, scaling=scaling)
    model = random_model(lambda: build_model(cfg))
    assert (model.llm.lm_head is None) == tie
    assert (model.llm.layers.q_proj.bias is None) == (not attention_bias)
    batch, seq = 2, int(rng.integers(5, 10))
    ids, positions, segments = random_batch(rng, cfg.model.llm.vocab_size, batch, seq)
    got = np.asarray(forward(model, ids, positions, segments))
    assert got.dtype == np.float32 and got.shape == (batch, seq, cfg.model.llm.vocab_size)
    p = llm_params(model.llm)
    for b in range(batch):
        want = reference_logits(p, cfg.model.llm, ids[b], positions[b], segments[b])
        assert np.max(np.abs(got[b] - want)) <= TOL, b


def test_default_positions_and_segments(rng, random_model):
    cfg = random_llm_config(rng)
    model = random_model(lambda: build_model(cfg))
    seq = int(rng.integers(4, 9))
    ids = rng.integers(0, cfg.model.llm.vocab_size, (1, seq)).astype(np.int32)
    got = np.asarray(nnx.jit(lambda m, i: m(i))(model, jnp.asarray(ids)))
    want = reference_logits(llm_params(model.llm), cfg.model.llm, ids[0], np.arange(seq),
                            np.zeros(seq, np.int32))
    assert np.max(np.abs(got[0] - want)) <= TOL


def test_packed_documents_match_separate_runs(rng, random_model):
    cfg = random_llm_config(rng, scaling=str(rng.choice(["none", "llama3"])))
    model = random_model(lambda: build_model(cfg))
    n1, n2 = int(rng.integers(2, 7)), int(rng.integers(2, 7))
    vocab = cfg.model.llm.vocab_size
    doc1, doc2 = rng.integers(0, vocab, n1), rng.integers(0, vocab, n2)
    packed_ids = np.concatenate([doc1, doc2])[None].astype(np.int32)
    positions = np.concatenate([np.arange(n1), np.arange(n2)])[None].astype(np.int32)
    segments = np.array([[0] * n1 + [1] * n2], np.int32)
    packed = np.asarray(forward(model, packed_ids, positions, segments))
    alone1 = np.asarray(forward(model, doc1[None].astype(np.int32), np.arange(n1)[None],
                                np.zeros((1, n1), np.int32)))
    alone2 = np.asarray(forward(model, doc2[None].astype(np.int32), np.arange(n2)[None],
                                np.zeros((1, n2), np.int32)))
    assert np.max(np.abs(packed[0, :n1] - alone1[0])) <= TOL
    assert np.max(np.abs(packed[0, n1:] - alone2[0])) <= TOL
    # Without the segment ids the second document would attend to the first.
    leaky = np.asarray(forward(model, packed_ids, positions, np.zeros_like(segments)))
    assert np.max(np.abs(leaky[0, n1:] - alone2[0])) > 1e-3


def reference_loss(logits, labels):
    logits = np.asarray(logits, np.float64)
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = labels[b, t + 1]
            if target == IGNORE_INDEX:
                continue
            row = logits[b, t]
            total += math.log(np.sum(np.exp(row - row.max()))) + row.max() - row[target]
            count += 1
    return total / max(count, 1)


def test_next_token_loss_matches_cross_entropy(rng):
    batch, seq, vocab = int(rng.integers(1, 4)), int(rng.integers(3, 9)), int(rng.integers(5, 30))
    logits = (3 * rng.normal(size=(batch, seq, vocab))).astype(np.float32)
    labels = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    labels[rng.random((batch, seq)) < 0.3] = IGNORE_INDEX
    labels[0, 1] = int(rng.integers(vocab))  # at least one scored target
    got = float(next_token_loss(jnp.asarray(logits), jnp.asarray(labels)))
    assert got == pytest.approx(reference_loss(logits, labels), rel=1e-5)
    # The first label is never a target (labels are unshifted).
    relabelled = labels.copy()
    relabelled[:, 0] = (labels[:, 0] + 1) % vocab
    assert float(next_token_loss(jnp.asarray(logits), jnp.asarray(relabelled))) == got


def test_next_token_loss_all_ignored_is_zero(rng):
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    labels = np.full((2, 5), IGNORE_INDEX, np.int32)
    labels[:, 0] = 3  # position 0 is never a target
    assert float(next_token_loss(jnp.asarray(logits), jnp.asarray(labels))) == 0.0


def test_expand_media_tokens(rng):
    media, per_frame = 99, int(rng.integers(1, 5))
    frames = [int(rng.integers(1, 4)), 1]
    text = [int(t) for t in rng.integers(0, 50, 6)]
    ids = [*text[:2], media, *text[2:5], media, *text[5:]]
    got = expand_media_tokens(np.asarray(ids), media, per_frame, frames)
    want = (text[:2] + [media] * (frames[0] * per_frame) + text[2:5]
            + [media] * (frames[1] * per_frame) + text[5:])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(expand_media_tokens(text, media, per_frame, []), text)
    with pytest.raises(ValueError, match="placeholder"):
        expand_media_tokens(ids, media, per_frame, [1])
    with pytest.raises(ValueError, match="media"):
        expand_media_tokens(ids, media, per_frame, [1, 1, 1])


def clone_with(cfg, model, **overrides):
    """A model built from `cfg` with `overrides` on cfg.model, holding `model`'s parameters."""
    new_cfg = cfg.copy_and_resolve_references()
    for key, value in overrides.items():
        new_cfg.model[key] = value
    other = nnx.eval_shape(lambda: build_model(new_cfg))
    nnx.update(other, nnx.state(model, nnx.Param))
    return other


def test_bfloat16_compute_close_to_float32(rng, random_model):
    cfg = random_llm_config(rng, scaling="llama3")
    model = random_model(lambda: build_model(cfg))
    bf16 = clone_with(cfg, model, dtype="bfloat16")
    ids, positions, segments = random_batch(rng, cfg.model.llm.vocab_size, 2, 8)
    ref = np.asarray(forward(model, ids, positions, segments), np.float64)
    got = forward(bf16, ids, positions, segments)
    assert got.dtype == jnp.float32
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 5e-2
    # bf16 compute must actually round: identical logits would mean fp32 ran.
    assert np.max(np.abs(got - ref)) > 0


@pytest.mark.parametrize("policy", ["selective", "dots", "offload", "full"])
def test_remat_gives_same_logits_and_gradients(rng, random_model, policy):
    cfg = random_llm_config(rng)
    llm = cfg.model.llm
    llm.num_layers = 2
    # The MLP wider than every other layer width, so its residual's shape names it below
    # (a random draw equal to the hidden size made the layer input look like it).
    llm.intermediate_size = max(llm.hidden_size, llm.num_heads * llm.head_dim) + int(
        rng.integers(1, 16))
    model = random_model(lambda: build_model(cfg))
    remat = clone_with(cfg, model, remat=policy)
    assert remat.llm.remat == policy and model.llm.remat == "none"
    ids, positions, segments = random_batch(rng, cfg.model.llm.vocab_size, 2, 7)
    labels = ids.copy()
    labels[:, :2] = IGNORE_INDEX

    def loss(m):
        logits = m(jnp.asarray(ids), positions=jnp.asarray(positions),
                   segment_ids=jnp.asarray(segments))
        return next_token_loss(logits, jnp.asarray(labels)), logits

    @nnx.jit
    def loss_and_grad(m):
        return nnx.value_and_grad(loss, has_aux=True)(m)

    (loss_a, logits_a), grads_a = loss_and_grad(model)
    (loss_b, logits_b), grads_b = loss_and_grad(remat)
    # Recomputation may fuse differently, so agreement is to float32 rounding, not bitwise.
    np.testing.assert_allclose(np.asarray(logits_b), np.asarray(logits_a), rtol=1e-5, atol=1e-5)
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
    flat_a = jax.tree_util.tree_leaves_with_path(grads_a)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(grads_b))
    assert len(flat_a) == len(flat_b) > 0
    # What the policy keeps for the backward: selective keeps each layer's attention
    # output and LSE (so the backward never re-runs the attention), full keeps neither. The
    # layer scan hides the names, so they are recognised by shape.
    graphdef, state = nnx.split(remat)
    saved = {a.shape for a, _ in saved_residuals(
        lambda st: loss(nnx.merge(graphdef, st))[0], state)}
    (b, s), layers = ids.shape, llm.num_layers
    attention = {(layers, b, llm.num_heads, s), (layers, b, s, llm.num_heads, llm.head_dim)}
    assert attention & saved == (set() if policy == "full" else attention)
    # dots keeps every projection's output too: the MLP's gate and up products among them.
    assert ((layers, b, s, llm.intermediate_size) in saved) == (policy == "dots"), saved
    # offload keeps them in host memory until the backward; the others keep nothing there.
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda st: loss(nnx.merge(graphdef, st))[0]))(state))
    assert ("MemorySpace.Host" in jaxpr) == (policy == "offload")
    for path, ga in flat_a:
        ga, gb = np.asarray(ga), np.asarray(flat_b[path])
        assert np.isfinite(ga).all() and np.abs(ga).max() > 0, jax.tree_util.keystr(path)
        scale = np.abs(ga).max()
        np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("policy", ["none", "dots"])
def test_unrolled_layers_match_scan_and_reference(rng, random_model, policy):
    """`model.scan_layers = False`: the same logits (float64 reference), gradients and
    per-layer keys and values (stacked as the scan stacks them) as the layer scan."""
    cfg = random_llm_config(rng)
    cfg.model.llm.num_layers = int(rng.integers(2, 4))
    model = random_model(lambda: build_model(cfg))
    unrolled = clone_with(cfg, model, scan_layers=False, remat=policy)
    assert not unrolled.llm.scan and model.llm.scan
    ids, positions, segments = random_batch(rng, cfg.model.llm.vocab_size, 2, 7)
    got = np.asarray(forward(unrolled, ids, positions, segments))
    p = llm_params(model.llm)
    for b in range(2):
        want = reference_logits(p, cfg.model.llm, ids[b], positions[b], segments[b])
        assert np.max(np.abs(got[b] - want)) <= TOL, b

    @nnx.jit
    def grads_and_kv(m):
        def loss(m):
            return jnp.sum(jnp.tanh(m(jnp.asarray(ids), positions=jnp.asarray(positions),
                                      segment_ids=jnp.asarray(segments))))
        _, kv = m.llm.hidden_states_and_kv(m.llm.embed(jnp.asarray(ids)), None)
        return nnx.grad(loss)(m), kv

    (grads_a, kv_a), (grads_b, kv_b) = grads_and_kv(model), grads_and_kv(unrolled)
    for a, b in zip(kv_a, kv_b, strict=True):
        assert a.shape[0] == cfg.model.llm.num_layers
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(grads_b))
    for path, ga in jax.tree_util.tree_leaves_with_path(grads_a):
        ga, gb = np.asarray(ga), np.asarray(flat_b[path])
        assert ga.shape == gb.shape and np.abs(ga).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-5 * np.abs(ga).max(),
                                   err_msg=jax.tree_util.keystr(path))
