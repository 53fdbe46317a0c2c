"""The text-level API: prompts are the chat template's tokens with the video's frames in place,
cached video embeddings equal fresh ones (memory and disk, keyed by video, sampling and
model), stop strings, a batch equal to its prompts one by one."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from longvila_jax.checkpoint import build_model
from longvila_jax.configs import model_config
from longvila_jax.data.demo_corpus import build_tokenizer
from longvila_jax.data.synthetic import write_needle_video
from longvila_jax.data.video import load_frames
from longvila_jax.infer.embeddings import VideoEmbeddingCache
from longvila_jax.infer.engine import InferenceEngine
from longvila_jax.infer.generate import Generator
from longvila_jax.parallel.mesh import make_mesh

SIZE = 56


def _model(seed: int, dtype: str = "float32"):
    config = model_config("tiny")
    config.model.llm.tie_embeddings = False  # random tied models only repeat their input
    config.model.update(dtype=dtype, param_dtype=dtype)
    model = build_model(config, seed=seed)
    nnx.update(model, jax.tree.map(lambda p: p * 6 if p.ndim == 2 else p,
                                   nnx.state(model, nnx.Param)))
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory, module_rng):
    root = tmp_path_factory.mktemp("generate")
    seed = int(module_rng.integers(1 << 30))
    videos = []
    for i in range(2):
        path = root / f"video{i}.mp4"
        write_needle_video(path, 12, needle_index=int(module_rng.integers(12)),
                           needle_seed=seed + i, haystack_seed=seed - i, width=SIZE,
                           height=SIZE, fps=4.0)
        videos.append(path)
    tokenizer = build_tokenizer(root / "tok", ["What colour is the shape shown in the video? "
                                               "red green blue circle square digit 7"] * 3)
    model = _model(seed)
    generator = Generator(model, tokenizer, family="qwen2",
                          mesh=make_mesh(1, 1, 1, jax.devices()[:1]))
    return {"root": root, "videos": videos, "model": model, "generator": generator,
            "tokenizer": tokenizer}


QWEN2_HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
QWEN2_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(("prompt", "num_frames", "text"), [
    ("What colour is the shape?", 3, "<image>\nWhat colour is the shape?"),
    ("Describe <video> briefly.", 2, "Describe <image> briefly."),  # the video where it says
    ("Say something.", 0, "Say something."),
])
def test_prompt_ids_are_the_template_with_the_frames_in_place(world, prompt, num_frames, text):
    generator = world["generator"]
    media, per_frame = world["model"].media_token_id, generator.engine.tokens_per_frame
    template = generator.tokenizer.encode(QWEN2_HEAD + text + QWEN2_TAIL,
                                          add_special_tokens=False).ids
    expected = [i for t in template for i in ([t] * num_frames * per_frame if t == media else [t])]
    ids = generator.prompt_ids(prompt, num_frames)
    assert ids.dtype == np.int32
    assert ids.tolist() == expected and (ids == media).sum() == num_frames * per_frame


def test_cached_embeddings_equal_fresh_ones(world, tmp_path):
    model, video = world["model"], world["videos"][0]
    engine = InferenceEngine(model, mesh=make_mesh(1, 2, 4))
    fresh = model.encode_frames(load_frames(video, 6, image_size=SIZE))
    cache = VideoEmbeddingCache(engine, model, directory=tmp_path)
    first = cache.get(video, 6)
    np.testing.assert_allclose(first, fresh, rtol=1e-5, atol=1e-5)
    assert cache.get(video, 6) is first and cache.hits["memory"] == 1
    assert cache.misses == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    # A new cache (a later run) reads the file: bit-identical, no encoding.
    again = VideoEmbeddingCache(engine, model, directory=tmp_path)
    np.testing.assert_array_equal(again.get(video, 6), first)
    assert again.hits["disk"] == 1 and again.misses == 0
    # Other sampling, another video, an edited video, another model: other keys.
    keys = {cache.key(video, 6, None), cache.key(video, 7, None), cache.key(video, 6, 2.0),
            cache.key(world["videos"][1], 6, None)}
    assert len(keys) == 4
    before, stat = cache.key(video, 6, None), os.stat(video)
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.key(video, 6, None) != before
    other = VideoEmbeddingCache(engine, _model(1), directory=tmp_path)
    assert other.fingerprint != cache.fingerprint
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))


def test_bfloat16_embeddings_round_trip_through_disk(world, tmp_path):
    model = _model(2, "bfloat16")
    engine = InferenceEngine(model, mesh=make_mesh(1, 1, 1, jax.devices()[:1]))
    first = VideoEmbeddingCache(engine, model, directory=tmp_path).get(world["videos"][0], 4)
    again = VideoEmbeddingCache(engine, model, directory=tmp_path).get(world["videos"][0], 4)
    assert first.dtype == again.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))


def test_stop_strings_cut_the_answer(world, monkeypatch):
    """A random model may end its turn at once, so the end-of-turn tokens are off here and
    every answer runs the full 24 tokens; the stop string is two decoded characters of it
    (not a replacement character, which a later byte may still complete)."""
    generator, video = world["generator"], world["videos"][0]
    monkeypatch.setattr(generator, "stop_ids", ())
    full = generator.generate("What colour is the shape?", video=video, num_frames=4,
                              max_new_tokens=24)[0]
    starts = [i for i in range(1, len(full) - 1) if "\ufffd" not in full[i:i + 2]]
    assert starts, repr(full)
    stop = full[starts[0]:starts[0] + 2]
    cut = generator.generate("What colour is the shape?", video=video, num_frames=4,
                             max_new_tokens=24, stop=[stop])[0]
    assert cut == full[: full.index(stop)]


def test_a_batch_equals_its_prompts_one_by_one(world):
    """Prompts about one video, and about a video each, in one call: each answer is its
    prompt's alone; each video is encoded once; `n` answers per prompt come prompt-major."""
    generator, videos = world["generator"], world["videos"]
    prompts = ["What colour is the shape?", "Describe the video in a few words, please."]
    misses = generator.embeddings.misses
    batch = generator.generate(prompts, video=videos[1], num_frames=5, max_new_tokens=12)
    alone = [generator.generate(p, video=videos[1], num_frames=5, max_new_tokens=12)[0]
             for p in prompts]
    assert batch == alone
    assert generator.embeddings.misses == misses + 1  # encoded once for all three
    each = generator.generate(prompts, video=videos, num_frames=5, max_new_tokens=12, n=2)
    assert each[2:] == [alone[1]] * 2
    assert each[:2] == generator.generate(prompts[0], video=videos[0], num_frames=5,
                                          max_new_tokens=12) * 2
    with pytest.raises(ValueError, match="2 videos for 1 prompts"):
        generator.generate(prompts[:1], video=videos, max_new_tokens=2)
    text_only = generator.generate("Say something.", max_new_tokens=5)
    assert isinstance(text_only[0], str)
