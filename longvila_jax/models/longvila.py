"""The composite: frames -> SigLIP -> projector (+ per-frame newline) -> spliced into text -> LLM.

Media placeholders are expanded on the host before the model sees them (the way the
Llava processor does it): each image or video frame occupies `media_tokens_per_frame`
consecutive positions holding `media_token_id`, so shapes are static under jit and
splicing is a gather. Media embeddings fill those positions in batch-major order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longvila_jax.data.media import media_rows
from longvila_jax.models.llm import CausalLM, self_mask
from longvila_jax.models.projector import Projector
from longvila_jax.models.siglip import SiglipVisionTower


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
        # Frames fill the media positions batch-major: one row's order over the whole batch.
        rows = media_rows(input_ids.reshape(1, -1), self.media_token_id)
        return splice_media(x, media, rows.reshape(input_ids.shape))

    def __call__(self, input_ids, images=None, positions=None, segment_ids=None):
        """Float32 logits `[batch, seq, vocab]`."""
        return self.llm.from_embeddings(self.embed(input_ids, images),
                                        self_mask(positions, segment_ids))


def splice_media(x, media, rows):
    """`x` `[b, s, hidden]` with each position whose `rows` entry is >= 0 replaced by that
    row of `media` `[n, hidden]` (-1: keep the text embedding).

    A row >= n (more media positions than frames) gives NaN there: jit cannot raise on a
    value, and clipping would silently splice the last frame's embedding; NaN reaches the
    logits and the loss, where it shows. In-range rows gather exactly as before.
    """
    gathered = jnp.take(media, rows, axis=0, mode="fill", fill_value=jnp.nan)
    return jnp.where((rows >= 0)[..., None], gathered.astype(x.dtype), x)
