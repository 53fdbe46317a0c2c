"""Training steps under MM-SP on 8 simulated CPU devices leave the same parameters as the
same steps on one device (AdamW, clipping, warmup), and the loss goes down."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longvila_jax.checkpoint import build_model
from longvila_jax.config import base_config, mesh_from_config
from longvila_jax.data.batch import from_rows
from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.models.loss import next_token_loss
from longvila_jax.parallel import resolve_scheme
from longvila_jax.parallel.layout import Layout
from longvila_jax.parallel.mmsp import loss_fn
from longvila_jax.train.step import make_optimizer_state, make_train_step


def test_mmsp_steps_equal_single_device_steps(rng):
    config = base_config()
    config.model.media.newline_token_id = 3
    config.parallel.data, config.parallel.node, config.parallel.local = 2, 2, 2
    config.optim.learning_rate, config.optim.warmup_steps = 3e-3, 1
    # A larger Adam eps keeps the update of a ~0 gradient ~0: with 1e-8, float rounding
    # noise in such a gradient (1e-9) flips its update's sign at a full learning rate.
    config.optim.eps = 1e-5
    seed = int(rng.integers(1 << 30))
    b, s = 2, 64
    single_model, sharded_model = build_model(config, seed=seed), build_model(config, seed=seed)
    per_frame = single_model.media_tokens_per_frame
    media_id = single_model.media_token_id
    ids = rng.integers(0, media_id - 2, (b, s)).astype(np.int32)
    ids[:, 5:5 + 2 * per_frame] = media_id  # two frames per row
    labels = np.where(ids == media_id, IGNORE_INDEX, ids).astype(np.int32)
    size = config.model.vision.image_size
    frames = rng.standard_normal((2 * b, size, size, 3)).astype(np.float32)

    def single_loss(model, batch):
        return next_token_loss(model(batch["ids"], batch["frames"]), batch["labels"])

    scheme = resolve_scheme("auto", 2, 2)
    batch = Layout(scheme, 2, 2, 2).lay_out(from_rows(
        ids, labels, frames.reshape(b, 2, size, size, 3), media_token_id=media_id))
    single_step = make_train_step(single_loss)
    sharded_step = make_train_step(loss_fn(mesh_from_config(config), scheme))
    single_opt = make_optimizer_state(single_model, config.optim)
    sharded_opt = make_optimizer_state(sharded_model, config.optim)
    plain = dict(ids=jnp.asarray(ids), labels=jnp.asarray(labels), frames=jnp.asarray(frames))
    losses = []
    for _ in range(3):
        want = single_step(single_model, single_opt, plain)
        got = sharded_step(sharded_model, sharded_opt, batch)
        assert abs(float(got["loss"]) - float(want["loss"])) <= 1e-5 * float(want["loss"])
        assert abs(float(got["grad_norm"]) - float(want["grad_norm"])) <= 1e-4 * float(
            want["grad_norm"])
        losses.append(float(got["loss"]))
    assert losses[-1] < losses[0]
    atol = 1e-3 * config.optim.learning_rate * len(losses)
    for g, w in zip(jax.tree.leaves(nnx.state(sharded_model, nnx.Param)),
                    jax.tree.leaves(nnx.state(single_model, nnx.Param)), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=atol)
