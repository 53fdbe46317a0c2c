"""Parity with Hugging Face transformers (run in the separate PyTorch reference env).

Random tiny configs each run; logits and features must match within 1e-4 (fp32), and
import -> export -> import must reproduce every parameter bit for bit.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from longvila_jax.checkpoint import load_config, load_model, load_params
from longvila_jax.interop.hf_export import export_hf
from longvila_jax.interop.hf_import import import_hf

pytestmark = [pytest.mark.reference, pytest.mark.slow]
TOL = 1e-4


def random_llm(family, rng, vocab=None):
    head_dim = int(rng.choice([8, 16]))
    heads = int(rng.choice([2, 4, 6]))
    kv = int(rng.choice([d for d in (1, 2, 3, 6) if heads % d == 0]))
    cfg = dict(vocab_size=vocab or int(rng.integers(90, 160)), hidden_size=heads * head_dim,
               intermediate_size=int(rng.integers(40, 90)),
               num_hidden_layers=int(rng.integers(2, 4)), num_attention_heads=heads,
               num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=512,
               rms_norm_eps=float(rng.choice([1e-6, 1e-5])),
               tie_word_embeddings=bool(rng.integers(2)))
    theta = float(rng.uniform(1e4, 2e6))
    rope = {"rope_type": "default", "rope_theta": theta}
    if family == "llama":
        cfg["attention_bias"] = False
        kind = rng.choice(["default", "linear", "llama3"])
        if kind == "linear":
            rope = {"rope_type": "linear", "rope_theta": theta, "factor": 4.0}
        elif kind == "llama3":
            rope = {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64}
    cfg["rope_parameters"] = rope
    return cfg


def random_vision(rng, image_size):
    heads = int(rng.choice([2, 4]))
    return dict(hidden_size=heads * int(rng.choice([8, 12])), num_attention_heads=heads,
                intermediate_size=int(rng.integers(30, 70)),
                num_hidden_layers=int(rng.integers(2, 4)), image_size=image_size, patch_size=14,
                layer_norm_eps=1e-6)


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_bit_exact(ckpt_a, ckpt_b):
    a, b = load_params(ckpt_a), load_params(ckpt_b)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert load_config(ckpt_a).to_json() == load_config(ckpt_b).to_json()


def run_ref(reference, tmp_path, kind, model_dir, **inputs):
    name = f"{kind}-{abs(hash(str(model_dir))) % 10**8}"
    np.savez(tmp_path / f"{name}-in.npz", **inputs)
    reference([{"op": "run", "kind": kind, "model": str(model_dir),
                "inputs": str(tmp_path / f"{name}-in.npz"), "out": str(tmp_path / f"{name}.npz")}])
    return dict(np.load(tmp_path / f"{name}.npz"))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_causal_lm_matches_transformers(family, reference, rng, tmp_path):
    cfg = random_llm(family, rng)
    hf = tmp_path / "hf"
    reference([{"op": "make", "kind": family, "out": str(hf), "config": cfg,
                "seed": int(rng.integers(1 << 30))}])
    import_hf(hf, tmp_path / "ckpt", progress=False)
    ids = rng.integers(0, cfg["vocab_size"], (2, int(rng.integers(8, 40))))
    ours = np.asarray(load_model(tmp_path / "ckpt")(jnp.asarray(ids)))
    export_hf(tmp_path / "ckpt", tmp_path / "export", progress=False)
    ref = run_ref(reference, tmp_path, "causal_lm", hf, ids=ids)["logits"]
    exported = run_ref(reference, tmp_path, "causal_lm", tmp_path / "export", ids=ids)["logits"]
    assert max_diff(ours, ref) <= TOL
    assert max_diff(ours, exported) <= TOL
    import_hf(tmp_path / "export", tmp_path / "ckpt2", progress=False)
    assert_bit_exact(tmp_path / "ckpt", tmp_path / "ckpt2")


def media_ids(rng, vocab, media_id, per_sample_media, tokens_per_media):
    """Random text ids (never the media id) with `tokens_per_media` media slots inserted."""
    rows = []
    for count in per_sample_media:
        row = list(rng.integers(0, media_id, int(rng.integers(3, 9))))
        for _ in range(count):
            row += [media_id] * tokens_per_media + list(rng.integers(0, media_id, 3))
        rows.append(row)
    width = max(map(len, rows))
    return np.asarray([r + list(rng.integers(0, media_id, width - len(r))) for r in rows])


@pytest.mark.parametrize("layout", ["saved_by_transformers", "in_memory_names"])
def test_llava_matches_transformers(layout, reference, rng, tmp_path):
    llm = random_llm("qwen2", rng)
    vision = random_vision(rng, image_size=56)
    media = llm["vocab_size"] - 1
    hf = tmp_path / "hf"
    reference([{"op": "make", "kind": "llava", "out": str(hf), "seed": int(rng.integers(1 << 30)),
                "legacy_keys": layout == "in_memory_names",
                "config": {"llm": llm, "vision": vision,
                           "llava": {"image_token_index": media, "vision_feature_layer": -2,
                                     "vision_feature_select_strategy": "full"}}}])
    import_hf(hf, tmp_path / "ckpt", progress=False)
    model = load_model(tmp_path / "ckpt")
    assert model.media_tokens_per_frame == 16
    ids = media_ids(rng, llm["vocab_size"], media, [1, 1], 16)
    pixels = rng.standard_normal((2, 56, 56, 3)).astype(np.float32)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels)))
    export_hf(tmp_path / "ckpt", tmp_path / "export", fmt="llava", progress=False)
    nchw = pixels.transpose(0, 3, 1, 2)
    ref = run_ref(reference, tmp_path, "llava", hf, ids=ids, pixels=nchw)["logits"]
    exported = run_ref(reference, tmp_path, "llava", tmp_path / "export", ids=ids,
                       pixels=nchw)["logits"]
    assert max_diff(ours, ref) <= TOL
    assert max_diff(ours, exported) <= TOL
    import_hf(tmp_path / "export", tmp_path / "ckpt2", progress=False)
    assert_bit_exact(tmp_path / "ckpt", tmp_path / "ckpt2")


def write_tokenizer(folder, vocab_size, rng):
    """A word-level tokenizer with '<image>' in the upper and '\\n' in the lower half of ids."""
    half = vocab_size // 2
    vocab = {"<image>": int(rng.integers(half, vocab_size)), "\n": int(rng.integers(0, half))}
    free = (i for i in range(vocab_size) if i not in vocab.values())
    vocab.update({f"w{n}": next(free) for n in range(10)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    tok.save(str(folder / "tokenizer.json"))
    return vocab["<image>"], vocab["\n"]


@pytest.mark.parametrize("projector", ["mlp_downsample", "mlp_downsample_2x2_fix",
                                       "mlp_downsample_3x3_fix"])
def test_longvila_folder_matches_transformers_composite(projector, reference, rng, tmp_path):
    llm = random_llm("qwen2", rng)
    vision = random_vision(rng, image_size=98)  # 7x7 patches: odd grid, exercises padding
    hf = tmp_path / "hf"
    reference([{"op": "make", "kind": "longvila", "out": str(hf),
                "seed": int(rng.integers(1 << 30)),
                "config": {"llm": llm, "vision": vision, "projector": projector}}])
    media, newline = write_tokenizer(hf / "llm", llm["vocab_size"], rng)
    import_hf(hf, tmp_path / "ckpt", progress=False)
    model = load_model(tmp_path / "ckpt")
    per_frame = {"mlp_downsample": 16, "mlp_downsample_2x2_fix": 16,
                 "mlp_downsample_3x3_fix": 9}[projector] + 1
    assert model.media_tokens_per_frame == per_frame
    assert (model.media_token_id, model.newline_token_id) == (media, newline)
    ids = media_ids(rng, llm["vocab_size"], media, [2, 1], per_frame)
    ids[ids == newline] = (newline + 1) % media  # keep '\n' out of the text part
    pixels = rng.standard_normal((3, 98, 98, 3)).astype(np.float32)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels)))
    features = np.asarray(model.vision_tower(jnp.asarray(pixels)))
    export_hf(tmp_path / "ckpt", tmp_path / "export", progress=False)
    inputs = dict(ids=ids, pixels=pixels.transpose(0, 3, 1, 2), media_id=media,
                  newline_id=newline)
    ref = run_ref(reference, tmp_path, "longvila", hf, **inputs)
    exported = run_ref(reference, tmp_path, "longvila", tmp_path / "export", **inputs)
    assert max_diff(features, ref["vision"]) <= TOL
    assert max_diff(ours, ref["logits"]) <= TOL
    assert max_diff(ours, exported["logits"]) <= TOL
    top = json.loads((tmp_path / "export" / "config.json").read_text())
    assert top["mm_projector_cfg"]["mm_projector_type"] == projector
    import_hf(tmp_path / "export", tmp_path / "ckpt2", progress=False)
    assert_bit_exact(tmp_path / "ckpt", tmp_path / "ckpt2")


@pytest.mark.parametrize("legacy_keys", [True, False])
def test_assemble_from_separate_llm_and_siglip(legacy_keys, reference, rng, tmp_path):
    llm = random_llm("llama", rng)
    vision = random_vision(rng, image_size=int(rng.choice([56, 70])))
    seed = int(rng.integers(1 << 30))
    reference([{"op": "make", "kind": "llama", "out": str(tmp_path / "llm"), "config": llm,
                "seed": seed},
               {"op": "make", "kind": "siglip", "out": str(tmp_path / "siglip"),
                "config": vision, "seed": seed + 1, "legacy_keys": legacy_keys}])
    import_hf(tmp_path / "llm", tmp_path / "ckpt", vision=tmp_path / "siglip",
              projector_type="mlp_downsample", media_token_id=llm["vocab_size"] - 1,
              newline_token_id=0, progress=False)
    model = load_model(tmp_path / "ckpt")
    n = vision["image_size"] // 14
    pixels = rng.standard_normal((2, vision["image_size"], vision["image_size"], 3))
    pixels = pixels.astype(np.float32)
    ours = np.asarray(model.vision_tower(jnp.asarray(pixels)))
    assert ours.shape == (2, n * n, vision["hidden_size"])
    ids = rng.integers(0, llm["vocab_size"], (1, 12))
    ours_logits = np.asarray(model.llm(jnp.asarray(ids)))
    export_hf(tmp_path / "ckpt", tmp_path / "export", progress=False)
    nchw = pixels.transpose(0, 3, 1, 2)
    for folder in (tmp_path / "siglip", tmp_path / "export" / "vision_tower"):
        ref = run_ref(reference, tmp_path, "siglip", folder, pixels=nchw, select_layer=-2)
        assert max_diff(ours, ref["features"]) <= TOL
    for folder in (tmp_path / "llm", tmp_path / "export" / "llm"):
        ref = run_ref(reference, tmp_path, "causal_lm", folder, ids=ids)
        assert max_diff(ours_logits, ref["logits"]) <= TOL
