"""The composite: frames -> SigLIP -> projector (+ per-frame newline) -> spliced into text -> LLM.

Media placeholders are expanded on the host before the model sees them (the way the
Llava processor does it): each image or video frame occupies `media_tokens_per_frame`
consecutive positions holding `media_token_id`, so shapes are static under jit and
splicing is a gather. Media embeddings fill those positions in batch-major order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longvila_jax.config import validate
from longvila_jax.kernels.manual_axes import varying_like
from longvila_jax.models.llm import CausalLM
from longvila_jax.models.lora import apply_lora
from longvila_jax.models.projector import Projector
from longvila_jax.models.siglip import SiglipVisionTower

IGNORE_INDEX = -100


class LongVILA(nnx.Module):
    """LongVILA / Llava-style VLM; with `vision.enabled=False` a plain causal LM."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        self.llm = CausalLM(model_cfg, rngs=rngs)
        enabled = model_cfg.vision.enabled
        self.vision_tower = SiglipVisionTower(model_cfg, rngs=rngs) if enabled else None
        self.projector = Projector(model_cfg, rngs=rngs) if enabled else None
        self.media_token_id = model_cfg.media.media_token_id
        self.newline_token_id = model_cfg.media.newline_token_id

    @property
    def media_tokens_per_frame(self) -> int:
        """Positions one frame takes in the LLM sequence (projected tokens + newline)."""
        return self.projector.tokens_per_image + (self.newline_token_id is not None)

    def encode_frames(self, images, gather=None):
        """`[frames, H, W, 3]` -> `[frames, media_tokens_per_frame, llm_hidden]`; `gather`
        gathers FSDP-sharded tower layers one at a time (see `scan_layers`)."""
        emb = self.projector(self.vision_tower(images, gather))
        if self.newline_token_id is not None:
            newline = self.llm.embed(jnp.full((emb.shape[0], 1), self.newline_token_id))
            emb = jnp.concatenate([emb, newline.astype(emb.dtype)], axis=1)
        return emb

    def embed(self, input_ids, images=None):
        """Text embeddings with media positions replaced by frame embeddings.

        Eager calls check that the ids hold exactly the frames' media positions; under jit
        a surplus position is NaN (`splice_media`) and surplus frames go unused.
        """
        x = self.llm.embed(input_ids)
        if images is None:
            return x
        if self.vision_tower is None:
            raise ValueError("LongVILA: images given to a model built without a vision tower")
        is_media = input_ids == self.media_token_id
        if not isinstance(is_media, jax.core.Tracer):  # eager calls can check the count
            want, have = images.shape[0] * self.media_tokens_per_frame, int(is_media.sum())
            if want != have:
                raise ValueError(f"LongVILA: {images.shape[0]} frames need {want} media "
                                 f"positions (id {self.media_token_id}) but the ids hold {have}")
        media = self.encode_frames(images).reshape(-1, x.shape[-1])
        order = jnp.cumsum(is_media.reshape(-1)).reshape(is_media.shape) - 1
        return splice_media(x, media, jnp.where(is_media, order, -1))

    def __call__(self, input_ids, images=None, positions=None, segment_ids=None):
        """Float32 logits `[batch, seq, vocab]`."""
        return self.llm.from_embeddings(self.embed(input_ids, images), positions, segment_ids)


def splice_media(x, media, rows):
    """`x` `[b, s, hidden]` with each position whose `rows` entry is >= 0 replaced by that
    row of `media` `[n, hidden]` (-1: keep the text embedding).

    A row >= n (more media positions than frames) gives NaN there: jit cannot raise on a
    value, and clipping would silently splice the last frame's embedding; NaN reaches the
    logits and the loss, where it shows. In-range rows gather exactly as before.
    """
    gathered = jnp.take(media, rows, axis=0, mode="fill", fill_value=jnp.nan)
    return jnp.where((rows >= 0)[..., None], gathered.astype(x.dtype), x)


def token_nll(logits, targets):
    """(summed cross-entropy, count) of `logits[..., t, :]` against `targets[..., t]`,
    skipping IGNORE_INDEX; sums rather than a mean so that shards can add them up."""
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
    return jnp.where(valid, logz - picked, 0.0).sum(), valid.sum()


def chunked_token_nll(h, weight, targets, chunk: int):
    """`token_nll(h @ weight, targets)` without holding all logits: positions in chunks of
    `chunk`, each chunk's float32 logits recomputed in the backward. At long context the
    logits are the largest activation (32K tokens x 152K vocab x 4 B = 20 GB)."""
    b, s, d = h.shape
    if s <= chunk:
        return token_nll(jnp.dot(h, weight, preferred_element_type=jnp.float32), targets)
    pad = -s % chunk
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    pieces = (h.reshape(b, -1, chunk, d).swapaxes(0, 1),
              targets.reshape(b, -1, chunk).swapaxes(0, 1))

    @jax.checkpoint
    def one(carry, piece):
        nll, count = token_nll(jnp.dot(piece[0], weight, preferred_element_type=jnp.float32),
                               piece[1])
        return (carry[0] + nll, carry[1] + count), None

    # Inside shard_map the sums vary over the axes the inputs vary over; so must the start.
    zero = (varying_like(jnp.zeros((), jnp.float32), h, targets),
            varying_like(jnp.zeros((), jnp.int32), h, targets))
    return jax.lax.scan(one, zero, pieces)[0]


def next_token_loss(logits, labels):
    """Mean cross-entropy of `logits[:, t]` against `labels[:, t+1]`, skipping IGNORE_INDEX.

    Labels are unshifted (as in Hugging Face), so VILA-style label tensors port unchanged.
    """
    total, count = token_nll(logits[:, :-1], labels[:, 1:])
    return total / jnp.maximum(count, 1)


def expand_media_tokens(input_ids, media_token_id: int, tokens_per_frame: int,
                        frames_per_media) -> np.ndarray:
    """Host-side: repeat each media placeholder to the positions its frames take.

    `frames_per_media[k]` is the frame count of the k-th placeholder (1 for an image).
    Raises if the placeholder count and `frames_per_media` disagree.
    """
    ids = [int(t) for t in input_ids]
    spots = [i for i, t in enumerate(ids) if t == media_token_id]
    if len(spots) != len(frames_per_media):
        raise ValueError(f"expand_media_tokens: {len(spots)} media placeholders in the text "
                         f"but {len(frames_per_media)} media items given")
    out, last = [], 0
    for spot, frames in zip(spots, frames_per_media, strict=True):
        out += ids[last:spot] + [media_token_id] * (frames * tokens_per_frame)
        last = spot + 1
    return np.asarray(out + ids[last:], np.int32)


def build_model(config, seed: int | None = None) -> LongVILA:
    """Validate `config` and build a randomly initialised model (with LoRA adapters when
    `model.lora.rank` > 0)."""
    validate(config)
    rngs = nnx.Rngs(config.seed if seed is None else seed)
    return apply_lora(LongVILA(config.model, rngs=rngs), config.model.get("lora"), rngs)
