"""`longvila-jax serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn, as vLLM).

    POST /v1/chat/completions   messages with text and `video_url` parts; n, temperature,
                                top_p, max_tokens, stop, stream (server-sent events), seed;
                                extras num_frames and fps
    GET  /v1/models             the one model served
    GET  /health                200 while the server runs (no key needed)

Every error is a 4xx/5xx with OpenAI's error body, and the server keeps serving. With an API
key, every `/v1` request needs `Authorization: Bearer KEY`. Requests are decoded together
(`batcher.py`); videos are checked against the media policy (`media.py`) before they queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from longvila_jax.infer.generate import Generator, Prompt
from longvila_jax.serve.batcher import Batcher, Job
from longvila_jax.serve.media import MediaPolicy
from longvila_jax.serve.protocol import ApiError, ChatRequest, conversation


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a server allows and assumes (the `serve` command's flags)."""

    model_name: str
    api_key: str | None = None
    media_root: str | None = None
    allow_remote_media: bool = False
    download_dir: str | None = None
    num_frames: int = 8  # when a request does not say
    max_frames: int = 256
    max_video_bytes: int = 2 << 30
    max_tokens: int = 128  # when a request does not say
    max_tokens_limit: int = 4096
    max_rows: int = 32  # answers decoded together
    max_batch_tokens: int = 1 << 18  # prompt positions prefilled together
    max_request_bytes: int = 1 << 20

    def __post_init__(self):
        # Checked here, before a checkpoint loads: a typo should not cost the load's minutes.
        if self.media_root is not None and not Path(self.media_root).is_dir():
            raise ValueError(f"--media-root: {self.media_root} is not a folder")


def build_app(generator: Generator, settings: Settings) -> FastAPI:
    """The server's app; its batcher thread runs while the app does (lifespan)."""
    media = MediaPolicy(settings.media_root, max_bytes=settings.max_video_bytes,
                        max_frames=settings.max_frames,
                        allow_remote=settings.allow_remote_media,
                        download_dir=settings.download_dir)
    batcher = Batcher(generator, max_rows=settings.max_rows,
                      max_tokens=settings.max_batch_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        batcher.close()

    app = FastAPI(title="longvila-jax", lifespan=lifespan)
    app.state.batcher = batcher
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            message = f"malformed JSON body: {first.get('msg')}"
        else:
            message = f"{where or 'body'}: {first.get('msg')}"
        return JSONResponse(ApiError(400, message, param=where).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(error.status_code, str(error.detail), kind=kind).body(),
                            status_code=error.status_code)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            if settings.api_key is not None:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(),
                                           f"Bearer {settings.api_key}".encode()):
                    error = ApiError(401, "invalid or missing API key (Authorization: "
                                     "Bearer KEY)", kind="authentication_error",
                                     code="invalid_api_key")
                    return JSONResponse(error.body(), status_code=401)
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit()
                                       or int(length) > settings.max_request_bytes):
                error = ApiError(413, f"request body above {settings.max_request_bytes} bytes")
                return JSONResponse(error.body(), status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": created, "owned_by": "longvila-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        body.check_supported()
        if body.model != settings.model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves "
                           f"{settings.model_name!r}", param="model", code="model_not_found",
                           kind="not_found_error")
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit of "
                           f"{settings.max_tokens_limit}", param="max_tokens")
        turns, url = conversation(body.messages)
        num_frames, video = body.num_frames or settings.num_frames, None
        if url is not None:
            media.check_frames(num_frames)
            video = await run_in_threadpool(media.resolve, url)
        job = Job(Prompt(turns, video, num_frames, body.fps), body.n, body.temperature,
                  body.top_p, body.seed, max_tokens, body.stops, body.stream,
                  asyncio.get_running_loop())
        batcher.submit(job)
        event = await job.events.get()
        if event[0] == "error":
            raise event[1]
        prompt_tokens = event[1]
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                 "model": settings.model_name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_events(job, reply, prompt_tokens, usage),
                                     media_type="text/event-stream")
        while (event := await job.events.get())[0] not in ("done", "error"):
            pass
        if event[0] == "error":
            raise event[1]
        choices = event[1]
        return {**reply, "object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                             "finish_reason": reason, "logprobs": None}
                            for i, (text, reason, _) in enumerate(choices)],
                "usage": _usage(prompt_tokens, choices)}

    return app


def _usage(prompt_tokens: int, choices) -> dict:
    completion = sum(tokens for _, _, tokens in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


async def _events(job: Job, reply: dict, prompt_tokens: int, usage: bool):
    """The server-sent events of a streamed answer: a role chunk per choice, text deltas as
    they are decoded, each choice's finish reason, usage when asked for, `[DONE]`."""

    def chunk(choices, **extra) -> str:
        return "data: " + json.dumps({**reply, "object": "chat.completion.chunk",
                                      "choices": choices, **extra}) + "\n\n"

    try:
        for i in range(job.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "finish_reason": None}])
        while True:
            event = await job.events.get()
            if event[0] == "delta":
                _, i, text = event
                yield chunk([{"index": i, "delta": {"content": text}, "finish_reason": None}])
            elif event[0] == "error":
                yield "data: " + json.dumps(event[1].body()) + "\n\n"
                return
            else:
                choices = event[1]
                for i, (_, reason, _) in enumerate(choices):
                    yield chunk([{"index": i, "delta": {}, "finish_reason": reason}])
                if usage:
                    yield chunk([], usage=_usage(prompt_tokens, choices))
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancelled = True  # a client gone mid-stream frees its rows


def serve(checkpoint: str | Path, settings: Settings, *, host: str, port: int,
          tokenizer: str | None = None, mesh=None, cache_dir: str | None = None) -> None:
    """Load `checkpoint` and serve it until interrupted."""
    import uvicorn

    generator = Generator.from_checkpoint(checkpoint, tokenizer=tokenizer, mesh=mesh,
                                          cache_dir=cache_dir, cache_entries=settings.max_rows)
    app = build_app(generator, settings)
    print(f"serving {settings.model_name!r} at http://{host}:{port}/v1 (OpenAI API; "
          f"media root: {settings.media_root or 'none'}; API key "
          f"{'required' if settings.api_key else 'not required'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
