"""SSRF: media URLs never reach loopback, private, link-local or metadata addresses, however they
are spelled, through redirects, or through file://; allow-listed hosts are the exception."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from server.exceptions import MediaError
from server.media.fetch import FetchPolicy, MediaFetcher
from server.media.netguard import is_public
from tests.helpers import MediaServer

pytestmark = pytest.mark.anyio

SECRET = b"internal secret"


@pytest.fixture
def secret_url(media_server: MediaServer) -> str:
    return media_server.add("/secret.png", SECRET, "image/png")


async def fetch(url: str, **policy: object) -> bytes:
    fetcher = MediaFetcher(FetchPolicy(timeout_s=5, **policy))  # type: ignore[arg-type]
    try:
        fetched = await fetcher.fetch(url, max_bytes=10_000, kind="image", param="p")
        return fetched.data
    finally:
        await fetcher.aclose()


def port_of(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost.",
        "127.0.0.1",
        "127.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
    ],
)
async def test_loopback_in_every_spelling_is_refused(
    host: str, secret_url: str, media_server: MediaServer
) -> None:
    before = len(media_server.requested)
    with pytest.raises(MediaError) as info:
        await fetch(f"http://{host}:{port_of(secret_url)}/secret.png")
    assert info.value.code in ("media_url_not_allowed", "media_fetch_failed")
    assert len(media_server.requested) == before  # never connected


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/image.png",
        "http://192.168.1.1/image.png",
        "http://100.64.0.1/image.png",
        "http://[fd00::1]/image.png",
        "http://0.0.0.0/image.png",
        "gopher://127.0.0.1:70/_x",
        "file:///etc/passwd",
        "ftp://example.com/a.png",
    ],
)
async def test_private_metadata_and_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(MediaError) as info:
        await fetch(url)
    assert info.value.code == "media_url_not_allowed"


async def test_a_host_that_does_not_resolve_is_a_failed_fetch_not_a_refusal() -> None:
    """example.com offline, a typo: nothing was refused, the fetch failed (the code a client
    retries or fixes its URL on, not the SSRF refusal an operator's flag would change)."""
    with pytest.raises(MediaError) as info:
        await fetch("http://no-such-host.invalid/photo.jpg")
    assert info.value.code == "media_fetch_failed"
    assert "no-such-host.invalid does not resolve" in info.value.message
    assert "allowed-media-domains" not in info.value.message


async def test_a_host_that_is_no_dns_name_is_said_to_be_malformed() -> None:
    """A label past 63 characters cannot be looked up: the URL is wrong, not the network."""
    with pytest.raises(MediaError) as info:
        await fetch(f"http://{'a' * 64}.example/photo.jpg")
    assert info.value.code == "media_url_not_allowed"
    assert "is malformed: not a DNS name" in info.value.message


async def test_allow_list_admits_a_private_host_and_only_it(
    secret_url: str, media_server: MediaServer
) -> None:
    assert await fetch(secret_url, allowed_hosts=("127.0.0.1",)) == SECRET
    port = port_of(secret_url)
    with pytest.raises(MediaError, match="not in the server's allow-list"):
        await fetch(f"http://localhost:{port}/secret.png", allowed_hosts=("127.0.0.1",))


async def test_an_allow_list_entry_with_a_port_allows_that_port_only(
    secret_url: str, media_server: MediaServer
) -> None:
    """An operator who allows an internal media store's port does not open the host's other
    services (a database, an admin page) to media URLs."""
    port = port_of(secret_url)
    allowed = (f"127.0.0.1:{port}",)
    assert await fetch(secret_url, allowed_hosts=allowed) == SECRET
    before = len(media_server.requested)
    with pytest.raises(MediaError, match=f"port {port + 1} of the host 127.0.0.1 is not in"):
        await fetch(f"http://127.0.0.1:{port + 1}/secret.png", allowed_hosts=allowed)
    with pytest.raises(MediaError, match="the host localhost is not in"):
        await fetch(f"http://localhost:{port}/secret.png", allowed_hosts=allowed)
    assert len(media_server.requested) == before
    # A redirect to another port of the allowed host is checked against the port too
    media_server.redirects["/hop3.png"] = f"http://127.0.0.1:{port + 1}/secret.png"
    with pytest.raises(MediaError, match="not in the server's allow-list"):
        await fetch(media_server.url("/hop3.png"), allowed_hosts=allowed, follow_redirects=True)


def test_allow_list_entries_match_every_spelling_of_their_host() -> None:
    from server.media.netguard import host_is_allowed

    allowed = ("fd00::5", "[fd00::6]:8080", "media.internal:8080", "10.0.0.5")
    for host, port in (
        ("[FD00:0::5]", 1),
        ("fd00:0:0::6", 8080),
        ("Media.Internal.", 8080),
        ("10.0.0.5", 22),
    ):
        assert host_is_allowed(host, port, allowed), host
    for host, port in (("fd00::6", 8081), ("media.internal", 8081), ("10.0.0.6", 80)):
        assert not host_is_allowed(host, port, allowed), host


async def test_redirects_are_refused_by_default_and_rechecked_when_followed(
    secret_url: str, media_server: MediaServer
) -> None:
    port = port_of(secret_url)
    hop = media_server.url("/hop.png")
    media_server.redirects["/hop.png"] = f"http://localhost:{port}/secret.png"
    with pytest.raises(MediaError, match="redirects"):
        await fetch(hop, allowed_hosts=("127.0.0.1",))
    before = media_server.requested.count("/secret.png")
    with pytest.raises(MediaError, match="not in the server's allow-list"):
        await fetch(hop, allowed_hosts=("127.0.0.1",), follow_redirects=True)
    assert media_server.requested.count("/secret.png") == before
    # A redirect to an allowed place is followed.
    media_server.redirects["/hop2.png"] = "/secret.png"
    assert (
        await fetch(
            media_server.url("/hop2.png"), allowed_hosts=("127.0.0.1",), follow_redirects=True
        )
        == SECRET
    )


async def test_local_files_only_below_the_allowed_path(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    (root / "ok.png").write_bytes(b"png bytes")
    (tmp_path / "outside.png").write_bytes(b"outside")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    os.symlink("/etc/passwd", root / "passwd.png")
    assert await fetch(f"file://{root}/ok.png", local_media_root=root) == b"png bytes"
    for url in (
        f"file://{root}/../outside.png",
        f"file://{root}/link.png",
        f"file://{root}/passwd.png",
        "file:///etc/passwd",
        f"file://otherhost{root}/ok.png",
    ):
        with pytest.raises(MediaError) as info:
            await fetch(url, local_media_root=root)
        assert info.value.code == "media_url_not_allowed", url


async def test_local_paths_that_cannot_be_read_are_a_media_error(tmp_path: Path) -> None:
    """A NUL byte, a name too long, a symlink loop: the client's error, not a crash."""
    root = tmp_path / "media"
    root.mkdir()
    os.symlink(root / "loop_b", root / "loop_a")
    os.symlink(root / "loop_a", root / "loop_b")
    for url in (
        f"file://{root}/ok.png%00.txt",
        f"file://{root}/{'a' * 300}",
        f"file://{root}/{'a/' * 3000}x",
        f"file://{root}/loop_a",
        f"file://{root}/loop_a/x.png",
    ):
        with pytest.raises(MediaError) as info:
            await fetch(url, local_media_root=root)
        assert info.value.code in ("media_fetch_failed", "media_url_not_allowed"), url


@pytest.mark.parametrize(
    "address,public",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("100.64.0.1", False),
        ("192.0.0.8", False),  # (global to Python 3.11.7's ipaddress)
        ("::ffff:192.0.0.8", False),
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
    ],
)
def test_address_classification(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


async def test_a_url_without_a_scheme_is_named_as_it_was_sent() -> None:
    """A file name or bare base64 where a URL goes: the message quotes it, not a 'scheme'."""
    for sent in ("photo.jpg", "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ"):
        with pytest.raises(MediaError) as info:
            await fetch(sent)
        assert f"'{sent[:40]}' is not a URL" in info.value.message
        assert "data:image/...;base64" in info.value.message


def test_what_check_ahead_refuses_without_dns(tmp_path: Path) -> None:
    """A job's media URL is checked as written when the job is accepted: what no fetch could
    read is refused then; a host is resolved only when the job fetches (DNS may answer by
    then), and an allow-listed private host passes."""
    (tmp_path / "a.png").write_bytes(b"x")
    fetcher = MediaFetcher(FetchPolicy(timeout_s=5, local_media_root=tmp_path))
    for url, says in [
        ("ftp://example.com/a.png", "scheme 'ftp'"),
        ("photo.jpg", "is not a URL"),
        ("http://169.254.169.254/latest", "resolves to a private, loopback or reserved"),
        ("http://[::ffff:127.0.0.1]/a.png", "resolves to a private, loopback or reserved"),
        (f"file://{tmp_path}/../../etc/passwd", "outside the server's allowed local media path"),
    ]:
        with pytest.raises(MediaError) as refused:
            fetcher.check_ahead(url, "image", "p")
        assert refused.value.code == "media_url_not_allowed" and says in str(refused.value)
    for url in [
        "http://not-yet.invalid/a.png",
        "https://example.com/a.png",
        f"file://{tmp_path}/a.png",
    ]:
        fetcher.check_ahead(url, "image", "p")  # (no DNS asked)
    fetcher.check_ahead("data:image/png;base64,AAAA", "image", "p")  # (read by its own check)
    listed = MediaFetcher(FetchPolicy(timeout_s=5, allowed_hosts=("10.0.0.5",)))
    listed.check_ahead("http://10.0.0.5/a.png", "image", "p")
    with pytest.raises(MediaError, match="not in the server's allow-list"):
        listed.check_ahead("https://example.com/a.png", "image", "p")


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0", "[::1]", "10.1", "[fd00::1]"]
)
async def test_check_ahead_refuses_a_private_address_as_the_fetch_does(host: str) -> None:
    """An address however it is spelled (the old IPv4 forms too) is refused at submission with
    the words the synchronous request gets from the fetch, so a client sees one answer."""
    fetcher = MediaFetcher(FetchPolicy(timeout_s=5))
    url = f"http://{host}:9/a.png"
    with pytest.raises(MediaError) as ahead:
        fetcher.check_ahead(url, "image", "p")
    with pytest.raises(MediaError) as fetched:
        await fetch(url)
    assert ahead.value.code == fetched.value.code == "media_url_not_allowed"
    assert ahead.value.message == fetched.value.message
    assert "resolves to a private, loopback or reserved address" in ahead.value.message
