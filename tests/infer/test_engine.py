"""Inference against independent references: cached decoding against the full forward pass
token by token, sequence-parallel prefill and decoding on 8 simulated devices against one
device (logits and KV cache), and the sampler against float64 numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longvila_jax.checkpoint import build_model
from longvila_jax.configs import model_config
from longvila_jax.infer.decode import Sampling, sample
from longvila_jax.infer.engine import InferenceEngine
from longvila_jax.parallel.mesh import make_mesh

FRAMES = 3
NEW_TOKENS = 20
DRAWS = 8  # a degenerate draw is ~1 %: eight in a row is never seen


def _model(seed: int, **llm):
    """The tiny model, untied and with larger weights, so that greedy decoding of a random
    model wanders over the vocabulary instead of repeating its input token."""
    config = model_config("tiny")
    config.model.llm.update(tie_embeddings=False, **llm)
    model = build_model(config, seed=seed)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p * 6.0 if p.ndim == 2 else p, state))
    return model


def _draw_world(rng):
    model = _model(int(rng.integers(1 << 30)))
    frames = rng.normal(size=(FRAMES, 56, 56, 3)).astype(np.float32)
    media = np.full(FRAMES * model.media_tokens_per_frame, model.media_token_id)
    prompts = [np.concatenate([rng.integers(0, 500, 4), media, rng.integers(0, 500, n)])
               .astype(np.int32) for n in (5, 23)]
    one = InferenceEngine(model, mesh=make_mesh(1, 1, 1, jax.devices()[:1]))
    table = one.encode(frames)
    greedy = one.generate_ids_and_logits(prompts, table,
                                            sampling=Sampling(NEW_TOKENS))
    return {"model": model, "frames": frames, "prompts": prompts, "one": one, "table": table,
            "greedy": greedy}


@pytest.fixture(scope="module")
def world(module_rng):
    """A random model, frames, two prompts about them, the one-device engine and its greedy
    decoding of the prompts (`greedy`: ids and logits), drawn again (up to `DRAWS` times,
    the same draws for a seed) while that decoding is degenerate: a few tokens repeated
    check little, and some random models do that."""
    for _ in range(DRAWS):
        world = _draw_world(module_rng)
        if all(len(set(ids)) > 3 for ids in world["greedy"][0]):
            return world
    raise AssertionError(f"{DRAWS} random models in a row decode degenerately: "
                         f"{world['greedy'][0]}")


def test_encoding_matches_the_model_and_spreads_over_devices(world):
    want = world["model"].encode_frames(jnp.asarray(world["frames"]))
    np.testing.assert_allclose(world["table"], want, rtol=1e-5, atol=1e-5)
    eight = InferenceEngine(world["model"], mesh=make_mesh(1, 2, 4))
    got = eight.encode(world["frames"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cached_greedy_decoding_equals_full_forward_argmax(world):
    """Every generated token is the argmax of the full forward pass over prompt + tokens so
    far, the media placeholder aside (decoding never emits it), and its logits are that
    pass's. The pass embeds the prompt with its frames and generated tokens as text, so a
    generated id is never taken for media."""
    model, frames = world["model"], jnp.asarray(world["frames"])
    forward = jax.jit(lambda x: model.llm.from_embeddings(x)[0])
    for prompt, got, got_logits in zip(world["prompts"], *world["greedy"], strict=True):
        assert len(got) == NEW_TOKENS
        x = jnp.concatenate([model.embed(jnp.asarray(prompt)[None], frames),
                             model.llm.embed(jnp.asarray(got)[None])], axis=1)
        # Causal: position t sees tokens up to t, so one pass gives every step's logits.
        full = np.array(forward(x))[len(prompt) - 1: len(prompt) - 1 + len(got)]
        np.testing.assert_allclose(got_logits, full, rtol=2e-4, atol=2e-4)
        full[:, model.media_token_id] = -np.inf
        np.testing.assert_array_equal(got, full.argmax(axis=-1))


def _prefers_media(model):
    """`model` made to rank the media placeholder first everywhere: hidden unit 0 of every
    token embedding is large, so it dominates the final (normalised) hidden state, and its
    output weight to the media id alone is large too."""
    llm = model.llm
    llm.embed_tokens[...] = llm.embed_tokens[...].at[:, 0].set(100.0)
    llm.lm_head[...] = llm.lm_head[...].at[0, model.media_token_id].set(100.0)
    return model


def test_decoding_never_emits_the_media_placeholder(world, rng):
    """A generated placeholder would be taken for a frame by any later pass over the text;
    even a model whose logits always rank it first never emits it, greedy or sampling, and
    the logits returned are still the model's."""
    model = _prefers_media(_model(int(rng.integers(1 << 30))))
    engine = InferenceEngine(model, mesh=make_mesh(1, 1, 1, jax.devices()[:1]))
    table = engine.encode(world["frames"])
    media = model.media_token_id
    for hot in (dict(), dict(temperature=1.0), dict(temperature=1.5, top_p=0.9)):
        ids, logits = engine.generate_ids_and_logits(world["prompts"], table,
                                                     sampling=Sampling(18, **hot))
        for got, got_logits in zip(ids, logits, strict=True):
            assert len(got) == 18 and media not in got, (hot, got)
            assert (got_logits.argmax(axis=-1) == media).all(), hot


@pytest.mark.parametrize(("mesh", "scheme", "heads"), [
    ((8, 1), "ring", 4),
    ((1, 8), "ulysses", 8),
    ((2, 4), "2d", 4),  # Ulysses over 4 repeats the 2 KV heads
])
def test_sequence_parallel_prefill_and_decoding_match_one_device(world, mesh, scheme, heads):
    model = world["model"] if heads == 4 else _model(3, num_heads=heads, head_dim=8)
    one = world["one"] if heads == 4 else InferenceEngine(
        model, mesh=make_mesh(1, 1, 1, jax.devices()[:1]))
    sp = InferenceEngine(model, mesh=make_mesh(1, *mesh), scheme=scheme)
    assert sp.scheme == scheme
    table = one.encode(world["frames"])
    prompts = world["prompts"]
    windows = [list(range(len(p) - 6, len(p))) for p in prompts]
    logits_1, cache_1 = one.prefill(prompts, table, windows=windows)
    logits_8, cache_8 = sp.prefill(prompts, table, windows=windows)
    np.testing.assert_allclose(logits_8, logits_1, rtol=1e-4, atol=1e-4)
    # The KV cache, put back in natural order, on every real (unpadded) position.
    for name in ("k", "v"):
        for row, prompt in enumerate(prompts):
            n = len(prompt)
            order = np.argsort(np.asarray(cache_8.positions[row]))
            sharded = np.asarray(getattr(cache_8, name))[:, row, order[:n]]
            single = np.asarray(getattr(cache_1, name))[:, row, :n]
            np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-4)
    assert len(cache_8.k[0].sharding.device_set) == 8
    ids_1, dec_1 = one.generate_ids_and_logits(prompts, table, sampling=Sampling(18))
    ids_8, dec_8 = sp.generate_ids_and_logits(prompts, table, sampling=Sampling(18))
    assert ids_8 == ids_1
    for a, b in zip(dec_8, dec_1, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
    # Two sampled answers per prompt from the sharded cache: the full forward pass's logits.
    sampled, logits = sp.generate_ids_and_logits(
        prompts, table, sampling=Sampling(8, n=2, temperature=1.0, seed=heads))
    for row, (got, got_logits) in enumerate(zip(sampled, logits, strict=True)):
        full = _teacher_forced(model, prompts[row // 2], world["frames"], got)
        np.testing.assert_allclose(got_logits, full, rtol=2e-4, atol=2e-4)


def _teacher_forced(model, prompt, frames, got) -> np.ndarray:
    """The full forward pass's float32 logits at each of `got`'s steps after `prompt` (its
    media positions filled from `frames`; generated ids embedded as text)."""
    x = jnp.concatenate([model.embed(jnp.asarray(prompt)[None], jnp.asarray(frames)),
                         model.llm.embed(jnp.asarray(got, jnp.int32)[None])], axis=1)
    return np.asarray(model.llm.from_embeddings(x)[0])[len(prompt) - 1:][: len(got)]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    return z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True))
                                                 .sum(-1, keepdims=True))


def test_answers_sharing_a_prompt_each_see_their_own_tokens(world, rng):
    """n = 3 sampled answers per prompt from one cache: each answer's logits are the full
    forward pass over its prompt and its own tokens (so no answer sees another's), and its
    log-probabilities are that pass's log-softmax (temperature 1) at its tokens; greedy
    answers sharing a prompt are the prompt's greedy answer."""
    one, prompts, table, model = world["one"], world["prompts"], world["table"], world["model"]
    hot = Sampling(10, n=3, temperature=2.0, top_p=0.9, seed=int(rng.integers(1 << 30)))
    ids, logits = one.generate_ids_and_logits(prompts, table, sampling=hot)
    same, logprobs = one.generate_ids_and_logprobs(prompts, table, sampling=hot)
    assert same == ids and len(ids) == 6
    assert any(len({tuple(a) for a in ids[3 * i: 3 * i + 3]}) > 1 for i in range(2)), ids
    for row, (got, got_logits, got_logprobs) in enumerate(zip(ids, logits, logprobs,
                                                              strict=True)):
        full = _teacher_forced(model, prompts[row // 3], world["frames"], got)
        np.testing.assert_allclose(got_logits, full, rtol=2e-4, atol=2e-4)
        want = _log_softmax(full)[np.arange(len(got)), got]
        np.testing.assert_allclose(got_logprobs, want, rtol=1e-4, atol=1e-4)
    greedy = one.generate_ids(prompts, table, sampling=Sampling(12, n=3))
    for row, answer in enumerate(greedy):
        assert answer == world["greedy"][0][row // 3][:12]


def test_prompts_about_different_videos_in_one_call_equal_each_alone(world, rng):
    """Two videos' embeddings in one table, each prompt reading its own rows: the batch's
    answers and logits are each prompt's alone."""
    one = world["one"]
    other = rng.normal(size=world["frames"].shape).astype(np.float32)
    tables = [world["table"], one.encode(other)]
    rows = tables[0].shape[0] * tables[0].shape[1]
    both_ids, both_logits = one.generate_ids_and_logits(
        world["prompts"], jnp.concatenate(tables), media_offsets=[0, rows],
        sampling=Sampling(8, n=2))
    for i, (prompt, table) in enumerate(zip(world["prompts"], tables, strict=True)):
        alone_ids, alone_logits = one.generate_ids_and_logits([prompt], table,
                                                              sampling=Sampling(8, n=2))
        assert both_ids[2 * i: 2 * i + 2] == alone_ids
        for a, b in zip(both_logits[2 * i: 2 * i + 2], alone_logits, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_stop_ids_and_sampling_seeds(world):
    one, prompts, table = world["one"], world["prompts"], world["table"]
    greedy = one.generate_ids(prompts, table, sampling=Sampling(12))
    stop = greedy[1][5]
    cut = one.generate_ids(prompts, table, sampling=Sampling(12, stop_ids=[stop]))
    kept = one.generate_ids(prompts, table,
                            sampling=Sampling(12, stop_ids=[stop], keep_stop=True))
    for full, short, with_stop in zip(greedy, cut, kept, strict=True):
        expected = full[: full.index(stop)] if stop in full else full
        assert short == expected
        assert with_stop == (full[: full.index(stop) + 1] if stop in full else full)
    hot = dict(max_new_tokens=12, temperature=1.5, top_p=0.9)
    a = one.generate_ids(prompts, table, sampling=Sampling(seed=1, **hot))
    assert a == one.generate_ids(prompts, table, sampling=Sampling(seed=1, **hot))
    assert a != one.generate_ids(prompts, table, sampling=Sampling(seed=2, **hot))
    with pytest.raises(ValueError, match="top_p"):
        Sampling(4, top_p=0.0)


def _reference_nucleus(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """float64 probabilities of nucleus sampling: the most likely tokens whose mass before
    them is below top_p, renormalised."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize(("temperature", "top_p", "ban"),
                         [(1.0, 1.0, False), (0.7, 0.8, False), (2.0, 0.5, False),
                          (0.7, 0.8, True)])
def test_sampler_frequencies_match_float64_nucleus(rng, temperature, top_p, ban):
    """Banning the most likely id (as decoding bans the media placeholder) samples as if the
    vocabulary lacked it."""
    logits = rng.normal(size=(1, 12)).astype(np.float32) * 2
    banned = (int(logits.argmax()),) if ban else ()
    draws = 20000
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), draws)
    tokens = jax.vmap(lambda k: sample(jnp.asarray(logits), k, temperature, top_p, banned))(keys)
    freq = np.bincount(np.asarray(tokens).ravel(), minlength=12) / draws
    allowed = logits[0].copy()
    allowed[list(banned)] = -np.inf
    want = _reference_nucleus(allowed, temperature, top_p)
    assert (freq[want == 0] == 0).all()
    np.testing.assert_allclose(freq, want, atol=0.015)
    greedy = sample(jnp.asarray(logits), keys[0], 0.0, top_p, banned)
    assert int(greedy[0]) == allowed.argmax()


def test_prefill_bytes_grow_with_the_prompt_and_cover_the_cache(world):
    """The compile-only footprint covers at least the KV cache it writes, and grows with
    the prompt (what bench/inference.py's longest-video search relies on)."""
    engine = InferenceEngine(world["model"], mesh=make_mesh(1, 2, 4))
    llm = model_config("tiny").model.llm
    short, long = (engine.prefill_bytes(n, media_rows=64) for n in (512, 4096))
    cache = 2 * llm.num_layers * 4096 * llm.num_kv_heads * llm.head_dim * 4 / 8  # f32, 8-way
    assert long > short and long >= cache


def test_update_weights_follows_the_model_and_release_frees_the_view(world, module_rng):
    """RL's engine: after `update_weights(other)` it decodes as an engine built on `other`
    does; `release_weights` leaves its view only the shapes (the caller's model intact),
    and a call then is one clear error until the next `update_weights`."""
    one = make_mesh(1, 1, 1, jax.devices()[:1])
    other = _model(int(module_rng.integers(1 << 30)))
    engine = InferenceEngine(world["model"], mesh=one)
    engine.update_weights(other)

    def greedy(engine):
        return engine.generate_ids_and_logits(world["prompts"], engine.encode(world["frames"]),
                                              sampling=Sampling(NEW_TOKENS))

    want_ids, want_logits = greedy(InferenceEngine(other, mesh=one))
    got_ids, got_logits = greedy(engine)
    assert got_ids == want_ids
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)

    engine.release_weights()
    assert not [x for x in jax.tree.leaves(nnx.state(engine.model))
                if isinstance(x, jax.Array)]
    with pytest.raises(RuntimeError, match="update_weights"):
        engine.encode(world["frames"])
    engine.update_weights(world["model"])
    assert greedy(engine)[0] == world["greedy"][0]
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(world["model"])))
