"""MM-SP, LongVILA's multi-modal sequence parallelism: two shardings in one step.

Stage one spreads the FRAMES of a batch evenly over all devices of the sequence-parallel
group (`node` x `local`) for the vision tower and projector: frames are the expensive,
independent part, and a video's frames are few compared with its tokens. The frame
embeddings are then all-gathered, so every device can fill the media positions of its own
token shard. Stage two shards the spliced TOKEN sequence over the same group in the
scheme's layout (zigzag over a ring, see `schemes.layout_permutation`) and runs the LLM
with sequence-parallel attention; everything but attention is token-local.

Loss: targets come shifted from the data side, on the whole row before it is sharded
(LongVILA shifts inside each shard and loses the token at every shard boundary), and the
loss is the sum over all shards divided by the global count of target tokens, so the
sharded step computes exactly the single-device loss.

The batch is a `data.batch.Batch` laid out for the mesh (`parallel.layout.Layout`); the
loss is `loss_fn(mesh, scheme)`. Parameters may be FSDP-sharded over the same mesh
(`parallel/fsdp.py`); they are gathered inside, one scanned layer at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from longvila_jax.data.batch import Batch
from longvila_jax.kernels import Mask
from longvila_jax.models.longvila import splice_media
from longvila_jax.models.loss import chunked_token_logprobs, chunked_token_nll
from longvila_jax.parallel import fsdp
from longvila_jax.parallel.layout import SPEC
from longvila_jax.parallel.mesh import SEQUENCE_AXES
from longvila_jax.parallel.schemes import sequence_parallel_attention


def loss_fn(mesh, scheme: str, loss_chunk: int = 2048):
    """`loss(model, batch) -> scalar`: MM-SP forward on `mesh` for a laid-out `Batch`.

    `scheme` is a resolved scheme ('ring', 'ulysses', '2d'; 'none' for a group of one). The
    model's parameters may be FSDP-sharded (`fsdp.place`) or replicated; either way they
    enter with their FSDP specs and are gathered inside (see `parallel/fsdp.py`). A batch
    without `frames` (text only) skips stage one. Logits are formed `loss_chunk` tokens at
    a time (`chunked_token_nll`).
    """
    axes = ("data", *SEQUENCE_AXES)

    def local(model, batch: Batch, gather):
        h = _hidden_states(model, batch, None, _attend(scheme), gather)
        nll, count = chunked_token_nll(h, model.llm.output_weight(), batch.targets, loss_chunk)
        return jax.lax.psum(nll, axes) / jnp.maximum(jax.lax.psum(count, axes), 1)

    return sharded(mesh, local, P())


def logprobs_fn(mesh, scheme: str, loss_chunk: int = 2048, *, entropy: bool = False):
    """`logprobs(model, batch, table) -> [rows, seq]`: each target token's log-probability
    (0 where there is none), laid out and sharded as the batch (`SPEC`); with `entropy`, a
    pair with each such position's entropy (`models.loss.token_entropy`), RL's metric.

    The media positions take rows of `table` `[rows, hidden]` (replicated: embeddings
    computed once, e.g. by the inference engine, and reused by every pass, as RL's rollouts
    and updates reuse a video's), so the vision tower does not run. Otherwise `loss_fn`'s
    forward: FSDP-gathered parameters, the scheme's attention, chunked logits.
    """

    def local(model, batch: Batch, table, gather):
        h = _hidden_states(model, batch, table, _attend(scheme), gather)
        return chunked_token_logprobs(h, model.llm.output_weight(), batch.targets, loss_chunk,
                                      entropy=entropy)

    return sharded(mesh, local, (SPEC, SPEC) if entropy else SPEC, P())


def _attend(scheme: str):
    """The attend hook of `scheme`; None (the layer's own attention) for a group of one."""
    if scheme == "none":
        return None

    def attend(q, k, v, mask, spec, _):
        return sequence_parallel_attention(q, k, v, mask, spec, scheme=scheme)[0]

    return attend


def _hidden_states(model, batch: Batch, table, attend, gather):
    """The final hidden states of this device's token shard; media positions from `table`
    when given, else from the batch's frames through the tower (stage one), if any."""
    x = model.llm.embed(batch.input_ids)
    if table is not None:
        x = splice_media(x, table, batch.media_rows)
    elif batch.frames is not None:
        x = splice_media(x, *_frame_table(model, batch, gather("vision_tower")))
    mask = Mask.self_attention(batch.positions, batch.segment_ids)
    return model.llm.hidden_states(x, mask, attend, gather("llm"))


def sharded(mesh, local, out_spec, *extra_specs, batch_spec=SPEC):
    """`f(model, batch, *extra)`: `local(model, batch, *extra, gather)` in a shard_map over
    `mesh`, the model's parameters entering with their FSDP specs and gathered inside
    (`gather(stack)` gathers one scanned layer of `stack` at a time), the batch as
    `batch_spec` (RL's shared prompts enter whole and are cut inside)."""

    def f(model, batch, *extra):
        graphdef, params = nnx.split(model)
        dims = fsdp.shard_dims(params, mesh.devices.size)
        specs = fsdp.partition_specs(params, dims)

        def inner(params, batch, *extra):
            now, later = fsdp.split_stacked(dims)
            model = nnx.merge(graphdef, fsdp.gather(params, now))

            def gather(stack):
                return lambda layer: fsdp.gather(layer, later[stack]["layers"], offset=-1)

            return local(model, batch, *extra, gather)

        return jax.shard_map(inner, mesh=mesh, in_specs=(specs, batch_spec, *extra_specs),
                             out_specs=out_spec)(params, batch, *extra)

    return f


def _frame_table(model, batch: Batch, gather):
    """Stage one: this device's share of its rows' frames through the tower, every
    device's gathered, `(table [rows * frames * tokens_per_frame, hidden], the rows of it
    this token shard's media positions take)`."""
    frames = batch.frames  # [rows, frames / group, H, W, 3]: each row's, split over the group
    rows, share = frames.shape[:2]
    with jax.named_scope("vision_tower"):  # a profile's name for this work
        emb = model.encode_frames(frames.reshape(rows * share, *frames.shape[2:]), gather)
    emb = jax.lax.all_gather(emb.reshape(rows, share, *emb.shape[1:]), SEQUENCE_AXES,
                             axis=1, tiled=True)  # [rows, frames, tokens per frame, hidden]
    per_row = emb.shape[1] * emb.shape[2]
    offsets = jnp.arange(rows, dtype=jnp.int32)[:, None] * per_row
    media = jnp.where(batch.media_rows >= 0, batch.media_rows + offsets, -1)
    return emb.reshape(-1, emb.shape[-1]), media
