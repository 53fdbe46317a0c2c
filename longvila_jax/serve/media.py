"""Which videos a request may name: files under the media root, or, when allowed, remote ones.

A server that opens any path a client writes hands out every file its user can read, so a
video URL (`file://...`, an absolute path or one relative to the root) must resolve, symlinks
followed, to a regular file inside `--media-root`; `..` is refused outright. Remote URLs
(http/https) are fetched only with `--allow-remote-media`, into the server's download folder
under the SHA-256 of their bytes (so the same video fetched twice is one cache entry), never
past the size limit. Every check that fails is an `ApiError` naming the URL.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from longvila_jax.atomic import atomic_file
from longvila_jax.data.video import MediaError, video_info
from longvila_jax.serve.protocol import ApiError

REMOTE_SCHEMES = ("http", "https")
FETCH_TIMEOUT_S = 30


class MediaPolicy:
    """Turns a request's video URL into a checked local path (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None, *, max_bytes: int, max_frames: int,
                 allow_remote: bool = False, download_dir: str | os.PathLike | None = None):
        self.root = None if root is None else Path(root).resolve()  # a folder (`Settings`)
        if allow_remote and download_dir is None:
            raise ValueError("remote media needs a download folder")
        self.max_bytes, self.max_frames = max_bytes, max_frames
        self.allow_remote = allow_remote
        self.download_dir = None if download_dir is None else Path(download_dir)

    def check_frames(self, num_frames: int) -> None:
        if num_frames > self.max_frames:
            raise ApiError(400, f"num_frames={num_frames} is above this server's limit of "
                           f"{self.max_frames}", param="num_frames", code="too_many_frames")

    def resolve(self, url: str) -> Path:
        """The local, checked, readable video file that `url` names (fetching it if
        remote); blocking (file system, network, the container's header)."""
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme in REMOTE_SCHEMES:
            path = self._fetch(url)
        elif parsed.scheme in ("", "file"):
            path = self._local(url, urllib.parse.unquote(parsed.path) if parsed.scheme
                               else url)
        else:
            raise ApiError(400, f"video URL {url!r}: unsupported scheme {parsed.scheme!r} "
                           "(a path under the media root, file://, or http(s) when remote "
                           "media is allowed)", param="messages", code="invalid_video_url")
        try:
            frames, _ = video_info(path)
        except MediaError as e:
            raise ApiError(400, f"video URL {url!r}: {e.detail} ({e.reason})",
                           param="messages", code="invalid_video") from None
        if frames < 1:
            raise ApiError(400, f"video URL {url!r}: no frames", param="messages",
                           code="invalid_video")
        return path

    def _local(self, url: str, name: str) -> Path:
        if self.root is None:
            raise ApiError(400, f"video URL {url!r}: this server was started without "
                           "--media-root and serves no local files", param="messages",
                           code="media_not_allowed")
        if ".." in PurePosixPath(name).parts:
            raise ApiError(400, f"video URL {url!r}: '..' is not allowed", param="messages",
                           code="media_outside_root")
        try:
            path = (self.root / name).resolve()  # an absolute `name` replaces the root
            inside, size = path.is_relative_to(self.root), path.is_file() and path.stat().st_size
        except (OSError, ValueError) as e:  # a NUL byte, a name too long, a symlink loop
            raise ApiError(400, f"video URL {url!r}: not a usable path ({e})",
                           param="messages", code="invalid_video_url") from None
        if not inside:
            raise ApiError(400, f"video URL {url!r}: outside the media root", param="messages",
                           code="media_outside_root")
        if size is False:
            raise ApiError(400, f"video URL {url!r}: no such file under the media root",
                           param="messages", code="video_not_found")
        if size > self.max_bytes:
            raise ApiError(413, f"video URL {url!r}: {size} bytes, above the limit of "
                           f"{self.max_bytes}", param="messages", code="video_too_large")
        return path

    def _fetch(self, url: str) -> Path:
        if not self.allow_remote:
            raise ApiError(400, f"video URL {url!r}: remote media is off (start the server "
                           "with --allow-remote-media)", param="messages",
                           code="media_not_allowed")
        digest, chunks, size = hashlib.sha256(), [], 0
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                while chunk := response.read(1 << 20):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ApiError(413, f"video URL {url!r}: above the limit of "
                                       f"{self.max_bytes} bytes", param="messages",
                                       code="video_too_large")
                    digest.update(chunk)
                    chunks.append(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ApiError(400, f"video URL {url!r}: could not fetch it ({e})",
                           param="messages", code="invalid_video_url") from None
        suffix = Path(urllib.parse.urlparse(url).path).suffix[:8]
        path = self.download_dir / f"{digest.hexdigest()}{suffix}"
        if not path.exists():
            self.download_dir.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                tmp.write_bytes(b"".join(chunks))
        return path
