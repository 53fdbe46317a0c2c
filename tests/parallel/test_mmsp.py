"""MM-SP equals the single-device step: the same loss and the same gradients.

A tiny LongVILA (vision tower, projector, per-frame newline, LLM) on 8 simulated CPU
devices: frames spread over the sequence group for the tower, tokens re-sharded in the
scheme's layout for the LLM, targets shifted on the global sequence, loss normalised by the
global target count. Against `next_token_loss` of the whole model on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import rel_err

from longvila_jax.checkpoint import build_model
from longvila_jax.config import base_config, mesh_from_config
from longvila_jax.data.batch import from_rows
from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.models.loss import next_token_loss
from longvila_jax.parallel import fsdp, resolve_scheme
from longvila_jax.parallel.layout import Layout
from longvila_jax.parallel.mmsp import loss_fn


def make_batch(rng, model, b, s, frames_per_row, size):
    """Rows of text with one video each (random frame count), packed labels, padding.

    Each packed sample's first label is ignored: the sharded step's targets are shifted
    within samples, the single-device `next_token_loss` across them, and the two agree
    where no label starts a sample."""
    media_id = model.media_token_id
    per_frame = model.media_tokens_per_frame
    ids = rng.integers(0, media_id - 2, (b, s)).astype(np.int32)
    labels = np.where(rng.random((b, s)) < 0.7, ids, IGNORE_INDEX).astype(np.int32)
    for row, count in enumerate(frames_per_row):
        start = int(rng.integers(1, s - count * per_frame))
        ids[row, start:start + count * per_frame] = media_id
        labels[row, start:start + count * per_frame] = IGNORE_INDEX
    frames = rng.standard_normal((sum(frames_per_row), size, size, 3)).astype(np.float32)
    segments = np.sort(rng.integers(0, 2, (b, s)), 1).astype(np.int32)
    positions = np.zeros((b, s), np.int32)
    for row in range(b):  # positions restart per packed sample
        for seg in np.unique(segments[row]):
            where = segments[row] == seg
            positions[row, where] = np.arange(where.sum())
    labels[positions == 0] = IGNORE_INDEX
    return ids, labels, frames, positions, segments


def frames_by_row(frames, frames_per_row):
    """`[f, H, W, 3]` in media order -> `[rows, max frames, H, W, 3]`, each row's own first,
    zeros after (as packing gives them)."""
    out = np.zeros((len(frames_per_row), max(frames_per_row), *frames.shape[1:]), np.float32)
    starts = np.cumsum([0, *frames_per_row])
    for row, count in enumerate(frames_per_row):
        out[row, :count] = frames[starts[row]:starts[row] + count]
    return out


@pytest.mark.parametrize("data,node,local,scheme,remat,scan", [
    (1, 8, 1, "ring", "none", True), (1, 1, 8, "ulysses", "offload", True),
    (1, 2, 4, "2d", "selective", True), (2, 2, 2, "2d", "offload", True),
    (1, 1, 8, "ring", "none", False), (2, 1, 4, "ulysses", "dots", False)])
def test_mmsp_step_equals_single_device(rng, data, node, local, scheme, remat, scan):
    """Parameters FSDP-sharded over all 8 devices (`fsdp.place`); gradients come back
    sharded the same way; logits in chunks of 3 tokens on some layouts (8 or 16 per
    device: a padded last chunk); remat policies (host offload included) inside the
    sharded layer scan, or with the layers unrolled (`model.scan_layers`), each layer's
    parameters gathered in its own step."""
    config = base_config()
    config.model.remat, config.model.scan_layers = remat, scan
    config.model.media.newline_token_id = 3
    # 8 query heads: Ulysses over 8 devices splits them; 2 KV heads are replicated.
    config.model.llm.num_heads, config.model.llm.num_kv_heads = 8, 2
    config.parallel.data, config.parallel.node, config.parallel.local = data, node, local
    config.parallel.attention = scheme
    model = build_model(config, seed=int(rng.integers(1 << 30)))
    b, s = 2 * data, 64
    frames_per_row = [int(rng.integers(1, 4)) for _ in range(b)]
    ids, labels, frames, positions, segments = make_batch(rng, model, b, s, frames_per_row,
                                                          config.model.vision.image_size)

    def single(model):
        logits = model(jnp.asarray(ids), jnp.asarray(frames), jnp.asarray(positions),
                       jnp.asarray(segments))
        return next_token_loss(logits, jnp.asarray(labels))

    want_loss, want_grads = nnx.value_and_grad(single)(model)

    resolved = resolve_scheme(scheme, node, local)
    batch = Layout(resolved, data, node, local).lay_out(from_rows(
        ids, labels, frames_by_row(frames, frames_per_row), positions, segments,
        media_token_id=model.media_token_id))
    mesh = mesh_from_config(config)
    loss = loss_fn(mesh, resolved, loss_chunk=3 if data == 2 or node == 8 else 2048)
    sharded = nnx.clone(model)
    fsdp.place(sharded, None, mesh)
    params = jax.tree.leaves(nnx.state(sharded, nnx.Param))
    assert any(not p.sharding.is_fully_replicated for p in params)
    got_loss, got_grads = jax.jit(nnx.value_and_grad(loss))(sharded, batch)
    for p, g in zip(params, jax.tree.leaves(nnx.state(got_grads)), strict=True):
        assert g.sharding.is_equivalent_to(p.sharding, p.ndim)
    assert abs(float(got_loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    got_leaves = jax.tree.leaves(nnx.state(got_grads))
    want_leaves = jax.tree.leaves(nnx.state(want_grads))
    assert len(got_leaves) == len(want_leaves)
    # Leaves whose true gradient is ~0 (1e-14: rounding noise) are judged against the
    # whole gradient's size, not their own.
    scale = np.sqrt(sum(np.sum(np.square(np.asarray(w, np.float64))) for w in want_leaves))
    for g, w in zip(got_leaves, want_leaves, strict=True):
        err = np.linalg.norm(np.asarray(g, np.float64) - np.asarray(w, np.float64))
        assert err <= 1e-4 * np.linalg.norm(np.asarray(w, np.float64)) + 1e-7 * scale, (
            rel_err(g, w), err, scale)
