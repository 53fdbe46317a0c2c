"""Concurrent requests decoded together: one thread owns the model and runs batches.

Requests that arrive while a batch decodes wait, and the next batch takes every waiting
request that samples alike (same `n`, temperature, top-p and, when a request sets one, seed)
up to `max_rows` answers and `max_tokens` prompt positions (the prefill's activations and
the KV caches grow with them: at 256 frames a 7B prompt is 50K tokens): one prefill of all
their prompts (each video's rows once in the embedding table, different videos per row)
and one decoding, `n` answers per prompt from its one prefilled cache
(`Generator.generate_ids`). This is dynamic batching, not vLLM's
continuous batching: a request never joins a batch already decoding.

The number of prompts in a batch is padded to a power of two (with copies of its first
prompt, whose answers are dropped) and the answer length to a power of two from 16, so the
shapes the engine compiles for stay few however the traffic mixes.

Decoding runs a chunk of tokens at a time; after each chunk the engine asks, per unfinished
answer, whether it is done, and that call streams the new text to the request (held back by
the longest stop string less one character, so that no part of a stop string is ever sent).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import random
import threading

from longvila_jax.data.video import MediaError
from longvila_jax.infer.decode import Sampling
from longvila_jax.infer.generate import Generator, Prompt, stop_at
from longvila_jax.serve.protocol import ApiError

log = logging.getLogger(__name__)

MIN_ANSWER_BUCKET = 16


@dataclasses.dataclass(eq=False)
class Job:
    """One request: what to answer and how, and where its events go.

    Events, in order: `("start", prompt_tokens)` or `("error", ApiError)`; then, when
    streaming, `("delta", choice, text)`, the deltas of a choice adding up to its text;
    then `("done", [(text, finish_reason, tokens) per choice])`.
    """

    prompt: Prompt
    n: int
    temperature: float
    top_p: float
    seed: int | None
    max_tokens: int
    stops: list[str]
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    cancelled: bool = False
    tokens: int = 0  # the prompt's length, once prepared

    def __post_init__(self):
        self.sent = [""] * self.n  # each choice's text streamed so far

    @property
    def key(self) -> tuple:
        greedy = self.temperature == 0
        return (self.n, self.temperature, 1.0 if greedy else self.top_p,
                None if greedy else self.seed)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Batcher:
    """Runs `Job`s on `generator` in batches, on a thread of its own (see module docstring)."""

    def __init__(self, generator: Generator, *, max_rows: int = 32, max_tokens: int = 1 << 18):
        self.generator, self.max_rows, self.max_tokens = generator, max_rows, max_tokens
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self.batches = 0  # how many batches ran (tests read it)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def submit(self, job: Job) -> None:
        if job.n > self.max_rows:
            raise ApiError(400, f"n={job.n} is above this server's limit of {self.max_rows}",
                           param="n")
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            arrived = [] if self._waiting else [self._queue.get()]
            while True:  # everything that arrived meanwhile
                try:
                    arrived.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in arrived:
                return
            self._waiting += [job for job in arrived if self._prepared(job)]
            batch = self._take()
            if not batch:
                continue
            try:
                self._serve(batch)
            except Exception as e:  # the server keeps serving; these requests fail
                log.exception("batch failed")
                for job in batch:
                    job.emit("error", ApiError(500, f"internal error: {e}", kind="server_error"))
            self.batches += 1

    def _prepared(self, job: Job) -> bool:
        """Encode the job's video (into the embedding cache) and count its prompt, alone:
        a bad video fails its own request only. Says "start" or "error"."""
        try:
            job.tokens = len(self.generator.prepare([job.prompt]).ids[0])
        except (MediaError, ValueError, FileNotFoundError) as e:
            job.emit("error", ApiError(400, str(e), param="messages"))
            return False
        except Exception as e:  # e.g. out of memory encoding a long video
            log.exception("preparing a request failed")
            job.emit("error", ApiError(500, f"internal error: {e}", kind="server_error"))
            return False
        job.emit("start", job.tokens)
        return True

    def _take(self) -> list[Job]:
        """The oldest waiting job and those after it that fit in its batch."""
        batch, rows, longest = [], 0, 0
        key = self._waiting[0].key if self._waiting else None
        for job in list(self._waiting):
            if job.key != key or rows + job.n > self.max_rows:
                continue
            cost = _power_of_two(len(batch) + 1) * max(longest, job.tokens)
            if batch and cost > self.max_tokens:
                continue
            batch.append(job)
            rows, longest = rows + job.n, max(longest, job.tokens)
            self._waiting.remove(job)
        return batch

    def _serve(self, ready: list[Job]) -> None:
        gen = self.generator
        prompts = [job.prompt for job in ready]
        prompts += prompts[:1] * (_power_of_two(len(prompts)) - len(prompts))
        prepared = gen.prepare(prompts)  # the videos come from the embedding cache
        first = ready[0]
        n = first.n
        seed = first.seed if first.seed is not None else random.getrandbits(31)
        longest = max(job.max_tokens for job in ready)
        sampling = Sampling(max(MIN_ANSWER_BUCKET, _power_of_two(longest)), n,
                            first.temperature, first.top_p, seed)

        def done(row: int, ids: list[int]) -> bool:
            if row // n >= len(ready):
                return True  # padding
            job = ready[row // n]
            if job.cancelled:
                return True
            ids = ids[: job.max_tokens]
            if not job.stops and not job.stream:  # no text needed between chunks
                return len(ids) >= job.max_tokens
            text, stopped = stop_at(gen.tokenizer.decode(ids), job.stops)
            if job.stream:
                _stream(job, row % n, text, stopped)
            return stopped or len(ids) >= job.max_tokens

        answers = gen.generate_ids(prepared, sampling, done)
        for i, job in enumerate(ready):
            choices = []
            for ids in answers[i * n:(i + 1) * n]:
                ids = ids[: job.max_tokens]
                text, stopped = stop_at(gen.tokenizer.decode(ids), job.stops)
                ended = stopped or len(ids) < job.max_tokens  # a stop string or end of turn
                if job.stream:  # what was held back
                    _stream(job, len(choices), text, final=True)
                choices.append((text, "stop" if ended else "length", len(ids)))
            job.emit("done", choices)


def _stream(job: Job, choice: int, text: str, final: bool) -> None:
    """Send the part of `text` not sent yet; unless `final` (the answer has ended), not what
    may be the start of a stop string or an incomplete character."""
    if not final:
        hold = max((len(s) for s in job.stops), default=1) - 1
        text = text.rstrip("\ufffd")
        text = text[: len(text) - hold] if hold else text
    sent = job.sent[choice]
    if len(text) > len(sent) and text.startswith(sent):
        job.sent[choice] = text
        job.emit("delta", choice, text[len(sent):])


def _power_of_two(count: int) -> int:
    return 1 << max(0, count - 1).bit_length()
