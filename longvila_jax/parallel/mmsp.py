"""MM-SP, LongVILA's multi-modal sequence parallelism: two shardings in one step.

Stage one spreads the FRAMES of a batch evenly over all devices of the sequence-parallel
group (`node` x `local`) for the vision tower and projector: frames are the expensive,
independent part, and a video's frames are few compared with its tokens. The frame
embeddings are then all-gathered, so every device can fill the media positions of its own
token shard. Stage two shards the spliced TOKEN sequence over the same group in the
scheme's layout (zigzag over a ring, see `schemes.layout_permutation`) and runs the LLM
with sequence-parallel attention; everything but attention is token-local.

Loss: targets are the labels shifted by one on the GLOBAL sequence before sharding
(LongVILA shifts inside each shard and loses the token at every shard boundary), and the
loss is the sum over all shards divided by the global count of target tokens, so the
sharded step computes exactly the single-device loss.

Host side (`prepare_batch`) builds the sharded arrays; `loss_fn` returns the jittable loss.
Parameters may be FSDP-sharded over the same mesh (`parallel/fsdp.py`); they are gathered
inside, one scanned layer at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from longvila_jax.data.media import IGNORE_INDEX, media_rows
from longvila_jax.kernels import Mask
from longvila_jax.models.longvila import splice_media
from longvila_jax.models.loss import chunked_token_nll
from longvila_jax.parallel import fsdp
from longvila_jax.parallel.mesh import SEQUENCE_AXES
from longvila_jax.parallel.schemes import layout_permutation, sequence_parallel_attention

# What `prepare_batch` returns and `loss_fn` reads; `frames` [data, frames, H, W, 3] is
# sharded like the tokens: data rows, then frames over the sequence group.
BATCH_KEYS = ("input_ids", "targets", "positions", "segment_ids", "media_rows", "frames")


def shift_targets(labels: np.ndarray) -> np.ndarray:
    """`targets[:, t] = labels[:, t + 1]` on the whole sequence; the last is ignored."""
    ignore = np.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    return np.concatenate([labels[:, 1:], ignore], axis=1).astype(np.int32)


def prepare_batch(input_ids, labels, frames, *, media_token_id: int, tokens_per_frame: int,
                  scheme: str, data: int, node: int, local: int, positions=None,
                  segment_ids=None, frame_slots: int | None = None) -> dict:
    """Host arrays for `loss_fn`, from a natural-order batch.

    `input_ids`/`labels` `[b, s]` (labels unshifted), `frames` `[f, H, W, 3]` in the order
    their media positions appear (batch-major; None: text only), `positions`/`segment_ids`
    `[b, s]` (None: arange / one segment); `tokens_per_frame` as the model's
    `media_tokens_per_frame`. `b` must divide by `data`; each data shard's rows use their own
    frames, so frames are regrouped `[data, f_shard, ...]` and padded with zero frames to a
    multiple of the group size (their embeddings fill no position), or to `frame_slots` per
    data shard (rounded up likewise) so that every step has the same shapes. `s` must divide by the
    layout's multiple (2 x ring size x ... : `2 * node * local` always suffices).
    """
    b, s = input_ids.shape
    group = node * local
    if b % data:
        raise ValueError(f"mmsp: batch {b} is not a multiple of data={data}")
    if s % (2 * group):
        raise ValueError(f"mmsp: sequence {s} is not a multiple of 2 x node x local = "
                         f"{2 * group}; pad it (pads get their own segment id)")
    positions = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)) if positions is None \
        else np.asarray(positions, np.int32)
    segment_ids = np.zeros((b, s), np.int32) if segment_ids is None \
        else np.asarray(segment_ids, np.int32)
    rows = b // data
    shards = [slice(d * rows, (d + 1) * rows) for d in range(data)]
    media = [media_rows(input_ids[sh], media_token_id) for sh in shards]
    counts = [int((m >= 0).sum()) // tokens_per_frame for m in media]
    given = 0 if frames is None else len(frames)
    if sum(counts) != given:
        raise ValueError(f"mmsp: the ids hold media positions for {sum(counts)} frames "
                         f"({tokens_per_frame} each) but {given} frames were given")
    perm = layout_permutation(s, scheme, node, local)
    batch = dict(input_ids=np.asarray(input_ids, np.int32)[:, perm],
                 targets=shift_targets(np.asarray(labels))[:, perm],
                 positions=positions[:, perm], segment_ids=segment_ids[:, perm],
                 media_rows=np.concatenate(media)[:, perm])
    if frames is not None:
        slots = max(max(counts), frame_slots or 0, 1)
        per_shard = -(-slots // group) * group
        grouped = np.zeros((data, per_shard, *frames.shape[1:]), np.float32)
        start = 0
        for d, count in enumerate(counts):
            grouped[d, :count] = frames[start:start + count]
            start += count
        batch["frames"] = grouped
    return batch


def loss_fn(mesh, scheme: str, loss_chunk: int = 2048):
    """`loss(model, batch) -> scalar`: MM-SP forward on `mesh` for a `prepare_batch` batch.

    `scheme` is a resolved scheme ('ring', 'ulysses', '2d'; 'none' for a group of one). The
    model's parameters may be FSDP-sharded (`fsdp.place`) or replicated; either way they
    enter with their FSDP specs and are gathered inside (see `parallel/fsdp.py`). A batch
    without `frames` (text only) skips stage one. Logits are formed `loss_chunk` tokens at
    a time (`chunked_token_nll`).
    """
    tokens = P("data", SEQUENCE_AXES)
    axes = ("data", *SEQUENCE_AXES)

    def attend(q, k, v, mask, spec, _):
        return sequence_parallel_attention(q, k, v, mask, spec, scheme=scheme)[0]

    if scheme == "none":  # a sequence group of one: the layer's own attention
        attend = None

    def local(graphdef, params, dims, batch):
        now, later = fsdp.split_stacked(dims)
        model = nnx.merge(graphdef, fsdp.gather(params, now))

        def per_layer(stack):
            return lambda layer: fsdp.gather(layer, later[stack]["layers"], offset=-1)

        x = model.llm.embed(batch["input_ids"])
        if "frames" in batch:
            # Stage one: this device's frames through the tower, then every device gets all.
            emb = model.encode_frames(batch["frames"][0], per_layer("vision_tower"))
            table = jax.lax.all_gather(emb, SEQUENCE_AXES, axis=0, tiled=True)
            # Stage two: fill this token shard's media positions.
            x = splice_media(x, table.reshape(-1, table.shape[-1]), batch["media_rows"])
        mask = Mask.self_attention(batch["positions"], batch["segment_ids"])
        h = model.llm.hidden_states(x, mask, attend, per_layer("llm"))
        nll, count = chunked_token_nll(h, model.llm.output_weight(), batch["targets"],
                                       loss_chunk)
        return jax.lax.psum(nll, axes) / jnp.maximum(jax.lax.psum(count, axes), 1)

    def loss(model, batch):
        graphdef, params = nnx.split(model)
        dims = fsdp.shard_dims(params, mesh.devices.size)
        specs = fsdp.partition_specs(params, dims)
        batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
        sharded = jax.shard_map(lambda p, b: local(graphdef, p, dims, b), mesh=mesh,
                                in_specs=(specs, {k: tokens for k in batch}),
                                out_specs=P())
        return sharded(params, batch)

    return loss
