"""Remote videos, when allowed: fetched once under the hash of their bytes, never past the
size limit, and checked like local ones."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest

from longvila_jax.data.synthetic import write_needle_video
from longvila_jax.serve.media import MediaPolicy
from longvila_jax.serve.protocol import ApiError


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    write_needle_video(root / "clip.mp4", 6, needle_index=2, needle_seed=3, haystack_seed=4,
                       width=56, height=56, fps=4.0)
    (root / "page.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "root": root}
    server.shutdown()


def test_a_remote_video_is_fetched_once_by_content(web, tmp_path):
    policy = MediaPolicy(None, max_bytes=1 << 30, max_frames=16, allow_remote=True,
                         download_dir=tmp_path / "downloads")
    first = policy.resolve(web["url"] + "/clip.mp4")
    assert first.read_bytes() == (web["root"] / "clip.mp4").read_bytes()
    assert first.parent == tmp_path / "downloads" and first.suffix == ".mp4"
    assert policy.resolve(web["url"] + "/clip.mp4?again=1") == first
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporaries left


@pytest.mark.parametrize(("path", "max_bytes", "status", "says"), [
    ("/clip.mp4", 1000, 413, "above the limit of 1000 bytes"),
    ("/missing.mp4", 1 << 30, 400, "could not fetch"),
    ("/page.html", 1 << 30, 400, "not_video"),
])
def test_bad_remote_videos_are_refused(web, tmp_path, path, max_bytes, status, says):
    policy = MediaPolicy(None, max_bytes=max_bytes, max_frames=16, allow_remote=True,
                         download_dir=tmp_path / "downloads")
    with pytest.raises(ApiError) as caught:
        policy.resolve(web["url"] + path)
    assert caught.value.status == status and says in caught.value.message
    assert not any((tmp_path / "downloads").glob("*.mp4"))
