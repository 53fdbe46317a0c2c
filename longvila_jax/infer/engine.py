"""A model placed on a device mesh for inference: encode frames, prefill, decode.

The three phases shard differently, as MM-SP does in training: frames are spread over every
device for the vision tower and projector (stage one); the prompt's tokens over the sequence
group for prefill (`prefill.py`, stage two); decoding keeps the prompt's KV cache where
prefill left it (`decode.py`). Parameters are replicated: inference holds no optimizer
state, and a 7B model's 15 GB fit on every GPU next to a long cache.

Everything here takes token ids and embedding tables; text, chat templates and videos are
`generate.py`'s business.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.data.batch import Batch
from longvila_jax.data.media import media_rows
from longvila_jax.infer.decode import DecodeState, Sampling, make_decode, make_start
from longvila_jax.infer.prefill import TOKENS, PromptCache, make_prefill, make_window_logits
from longvila_jax.memory import planned_bytes
from longvila_jax.models.layers import unstack
from longvila_jax.models.longvila import LongVILA
from longvila_jax.parallel.layout import Layout
from longvila_jax.parallel.mesh import AXES, make_mesh
from longvila_jax.parallel.schemes import resolve_scheme

# Prompts are right-padded to a multiple of this times twice the group size (the zigzag
# layout's unit), so prompts of similar length share one compiled prefill. Past
# LONG_PROMPT tokens per device, to a multiple of LONG_BUCKET instead: each device's cache
# shard is then a multiple of 512 tokens, which XLA's split-K products over the cache in
# a decoding step need (at 50,560 tokens it padded a copy of every layer's values on each
# step: 0.9 of 15.7 ms per token on one H200).
SEQ_BUCKET = 64
LONG_PROMPT = 8192
LONG_BUCKET = 256


class InferenceEngine:
    """`model` replicated on `mesh` (default: every device in one Ulysses/ring group).

    The engine runs its own view of the model, `self.model`: the same arrays but the LLM's
    stacked decoder layers, which become a list of layers with weights of their own
    (`models.layers.unstack`), read in place by decoding instead of copied out of the stack
    on every token. The caller's model is left as it was (training and checkpoints use the
    stacked layout); drop it to keep one copy of the layers' weights on the device.
    """

    def __init__(self, model: LongVILA, *, mesh=None, scheme: str = "auto",
                 decode_chunk: int = 16):
        self.mesh = mesh if mesh is not None else make_mesh(1, 1, len(jax.devices()))
        if self.mesh.shape["data"] != 1:
            raise ValueError(f"inference: the mesh's data axis must be 1, got "
                             f"{self.mesh.shape['data']} (prompts share one sequence group)")
        self.node, self.local = self.mesh.shape["node"], self.mesh.shape["local"]
        self.model = model = _unstacked(model)
        llm = model.llm.layers
        layer = llm[0]
        self.scheme = resolve_scheme(scheme, self.node, self.local,
                                     (layer.num_heads, layer.num_kv_heads))
        self.layout = Layout(self.scheme, 1, self.node, self.local)
        self.media_token_id = model.media_token_id
        self.tokens_per_frame = model.media_tokens_per_frame if model.projector else 0
        self.hidden = model.llm.embed_tokens.shape[1]
        self.dtype = model.llm.dtype
        # (layers, kv_heads, head_dim, dtype) of a KV cache
        self.kv_shape = (len(llm), layer.num_kv_heads, layer.head_dim, jnp.dtype(self.dtype))
        self.decode_chunk = decode_chunk
        graphdef, params = nnx.split(model)
        self._params = jax.device_put(params, NamedSharding(self.mesh, P()))
        nnx.update(model, self._params)  # the view holds the replicated arrays, not both
        # jit compiles lazily: a variant costs nothing until it is called.
        self._prefill = make_prefill(graphdef, self.mesh, self.scheme)
        self._window_logits = make_window_logits(graphdef, self.mesh, self.scheme)
        # A generated media placeholder would mean nothing (no frame fills it, and a later
        # pass over the text would take it for one), so decoding never emits it.
        banned = (self.media_token_id,)
        self._start = make_start(self.mesh, banned)
        self._decode = make_decode(graphdef, self.mesh, banned)
        frames = NamedSharding(self.mesh, P(AXES))
        self._encode = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_frames(x),
                               out_shardings=frames)
        self._frames = frames

    @property
    def params(self):
        """The engine's view of the weights (replicated, layers unstacked)."""
        if self._params is None:
            raise RuntimeError("InferenceEngine: its weights were released "
                               "(release_weights); call update_weights first")
        return self._params

    def update_weights(self, model: LongVILA) -> None:
        """Decode with `model`'s current weights from now on: RL's trained parameters (FSDP-
        sharded, layers stacked, the structure this engine was built from) laid out as the
        engine's view, replicated and unstacked, on the same devices; nothing is compiled
        again (the shapes do not change)."""
        params = nnx.state(_unstacked(model))
        if jax.tree.structure(params) != jax.tree.structure(nnx.state(self.model)):
            raise ValueError("update_weights: the model's structure differs from the engine's")
        self.release_weights()  # the old view's memory is free before the new one is laid out
        # Copies even of arrays already replicated: the training step donates the model's
        # buffers, which would delete an aliased engine parameter.
        self._params = jax.device_put(params, NamedSharding(self.mesh, P()), may_alias=False)
        nnx.update(self.model, self._params)

    def release_weights(self) -> None:
        """Free the engine's view of the weights until the next `update_weights`: `model`
        keeps only their shapes. RL lays the view out from the trained parameters before
        each rollout and frees it after, so the update's activations never share the device
        with a second copy of the weights."""
        self._params = None
        nnx.update(self.model, jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.state(self.model)))

    @property
    def group(self) -> int:
        return self.node * self.local

    def _padded_length(self, length: int) -> int:
        long = length > LONG_PROMPT * self.group
        unit = 2 * self.group * (LONG_BUCKET if long else SEQ_BUCKET)
        return math.ceil(length / unit) * unit

    def encode(self, frames: np.ndarray, frames_per_device: int = 64) -> jax.Array:
        """Float32 frames `[F, H, W, 3]` -> embeddings `[F, media_tokens_per_frame, hidden]`,
        the frames spread evenly over every device, `frames_per_device` per device and call
        (so a 2048-frame video never holds every frame's tower activations at once). A frame's
        embedding depends on that frame alone; the last call is padded with blank frames."""
        frames = np.asarray(frames, np.float32)
        step = frames_per_device * self.mesh.devices.size
        count = len(frames)
        parts = []
        for first in range(0, count, step):
            chunk = frames[first:first + step]
            size = min(step, math.ceil(len(chunk) / self.mesh.devices.size)
                       * self.mesh.devices.size)
            padded = np.zeros((size, *frames.shape[1:]), np.float32)
            padded[: len(chunk)] = chunk
            parts.append(self._encode(self.params, jax.device_put(padded, self._frames))
                         [: len(chunk)])
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    def prefill(self, prompts: Sequence[np.ndarray], table=None,
                media_offsets: Sequence[int] | None = None,
                windows: Sequence[Sequence[int]] | None = None):
        """`(logits float32 [batch, w, vocab], PromptCache)` of a batch of token-id prompts.

        Prompt i's media positions take rows `media_offsets[i]`, `+1`, ... of `table`
        (`[rows, hidden]` or `[frames, tokens, hidden]`; offsets default to 0: every prompt
        about the same video). `windows[i]` are the positions whose logits are returned
        (default: the last, which predicts the first new token); rows of unequal width
        repeat their last position.
        """
        batch, table, window, lengths = self._prompts(prompts, table, media_offsets, windows)
        logits, k, v = self._prefill(self.params, batch, table, window)
        return logits, PromptCache(k=k, v=v, positions=batch.positions,
                                   lengths=jnp.asarray(lengths, jnp.int32))

    def window_logits(self, prompts: Sequence[np.ndarray], table=None,
                      media_offsets: Sequence[int] | None = None,
                      windows: Sequence[Sequence[int]] | None = None):
        """`prefill`'s logits alone (teacher-forced scoring): no KV cache is written out."""
        return self._window_logits(self.params, *self._prompts(prompts, table, media_offsets,
                                                               windows)[:3])

    def _prompts(self, prompts, table, media_offsets, windows):
        """The prompts' laid-out `Batch`, the table, the windows and the prompt lengths."""
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) < 1:
            raise ValueError("prefill: need at least one non-empty prompt")
        seq = self._padded_length(max(lengths))
        pad_id = int(self.media_token_id == 0)
        ids = np.full((len(prompts), seq), pad_id, np.int32)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        offsets = np.zeros(len(prompts), np.int32) if media_offsets is None \
            else np.asarray(media_offsets, np.int32)
        rows = media_rows(ids, self.media_token_id, offsets)
        if table is None:
            if rows.max() >= 0:
                raise ValueError("prefill: the prompts hold media positions but no table")
            table = jnp.zeros((1, self.hidden), self.dtype)
        table = jax.device_put(table.reshape(-1, self.hidden), NamedSharding(self.mesh, P()))
        if rows.max() >= table.shape[0]:
            raise ValueError(f"prefill: the prompts need {rows.max() + 1} media rows but the "
                             f"table has {table.shape[0]}")
        windows = [[n - 1] for n in lengths] if windows is None else windows
        width = max(len(w) for w in windows)
        window = np.asarray([list(w) + [w[-1]] * (width - len(w)) for w in windows], np.int32)
        batch = jax.device_put(self.layout.lay_out(Batch(
            ids, None, np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape),
            np.zeros_like(ids), rows)), NamedSharding(self.mesh, TOKENS))
        return batch, table, window, lengths

    def prefill_bytes(self, prompt_length: int, media_rows: int, batch: int = 1) -> int:
        """Device bytes per device that XLA plans for a prefill of `batch` prompts of
        `prompt_length` tokens with a `media_rows`-row embedding table, KV cache kept
        (arguments, outputs and temporaries, by the compiled memory analysis): whether a
        video fits, without encoding or running it. Compiling takes seconds to minutes; jit
        compiles again at the real call unless JAX's persistent compilation cache is on."""
        seq = self._padded_length(prompt_length)
        tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32,
                                      sharding=NamedSharding(self.mesh, TOKENS))
        table = jax.ShapeDtypeStruct((media_rows, self.hidden), self.dtype,
                                     sharding=NamedSharding(self.mesh, P()))
        window = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
        prompts = Batch(tokens, None, tokens, tokens, tokens)
        return planned_bytes(self._prefill.lower(self.params, prompts, table, window).compile())

    def generate_ids(self, prompts: Sequence[np.ndarray], table=None,
                     media_offsets: Sequence[int] | None = None, *, sampling: Sampling,
                     done: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
        """New token ids: `sampling.n` answers per prompt, prompt-major (answer j of prompt
        i is row `i * n + j`), all from the prompt's one prefilled cache.

        A row ends at its first stop id (not included), when `done(row, ids)` says so (stop
        strings), or after `max_new_tokens`. No token is ever the media placeholder id.
        """
        return self._generate(self.prefill(prompts, table, media_offsets), sampling, done,
                              with_logits=False)[0]

    def generate_ids_after(self, prefilled: tuple[jax.Array, PromptCache], *,
                           sampling: Sampling,
                           done: Callable[[int, list[int]], bool] | None = None
                           ) -> list[list[int]]:
        """`generate_ids` from prompts already prefilled (`prefill`'s logits and cache, which
        decoding only reads): sample them again without a second prefill."""
        return self._generate(prefilled, sampling, done, with_logits=False)[0]

    def generate_ids_and_logprobs(self, prompts: Sequence[np.ndarray], table=None,
                                  media_offsets: Sequence[int] | None = None, *,
                                  sampling: Sampling):
        """`generate_ids` and each row's float32 log-probabilities of its tokens under the
        model (log-softmax of its logits over the whole vocabulary at temperature 1, the
        sampler's temperature, top-p and banned id aside): what RL's update compares."""
        ids, logprobs, _ = self._generate(self.prefill(prompts, table, media_offsets),
                                          sampling, None, with_logits=False)
        return ids, logprobs

    def generate_ids_and_logits(self, prompts: Sequence[np.ndarray], table=None,
                                media_offsets: Sequence[int] | None = None, *,
                                sampling: Sampling):
        """`generate_ids` and each row's float32 logits `[tokens, vocab]`: the model's at each
        of its tokens, unmasked; the token was drawn from them with the media placeholder's
        logit at -inf (greedy: their argmax over every other id). Tests compare them with
        the full forward pass; a 152K vocabulary makes them too big to keep otherwise."""
        ids, _, logits = self._generate(self.prefill(prompts, table, media_offsets),
                                        sampling, None, with_logits=True)
        return ids, logits

    def _generate(self, prefilled, sampling: Sampling, done, *, with_logits: bool):
        """(ids, logprobs, logits or None) per row: from the prompts' prefill, sample each
        one's `n` first tokens, then decode on the device; with `done`, a chunk at a time so
        that the host can check stop strings, else in one call."""
        logits, cache = prefilled
        n, max_new_tokens, stop_ids = sampling.n, sampling.max_new_tokens, sampling.stop_ids
        temperature, top_p = jnp.float32(sampling.temperature), jnp.float32(sampling.top_p)
        stops = jnp.asarray(sorted(set(stop_ids)) or [-1], jnp.int32)
        slots = math.ceil(max_new_tokens / self.decode_chunk) * self.decode_chunk
        state = self._start(logits, jax.random.key(sampling.seed), temperature, top_p, stops,
                            n=n, slots=slots, kv_shape=self.kv_shape, with_logits=with_logits)
        rows = logits.shape[0] * n
        finished = np.zeros(rows, bool)
        while True:
            produced = int(state.step)
            finished |= np.asarray(state.done).reshape(rows)
            if done is not None:
                ids = np.asarray(state.ids)[:produced].reshape(produced, rows).T
                for row in np.flatnonzero(~finished):
                    finished[row] = done(int(row), _until_stop(ids[row].tolist(), stop_ids))
            if finished.all() or produced >= max_new_tokens:
                break
            if done is not None:
                state = dataclasses.replace(state, done=jax.device_put(
                    finished.reshape(state.done.shape), NamedSharding(self.mesh, P())))
            until = max_new_tokens if done is None else min(produced + self.decode_chunk,
                                                            max_new_tokens)
            state = self._decode(self.params, cache, state, jnp.int32(until), temperature,
                                 top_p, stops)
        return self._rows(state, rows, produced, sampling, with_logits)

    @staticmethod
    def _rows(state: DecodeState, rows: int, produced: int, sampling: Sampling,
              with_logits: bool):
        """Per row: ids up to its first stop id (and it, with `sampling.keep_stop`), their
        log-probabilities, their logits."""
        ids = np.asarray(state.ids)[:produced].reshape(produced, rows).T
        logprobs = np.asarray(state.logprobs)[:produced].reshape(produced, rows).T
        logits = np.asarray(state.logits)[:produced].reshape(produced, rows, -1) \
            .transpose(1, 0, 2) if with_logits else None
        out_ids, out_logprobs, out_logits = [], [], []
        for row in range(rows):
            kept = _until_stop(ids[row].tolist(), sampling.stop_ids, sampling.keep_stop)
            out_ids.append(kept)
            out_logprobs.append(logprobs[row, : len(kept)])
            if with_logits:
                out_logits.append(logits[row, : len(kept)])
        return out_ids, out_logprobs, out_logits if with_logits else None


def _unstacked(model: LongVILA) -> LongVILA:
    """`model` with its LLM's layers as a list of layers (`models.layers.unstack`): new
    modules and Variables (updating them leaves the caller's model as it was), over the
    same arrays where they are already unstacked."""
    model = nnx.merge(*nnx.split(model), copy=True)
    if not isinstance(model.llm.layers, nnx.List):
        model.llm.layers = unstack(model.llm.layers)
    return model


def _until_stop(ids: list[int], stop_ids, keep: bool = False) -> list[int]:
    """`ids` before the first of `stop_ids` (through it with `keep`)."""
    stops = set(stop_ids)
    return next((ids[: i + keep] for i, t in enumerate(ids) if t in stops), ids)
