"""The OpenAI chat-completions wire format this server speaks, and its error body.

Requests are checked here, before anything touches the model: a field of the wrong type or
out of range, an unsupported feature (tools, log-probabilities, penalties), a content part
that is neither text nor a video, or more than one video gives an `ApiError` whose body is
OpenAI's (`{"error": {"message", "type", "param", "code"}}`), so clients report it as they
report OpenAI's own.

Videos come as vLLM writes them, `{"type": "video_url", "video_url": {"url": ...}}`, with
the frame count and rate as the extra body fields `num_frames` and `fps`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Fields of OpenAI's request this server cannot honour; a request setting one (to anything
# but its neutral value) fails rather than being answered as if it had not.
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None,
               "logprobs": False, "top_logprobs": None, "response_format": None,
               "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0}


class ApiError(Exception):
    """A request answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """`POST /v1/chat/completions`'s body (fields unknown to OpenAI are refused)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1)
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    num_frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0)
    # Accepted so that the check below can name them (extra="forbid" would say only
    # "extra inputs are not permitted").
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: Any = False
    top_logprobs: Any = None
    response_format: Any = None
    logit_bias: Any = None
    presence_penalty: Any = 0
    frequency_penalty: Any = 0

    def check_supported(self) -> None:
        for name, neutral in UNSUPPORTED.items():
            if getattr(self, name) not in (neutral, None):
                raise ApiError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")

    @property
    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stop if s]


def conversation(messages: list[Message]) -> tuple[list[dict], str | None]:
    """Chat messages with text content (a video part becomes `<video>` where it stood, text
    parts joined by newlines), and the one video's URL (or None)."""
    turns, videos = [], []
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            turns.append({"role": message.role, "content": message.content})
            continue
        pieces = []
        for j, part in enumerate(message.content):
            where = f"messages.{i}.content.{j}"
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif kind == "video_url":
                url = (part.get("video_url") or {}).get("url") \
                    if isinstance(part.get("video_url"), dict) else None
                if not isinstance(url, str) or not url:
                    raise ApiError(400, f"{where}: a video_url part needs video_url.url",
                                   param=where)
                if message.role != "user":
                    raise ApiError(400, f"{where}: only a user turn may hold a video",
                                   param=where)
                videos.append(url)
                pieces.append("<video>")
            else:
                raise ApiError(400, f"{where}: unsupported content part type {kind!r} "
                               "(expected 'text' or 'video_url')", param=where)
        turns.append({"role": message.role, "content": "\n".join(pieces)})
    if len(videos) > 1:
        raise ApiError(400, f"{len(videos)} videos in one request; this model takes one",
                       param="messages")
    if turns[-1]["role"] == "assistant":
        raise ApiError(400, "the last message is the assistant's; nothing to answer",
                       param="messages")
    return turns, (videos[0] if videos else None)
