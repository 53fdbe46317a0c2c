"""Serving throughput: the OpenAI-compatible server under 1, 8 and 32 concurrent clients.

A random-weight model of `--model` (the demo tokenizer's special ids: its chat template and
media token) is served in this process (`serve.app`, uvicorn on a free port) with a media
root of `--videos` synthetic videos of `--frames` frames at the tower's image size. Each of
C clients (a thread; plain HTTP, as the GPU image has no `openai` package) sends
`--requests` chat requests in turn: one video part (client i asks about
video i mod `--videos`), a question, greedy, `--max-tokens` new tokens (random weights
almost never end a turn, so answers run to the cap).

Per concurrency level, the same load runs twice: the first compiles the batch shapes the
arrivals make and fills the embedding cache, the second is timed: requests/s, completion
tokens/s, mean latency, and the batches the server ran. Rows are appended to `--json`.

  python bench/serve.py --model qwen2_7b --frames 256 --clients 1,8,32 --json r.jsonl
  python bench/serve.py --model tiny --frames 8 --clients 1,8,32   (CPU)
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax

from longvila_jax.checkpoint import build_model
from longvila_jax.configs import model_config
from longvila_jax.data.demo_corpus import build_tokenizer
from longvila_jax.data.synthetic import write_needle_video
from longvila_jax.infer.generate import Generator
from longvila_jax.serve.app import Settings, build_app

QUESTION = "What colour is the shape shown in the video? Answer in one word."


def start(app):
    """uvicorn serving `app` on a free port, in a thread; returns (base URL, stop)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def ask(url: str, model: str, video: str, max_tokens: int) -> int:
    """One request; its completion tokens."""
    body = {"model": model, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": video}},
                {"type": "text", "text": QUESTION}]}]}
    request = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.loads(response.read())["usage"]["completion_tokens"]


def load(url: str, model: str, clients: int, requests: int, videos: int, max_tokens: int):
    """(seconds, completion tokens, mean latency) of `clients` x `requests` requests."""
    latencies = []

    def client(c: int) -> int:
        tokens = 0
        for _ in range(requests):
            began = time.perf_counter()
            tokens += ask(url, model, f"video{c % videos}.mp4", max_tokens)
            latencies.append(time.perf_counter() - began)
        return tokens

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    return time.perf_counter() - began, tokens, sum(latencies) / len(latencies)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2_7b")
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=1, help="per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=1 << 18)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp())
    tokenizer = build_tokenizer(work / "tok", [QUESTION] * 3)
    config = model_config(args.model)
    config.model.update(dtype=args.dtype, param_dtype=args.dtype)
    config.model.media.update(media_token_id=510, newline_token_id=10)  # the demo tokenizer's
    size = config.model.vision.image_size
    began = time.perf_counter()
    for i in range(args.videos):
        write_needle_video(work / "media" / f"video{i}.mp4", args.frames,
                           needle_index=args.frames // 2, needle_seed=i, haystack_seed=100 + i,
                           width=size, height=size, fps=4.0)
    print(f"{args.videos} videos of {args.frames} frames at {size} px: "
          f"{time.perf_counter() - began:.0f} s", flush=True)
    generator = Generator(build_model(config), tokenizer, family=config.model.llm.family,
                          cache_entries=max(args.videos, 8))
    settings = Settings(model_name=args.model, media_root=str(work / "media"),
                        num_frames=args.frames, max_frames=args.frames,
                        max_tokens=args.max_tokens, max_rows=args.max_batch,
                        max_batch_tokens=args.max_batch_tokens)
    app = build_app(generator, settings)
    url, stop = start(app)
    batcher = app.state.batcher
    try:
        for clients in (int(c) for c in args.clients.split(",")):
            warm = load(url, args.model, clients, args.requests, args.videos, args.max_tokens)
            batches = batcher.batches
            seconds, tokens, latency = load(url, args.model, clients, args.requests,
                                            args.videos, args.max_tokens)
            row = {"model": args.model, "frames": args.frames, "clients": clients,
                   "requests": clients * args.requests, "seconds": round(seconds, 2),
                   "requests_per_s": round(clients * args.requests / seconds, 3),
                   "tokens_per_s": round(tokens / seconds, 1),
                   "mean_latency_s": round(latency, 2),
                   "batches": batcher.batches - batches, "warmup_s": round(warm[0], 1),
                   "device": jax.devices()[0].device_kind, "jax": jax.__version__}
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        stop()


if __name__ == "__main__":
    main()
