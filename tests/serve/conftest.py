"""A served tiny model: the OpenAI-compatible server on a free port, in this process."""

from __future__ import annotations

import socket
import threading
import time

import jax
import pytest
from flax import nnx
from serve.names import KEY, MODEL  # tests/serve/names.py

from longvila_jax.checkpoint import build_model
from longvila_jax.configs import model_config
from longvila_jax.data.demo_corpus import build_tokenizer
from longvila_jax.data.synthetic import write_needle_video
from longvila_jax.infer.generate import Generator
from longvila_jax.parallel.mesh import make_mesh
from longvila_jax.serve.app import Settings, build_app

SIZE = 56


def _model(seed: int):
    config = model_config("tiny")
    config.model.llm.tie_embeddings = False  # random tied models only repeat their input
    model = build_model(config, seed=seed)
    # Sharper logits: greedy answers that do not hinge on last-bit rounding.
    nnx.update(model, jax.tree.map(lambda p: p * 6 if p.ndim == 2 else p,
                                   nnx.state(model, nnx.Param)))
    return model


@pytest.fixture(scope="package")
def served(tmp_path_factory):
    """`{"url", "generator", "media", "outside", "app"}`: a running server (API key `KEY`,
    media root `media` holding `video0.mp4`, `video1.mp4`, `notes.txt`, a symlink to
    `outside/secret.mp4`)."""
    import uvicorn

    root = tmp_path_factory.mktemp("serve")
    media, outside = root / "media", root / "outside"
    media.mkdir()
    outside.mkdir()
    for i in range(2):
        write_needle_video(media / f"video{i}.mp4", 12, needle_index=3 + i, needle_seed=11 + i,
                           haystack_seed=5 - i, width=SIZE, height=SIZE, fps=4.0)
    write_needle_video(outside / "secret.mp4", 6, needle_index=1, needle_seed=1,
                       haystack_seed=2, width=SIZE, height=SIZE, fps=4.0)
    (media / "notes.txt").write_text("not a video\n")
    (media / "escape.mp4").symlink_to(outside / "secret.mp4")
    tokenizer = build_tokenizer(root / "tok", ["What colour is the shape shown in the video? "
                                               "red green blue circle square digit 7"] * 3)
    generator = Generator(_model(7), tokenizer, family="qwen2",
                          mesh=make_mesh(1, 1, 1, jax.devices()[:1]), cache_entries=32,
                          decode_chunk=4)
    settings = Settings(model_name=MODEL, api_key=KEY, media_root=str(media), num_frames=4,
                        max_frames=16, max_tokens=12)
    app = build_app(generator, settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{sock.getsockname()[1]}", "generator": generator,
           "media": media, "outside": outside, "app": app}
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=300)
