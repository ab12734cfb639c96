"""Fetching media: data URIs and http(s) against a real local server, caps and failures."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from server.exceptions import MediaError
from server.media.fetch import FetchPolicy, MediaFetcher, decode_data_uri
from tests.helpers import MediaServer

pytestmark = pytest.mark.anyio


def test_data_uri_roundtrip() -> None:
    payload = b"\x89PNG fake"
    uri = "data:image/png;base64," + base64.b64encode(payload).decode()
    fetched = decode_data_uri(uri, max_bytes=1000, kind="image", param="p")
    assert fetched.data == payload and fetched.mime_type == "image/png"


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png,notbase64",  # no ;base64
        "data:text/plain;base64,aGk=",  # wrong media type
        "data:image/png;base64,!!!",  # invalid characters
        "data:image/png;base64,",  # empty
        "data:image/png;base64,aGk",  # bad padding
    ],
)
def test_bad_data_uris(uri: str) -> None:
    with pytest.raises(MediaError):
        decode_data_uri(uri, max_bytes=1000, kind="image", param="p")


@pytest.mark.parametrize("mime", ["", "application/octet-stream", "Binary/Octet-Stream"])
def test_a_data_uri_naming_no_type_is_taken_as_its_bytes(mime: str) -> None:
    """(Qwen-Agent sends every local video as data:;base64,...): what the bytes are is judged
    as a download's are, later."""
    uri = f"data:{mime};base64," + base64.b64encode(b"bytes").decode()
    for kind in ("image", "video"):
        assert decode_data_uri(uri, max_bytes=1000, kind=kind, param="p").data == b"bytes"


def test_data_uri_size_checked_before_decoding() -> None:
    uri = "data:image/png;base64," + "A" * 4000
    with pytest.raises(MediaError) as info:
        decode_data_uri(uri, max_bytes=1000, kind="image", param="p")
    assert info.value.code == "media_too_large"


async def test_http_fetch_and_caps(media_server: MediaServer) -> None:
    url = media_server.add("/fetch-ok.bin", b"x" * 5000, "image/png")
    fetcher = MediaFetcher(FetchPolicy(timeout_s=5, allowed_hosts=("127.0.0.1",)))
    try:
        fetched = await fetcher.fetch(url, max_bytes=10_000, kind="image", param="p")
        assert fetched.data == b"x" * 5000 and fetched.mime_type == "image/png"
        with pytest.raises(MediaError) as info:
            await fetcher.fetch(url, max_bytes=1000, kind="image", param="p")
        assert info.value.code == "media_too_large"
        with pytest.raises(MediaError, match="HTTP 404"):
            await fetcher.fetch(media_server.url("/none"), max_bytes=10, kind="image", param="p")
        with pytest.raises(MediaError, match="not enabled"):
            await fetcher.fetch("file:///etc/passwd", max_bytes=10, kind="image", param="p")
    finally:
        await fetcher.aclose()


async def test_a_fetch_says_what_it_is_and_a_body_cut_short_is_a_400(
    media_server: MediaServer, tmp_path: Path
) -> None:
    """head: the first bytes of what was fetched (in memory or spooled to a file: what media
    categories judge a URL naming neither kind by); a body cut short is the client's 400
    (media_fetch_failed), not a 500."""
    import socket
    import threading

    url = media_server.add("/peek.bin", b"\x89PNG\r\n\x1a\n" + b"x" * 100_000, "application/x")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def cut_short() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        conn.close()

    threading.Thread(target=cut_short, daemon=True).start()
    fetcher = MediaFetcher(FetchPolicy(timeout_s=5, allowed_hosts=("127.0.0.1",)))
    try:
        for spool_dir in (None, tmp_path):
            fetched = await fetcher.fetch(
                url, max_bytes=200_000, kind="media", param="p", spool_dir=spool_dir
            )
            assert fetched.head("p") == b"\x89PNG\r\n\x1a\n" + b"x" * 8
            assert len(fetched.content(200_000, "image", "p")) == 100_008
            with pytest.raises(MediaError) as large:
                fetched.content(1000, "image", "p")
            assert large.value.code == "media_too_large"
            fetched.discard()
        with pytest.raises(MediaError) as info:
            await fetcher.fetch(
                f"http://127.0.0.1:{listener.getsockname()[1]}/x",
                max_bytes=1000,
                kind="media",
                param="p",
            )
        assert info.value.code == "media_fetch_failed"
        assert (
            "ended the download before the whole body" in info.value.message
        )  # (not "URL invalid")
    finally:
        await fetcher.aclose()
        listener.close()


async def test_a_compressed_body_is_refused_before_it_is_inflated() -> None:
    """Media are asked for as sent (Accept-Encoding: identity); a host that compresses anyway
    is refused before a byte is inflated: gzip inflated past the byte cap on the event loop
    (2 KB of gzip twice over was a gigabyte of memory, every request stalled meanwhile)."""
    import gzip
    import socket
    import threading

    bomb = gzip.compress(gzip.compress(bytes(50_000_000)))  # (~50 KB: 50 MB, twice gzipped)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    asked: list[bytes] = []

    def compressing_host() -> None:
        conn, _ = listener.accept()
        asked.append(conn.recv(65536))
        head = "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Encoding: gzip, gzip\r\n"
        conn.sendall(f"{head}Content-Length: {len(bomb)}\r\n\r\n".encode() + bomb)
        conn.close()

    threading.Thread(target=compressing_host, daemon=True).start()
    fetcher = MediaFetcher(FetchPolicy(timeout_s=5, allowed_hosts=("127.0.0.1",)))
    try:
        with pytest.raises(MediaError) as info:
            url = f"http://127.0.0.1:{listener.getsockname()[1]}/bomb.png"
            await fetcher.fetch(url, max_bytes=1_000_000, kind="image", param="p")
        assert info.value.code == "media_fetch_failed"
        assert "Content-Encoding: gzip, gzip" in info.value.message
        assert b"\r\naccept-encoding: identity\r\n" in asked[0].lower()
    finally:
        await fetcher.aclose()
        listener.close()


@pytest.mark.parametrize("failing", ["write", "flush"])
async def test_a_full_disk_is_the_servers_503_and_leaves_no_file(
    tmp_path: Path, media_server: MediaServer, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A spooled download on a full disk (an upgrade trial filled the volume): a 503 that
    says so, not a 500 with the OS's words; its partial file deleted. Also where the disk (a
    network file system's quota) says so only when the last bytes are flushed."""
    import errno
    import tempfile

    from server.exceptions import NoRoomToSpool
    from server.media import fetch

    made = tempfile.NamedTemporaryFile

    class FullDisk:
        def __init__(self, **kwargs: object) -> None:
            self.file = made(**kwargs)  # type: ignore[call-overload]  # noqa: SIM115
            self.name = self.file.name

        def write(self, data: bytes) -> int:
            if failing == "write":
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(data)

        def flush(self) -> None:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    monkeypatch.setattr(fetch.tempfile, "NamedTemporaryFile", FullDisk)
    url = media_server.add("/clip.mp4", b"x" * 200_000, "video/mp4")
    fetcher = MediaFetcher(FetchPolicy(timeout_s=5, allowed_hosts=("127.0.0.1",)))
    try:
        with pytest.raises(NoRoomToSpool) as full:
            await fetcher.fetch(url, max_bytes=10**6, kind="video", param="p", spool_dir=tmp_path)
        assert full.value.status_code == 503 and full.value.param == "p"
        assert "no room on its disk" in full.value.message
        assert not list(tmp_path.iterdir())
    finally:
        await fetcher.aclose()


async def test_a_download_past_the_time_allowed_says_how_long_that_is() -> None:
    """A host that never answers: the client's 400 says what the server allows (the
    operator's --media-fetch-timeout), not only "timed out"."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # (connections wait in the backlog, never answered)
    fetcher = MediaFetcher(FetchPolicy(timeout_s=0.5, allowed_hosts=("127.0.0.1",)))
    try:
        with pytest.raises(MediaError) as info:
            url = f"http://127.0.0.1:{listener.getsockname()[1]}/slow.mp4"
            await fetcher.fetch(url, max_bytes=1000, kind="video", param="p")
        assert info.value.code == "media_fetch_failed"
        assert info.value.message == (
            "Timed out fetching the video at p (this server allows 0.5 s per download)."
        )
    finally:
        await fetcher.aclose()
        listener.close()
