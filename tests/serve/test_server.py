"""The server through the official `openai` client: plain, streamed, n > 1 and video answers
equal the generator's own; every bad request gets a 4xx with OpenAI's error body and the
server keeps serving; 32 concurrent clients get one-at-a-time greedy answers, batched."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve.names import KEY, MODEL  # tests/serve/names.py

QUESTIONS = ["What colour is the shape?", "Say something.", "What digit is shown?",
             "Describe the video in one word, then a colour."]


def _video_message(url: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _ask(client, messages, **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def test_plain_answer_is_the_generators(served, client):
    reply = _ask(client, [{"role": "user", "content": QUESTIONS[0]}], max_tokens=10)
    expected = served["generator"].generate(QUESTIONS[0], max_new_tokens=10)[0]
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    prompt = len(served["generator"].prompt_ids(QUESTIONS[0]))
    assert reply.usage.prompt_tokens == prompt
    assert reply.usage.total_tokens == prompt + reply.usage.completion_tokens
    assert 0 < reply.usage.completion_tokens <= 10
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_streamed_answer_arrives_in_pieces_and_equals_the_whole(served, client):
    messages = [{"role": "user", "content": QUESTIONS[3]}]
    whole = _ask(client, messages, max_tokens=12).choices[0].message.content
    chunks = list(_ask(client, messages, max_tokens=12, stream=True,
                       stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and
              c.choices[0].delta.content]
    assert "".join(pieces) == whole
    assert len(pieces) >= 3  # decoded a few tokens at a time, not sent at the end
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices


def test_stop_string_cuts_the_answer_and_is_never_streamed(served, client):
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    whole = _ask(client, messages, max_tokens=12).choices[0].message.content
    assert len(whole) >= 4
    stop = whole[2:4]
    cut = whole[: whole.find(stop)]
    reply = _ask(client, messages, max_tokens=12, stop=[stop])
    assert reply.choices[0].message.content == cut
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       _ask(client, messages, max_tokens=12, stop=stop, stream=True)
                       if c.choices)
    assert streamed == cut


def test_n_answers_share_one_prompt(served, client):
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    greedy = _ask(client, messages, max_tokens=8, n=4)
    assert len(greedy.choices) == 4 and [c.index for c in greedy.choices] == [0, 1, 2, 3]
    assert len({c.message.content for c in greedy.choices}) == 1
    sampled = _ask(client, messages, max_tokens=8, n=4, temperature=1.0, seed=3)
    again = _ask(client, messages, max_tokens=8, n=4, temperature=1.0, seed=3)
    texts = [c.message.content for c in sampled.choices]
    assert texts == [c.message.content for c in again.choices]  # a seed repeats a draw
    assert len(set(texts)) > 1
    assert 4 <= sampled.usage.completion_tokens <= 4 * 8


def test_video_part_is_answered_as_the_generator_answers(served, client):
    gen, video = served["generator"], served["media"] / "video1.mp4"
    expected = gen.generate(QUESTIONS[0], video=video, num_frames=6, max_new_tokens=10)[0]
    for url in ("video1.mp4", f"file://{video}", str(video)):
        reply = _ask(client, _video_message(url, QUESTIONS[0]), max_tokens=10,
                     extra_body={"num_frames": 6})
        assert reply.choices[0].message.content == expected, url
    assert reply.usage.prompt_tokens == len(gen.prompt_ids(QUESTIONS[0], 6))


def _raw(served, body: bytes, key: str | None = KEY, path: str = "/v1/chat/completions"):
    request = urllib.request.Request(served["url"] + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize(("body", "status", "says"), [
    (b'{"model": "tiny-longvila", "messages": [', 400, "malformed JSON"),
    (b'{"model": "tiny-longvila"}', 400, "messages"),
    (b'{"model": "tiny-longvila", "messages": [], "n": 1}', 400, "messages"),
    (b'{"model": "tiny-longvila", "messages": [{"role": "user", "content": "x"}], '
     b'"temperature": -1}', 400, "temperature"),
    (b'{"model": "tiny-longvila", "messages": [{"role": "user", "content": "x"}], '
     b'"tools": [{"type": "function"}]}', 400, "tools"),
    (b'{"model": "tiny-longvila", "messages": [{"role": "user", "content": "x"}], '
     b'"bogus": 1}', 400, "bogus"),
    (b'{"model": "tiny-longvila", "messages": [{"role": "user", "content": "x"}], '
     b'"max_tokens": 100000}', 400, "max_tokens"),
    (b'{"model": "tiny-longvila", "messages": [{"role": "user", "content": "x"}], '
     b'"n": 64}', 400, "n=64"),
    (b'{"model": "tiny-longvila", "messages": [{"role": "user", "content": "<video> x"}]}',
     400, "placeholder"),
    (b'{"model": "tiny-longvila", "messages": [{"role": "user", "content": '
     b'[{"type": "image_url", "image_url": {"url": "a.png"}}]}]}', 400, "image_url"),
])
def test_malformed_requests_get_400_with_openai_body(served, body, status, says):
    code, reply = _raw(served, body)
    assert code == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert says in reply["error"]["message"] or says == reply["error"]["param"], reply


@pytest.mark.parametrize(("url", "says"), [
    ("missing.mp4", "no such file"),
    ("notes.txt", "not_video"),
    ("../outside/secret.mp4", "'..'"),
    ("escape.mp4", "outside the media root"),  # a symlink out of the root
    ("OUTSIDE", "outside the media root"),  # an absolute path elsewhere
    ("http://127.0.0.1:9/v.mp4", "remote media is off"),
    ("ftp://host/v.mp4", "unsupported scheme"),
    ("video0.mp4\x00.txt", "not a usable path"),
    ("file://etc/passwd", "outside the media root"),
])
def test_bad_videos_get_400_and_the_server_keeps_serving(served, client, url, says):
    url = str(served["outside"] / "secret.mp4") if url == "OUTSIDE" else url
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(client, _video_message(url, "What?"), max_tokens=4)
    assert says in caught.value.body["message"], caught.value.body
    assert _ask(client, [{"role": "user", "content": "Hi"}], max_tokens=2).choices


def test_too_many_frames_unknown_model_and_wrong_key(served, client):
    with pytest.raises(openai.BadRequestError, match="limit of 16"):
        _ask(client, _video_message("video0.mp4", "What?"), extra_body={"num_frames": 64})
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                   "content": "x"}])
    from openai import OpenAI

    for key in ("wrong", None):
        code, reply = _raw(served, b'{}', key=key)
        assert code == 401 and reply["error"]["type"] == "authentication_error"
    stranger = OpenAI(base_url=served["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    with urllib.request.urlopen(served["url"] + "/health", timeout=30) as response:
        assert response.status == 200  # no key needed


@pytest.mark.slow
def test_32_concurrent_clients_get_one_at_a_time_answers(served, client):
    gen = served["generator"]
    asks = [(QUESTIONS[i % 4], f"video{i % 2}.mp4" if i % 3 else None, 4 + (i % 2) * 2)
            for i in range(8)]
    expected = {}
    for question, video, frames in asks:  # one at a time, greedy
        path = None if video is None else served["media"] / video
        expected[question, video, frames] = gen.generate(
            question, video=path, num_frames=frames, max_new_tokens=8)[0]
    batches_before = served["app"].state.batcher.batches

    def one_client(c: int) -> list[bool]:
        from openai import OpenAI

        mine = OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0,
                      timeout=600)
        results = []
        for r in range(4):
            question, video, frames = asks[(c + r) % len(asks)]
            messages = ([{"role": "user", "content": question}] if video is None
                        else _video_message(video, question))
            reply = mine.chat.completions.create(model=MODEL, messages=messages,
                                                 temperature=0, max_tokens=8,
                                                 extra_body={"num_frames": frames})
            results.append((question, video, frames, reply.choices[0].message.content,
                            reply.usage.completion_tokens))
        return results

    began = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = [r for rs in pool.map(one_client, range(32)) for r in rs]
    seconds = time.perf_counter() - began
    assert len(results) == 128
    wrong = [(q, v, f, text) for q, v, f, text, _ in results if text != expected[q, v, f]]
    assert not wrong, wrong[:3]
    batches = served["app"].state.batcher.batches - batches_before
    assert batches < 64, batches  # decoded together, not one after another
    tokens = sum(t for *_, t in results)
    print(f"128 requests in {seconds:.1f} s: {128 / seconds:.1f} requests/s, "
          f"{tokens / seconds:.0f} tokens/s, {batches} batches")
