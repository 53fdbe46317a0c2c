"""The composite's splicing: frame embeddings land on media positions in batch-major order.

Text positions must keep their token embeddings, each frame must end with the newline
token's embedding, and `media_tokens_per_frame` must count projected tokens + newline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longvila_jax.checkpoint import build_model
from longvila_jax.config import base_config
from longvila_jax.data.media import expand_media_tokens
from longvila_jax.models.longvila import splice_media
from longvila_jax.models.projector import MERGES


def vlm_config(rng, newline=True):
    cfg = base_config()
    llm, vision = cfg.model.llm, cfg.model.vision
    llm.vocab_size = int(rng.integers(40, 80))
    llm.hidden_size = int(rng.integers(8, 24))
    llm.intermediate_size, llm.num_layers = 16, 1
    llm.num_heads, llm.num_kv_heads, llm.head_dim = 2, 1, 8
    vision.num_heads, vision.hidden_size, vision.intermediate_size = 2, 8, 16
    vision.num_layers, vision.patch_size = 2, 7
    vision.image_size = 7 * int(rng.integers(2, 6)) + int(rng.integers(0, 7))
    cfg.model.projector.type = str(rng.choice(list(MERGES)))
    cfg.model.media.media_token_id = int(rng.integers(llm.vocab_size))
    if newline:
        cfg.model.media.newline_token_id = int(rng.integers(llm.vocab_size))
    return cfg


def text_tokens(rng, n, vocab, media_id):
    choices = np.array([t for t in range(vocab) if t != media_id])
    return [int(t) for t in rng.choice(choices, n)]


def media_batch(rng, cfg, per_frame):
    """Two rows of text with media placeholders expanded; returns ids and the frame count."""
    vocab, media = cfg.model.llm.vocab_size, cfg.model.media.media_token_id
    frames_a, frames_b = [int(rng.integers(1, 3)), 1], [int(rng.integers(1, 3))]
    row_a = [*text_tokens(rng, 2, vocab, media), media, *text_tokens(rng, 3, vocab, media),
             media, *text_tokens(rng, 1, vocab, media)]
    row_b = [*text_tokens(rng, 3, vocab, media), media, *text_tokens(rng, 2, vocab, media)]
    rows = [expand_media_tokens(row_a, media, per_frame, frames_a),
            expand_media_tokens(row_b, media, per_frame, frames_b)]
    seq = max(len(r) for r in rows)
    ids = np.stack([np.concatenate([r, text_tokens(rng, seq - len(r), vocab, media)])
                    for r in rows]).astype(np.int32)
    return ids, sum(frames_a) + sum(frames_b)


_embed = nnx.jit(lambda m, ids, images: m.embed(ids, images))
_encode = nnx.jit(lambda m, images: m.encode_frames(images))
_features = nnx.jit(lambda m, images: m.projector(m.vision_tower(images)))


def test_embed_splices_frames_in_batch_major_order(rng, random_model):
    cfg = vlm_config(rng)
    model = random_model(lambda: build_model(cfg))
    per_frame = model.media_tokens_per_frame
    assert per_frame == model.projector.tokens_per_image + 1
    ids, frames = media_batch(rng, cfg, per_frame)
    size = cfg.model.vision.image_size
    images = jnp.asarray(rng.normal(size=(frames, size, size, 3)), jnp.float32)

    emb = np.asarray(_embed(model, jnp.asarray(ids), images))
    encoded = np.asarray(_encode(model, images))
    table = np.asarray(model.llm.embed_tokens[...])
    newline = cfg.model.media.newline_token_id
    assert encoded.shape == (frames, per_frame, cfg.model.llm.hidden_size)
    # Each frame: projected tokens, then the newline token's embedding.
    np.testing.assert_allclose(encoded[:, :-1], np.asarray(_features(model, images)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(encoded[:, -1], np.broadcast_to(table[newline],
                                                                  encoded[:, -1].shape))

    flat = encoded.reshape(-1, encoded.shape[-1])
    media_id, k = cfg.model.media.media_token_id, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if ids[b, t] == media_id:
                np.testing.assert_allclose(emb[b, t], flat[k], rtol=1e-6, atol=1e-6)
                k += 1
            else:
                np.testing.assert_array_equal(emb[b, t], table[ids[b, t]])
    assert k == flat.shape[0]
    np.testing.assert_array_equal(np.asarray(model.llm.embed(jnp.asarray(ids))), table[ids])
    np.testing.assert_array_equal(np.asarray(model.embed(jnp.asarray(ids))), table[ids])


def test_frames_differ_so_order_is_observable(rng, random_model):
    # Guards the splice test: distinct frames give distinct rows, so a wrong order would show.
    cfg = vlm_config(rng)
    model = random_model(lambda: build_model(cfg))
    size = cfg.model.vision.image_size
    encoded = np.asarray(_encode(model, jnp.asarray(rng.normal(size=(2, size, size, 3)),
                                                    jnp.float32)))
    assert np.max(np.abs(encoded[0, :-1] - encoded[1, :-1])) > 1e-3


@pytest.mark.parametrize("kind,tokens", [("mlp_downsample", 196),
                                         ("mlp_downsample_3x3_fix", 81)])
def test_media_tokens_per_frame_at_384px(kind, tokens):
    cfg = base_config()
    cfg.model.vision.image_size, cfg.model.projector.type = 384, kind
    cfg.model.media.newline_token_id = 7
    model = nnx.eval_shape(lambda: build_model(cfg))
    assert model.media_tokens_per_frame == tokens + 1
    cfg.model.media.newline_token_id = None
    assert nnx.eval_shape(lambda: build_model(cfg)).media_tokens_per_frame == tokens


def test_without_newline_token_frames_are_projected_tokens_only(rng, random_model):
    cfg = vlm_config(rng, newline=False)
    model = random_model(lambda: build_model(cfg))
    assert model.media_tokens_per_frame == model.projector.tokens_per_image
    size = cfg.model.vision.image_size
    images = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
    np.testing.assert_allclose(np.asarray(_encode(model, images)),
                               np.asarray(_features(model, images)), rtol=1e-6, atol=1e-6)



def test_splice_media_is_exact_and_poisons_rows_past_the_table(rng):
    """In-range rows are copied bit for bit; a row past the table (more media positions
    than frames) is NaN under jit, where clipping used to splice the last row silently."""
    b, s, hidden, n = 2, int(rng.integers(4, 12)), 8, int(rng.integers(1, 6))
    x = rng.normal(size=(b, s, hidden)).astype(np.float32)
    media = rng.normal(size=(n, hidden)).astype(np.float32)
    rows = np.where(rng.random((b, s)) < 0.5, rng.integers(0, n, (b, s)), -1)
    want = np.where((rows >= 0)[..., None], media[np.maximum(rows, 0)], x)
    splice = jax.jit(splice_media)
    np.testing.assert_array_equal(splice(x, media, rows), want)
    past = rows.copy()
    past[-1, -1] = n + int(rng.integers(0, 3))
    got = np.asarray(splice(x, media, past))
    assert np.isnan(got[-1, -1]).all()
    np.testing.assert_array_equal(got[:-1], want[:-1])
    np.testing.assert_array_equal(got[-1, :-1], want[-1, :-1])


def test_surplus_media_position_is_nan_under_jit_and_an_error_eagerly(rng, random_model):
    """One placeholder more than the frames fill (a generated `<image>`, say): under jit its
    embedding is NaN and every other position is as without it; eagerly, an error."""
    cfg = vlm_config(rng)
    model = random_model(lambda: build_model(cfg))
    ids, frames = media_batch(rng, cfg, model.media_tokens_per_frame)
    size = cfg.model.vision.image_size
    images = jnp.asarray(rng.normal(size=(frames, size, size, 3)), jnp.float32)
    surplus = ids.copy()
    surplus[-1, -1] = cfg.model.media.media_token_id  # text in `media_batch`: after all media
    valid = np.asarray(_embed(model, jnp.asarray(ids), images))
    got = np.array(_embed(model, jnp.asarray(surplus), images))
    assert np.isnan(got[-1, -1]).all()
    got[-1, -1] = valid[-1, -1]
    np.testing.assert_array_equal(got, valid)
    with pytest.raises(ValueError, match="media positions"):
        model.embed(jnp.asarray(surplus), images)
