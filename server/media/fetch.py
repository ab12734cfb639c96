"""Fetch media bytes from http(s) URLs, data: URIs, allowed local files and uploaded files.

Every http(s) hop goes through netguard (one resolution, public addresses only unless the host
is allow-listed, connect to the checked address); redirects are refused unless enabled, and then
each is checked again. The byte cap is enforced while streaming, so an oversized body is never
read whole; a data: URI's size is checked before it is decoded; the timeout covers the whole
fetch. Error messages name the request part, never the exception text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import re
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import httpx

from server.exceptions import MediaError, NoRoomToSpool
from server.jobs.project import current_project
from server.media.image import VIDEO_PART_HINT
from server.media.netguard import (
    AddressRefused,
    HostUnresolved,
    check_url_statically,
    checked_request,
)

# (URI schemes, media types and "base64" are case-insensitive: "DATA:IMAGE/PNG;BASE64,")
DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)"
    r"(?P<b64>;base64)?,(?P<data>.*)$",
    re.DOTALL | re.IGNORECASE,
)


def is_data_uri(url: str) -> bool:
    return url[:5].lower() == "data:"


CHUNK_SIZE = 64 * 1024
T = TypeVar("T")
Spend = Callable[[int], None]  # told of bytes as they arrive; raises to stop the fetch


@dataclass(frozen=True)
class FetchedMedia:
    data: bytes  # empty when the media is in a file (path)
    mime_type: str | None  # as declared by the data: URI or the Content-Type header
    path: Path | None = None  # spooled download (is_temporary) or an allowed local file
    size: int = 0
    is_temporary: bool = False
    # vLLM's video data URL: the frames as JPEGs, "data:video/jpeg;base64,<jpeg>,<jpeg>,..."
    image_frames: tuple[bytes, ...] = ()
    frames_fps: float | None = None  # the rate they were taken at, where the URL says (;fps=N)

    def discard(self) -> None:
        if self.is_temporary and self.path is not None:
            self.path.unlink(missing_ok=True)

    def head(self, param: str, num_bytes: int = 16) -> bytes:
        """Its first bytes (what it is, when its name does not say); blocking for a file."""
        if self.path is None:
            return self.data[:num_bytes]
        try:
            return _first_bytes(self.path, num_bytes)
        except OSError:  # (a local file gone, or not readable, since it was checked)
            raise _unreachable("media", param) from None

    def content(self, max_bytes: int, kind: str, param: str) -> bytes:
        """All its bytes, at most max_bytes (else the too-large 400 for `kind`); blocking."""
        if self.size > max_bytes:
            raise too_large(kind, max_bytes, param)
        if self.path is None:
            return self.data
        try:
            return self.path.read_bytes()
        except OSError:
            raise _unreachable(kind, param) from None


class UploadedFiles(Protocol):
    """The Files API's store (the job store), as media read it."""

    def get_file(self, file_id: str, project: str) -> _Described | None: ...

    def file_content(self, file_id: str, project: str) -> bytes | None: ...


class _Described(Protocol):
    purpose: str
    bytes: int


# Uploads a request may use as media (OpenAI's purposes for a model's inputs); a batch's input
# or output file is not an image.
MEDIA_PURPOSES = ("vision", "user_data")


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float  # for the whole fetch, not per read: a slow drip ends too
    allowed_hosts: tuple[str, ...] = ()  # empty: any host with only public addresses
    follow_redirects: bool = False
    max_redirects: int = 5
    local_media_root: Path | None = None  # file:// URLs only below it; None: refused


class MediaFetcher:
    """Fetches http(s), data: and (when enabled) file:// media; one shared httpx client,
    created and closed by the app's lifespan. URLs are parsed once, by httpx."""

    def __init__(
        self,
        policy: FetchPolicy,
        user_agent: str = "vlm-server",
        uploads: UploadedFiles | None = None,
    ):
        self.policy = policy
        self.uploads = uploads  # None: media by file id are refused
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(policy.timeout_s),
            follow_redirects=False,  # each hop is checked here, never followed blindly
            # Media are read as sent: a compressed body (Content-Encoding) would be inflated
            # before the byte cap saw it, on the event loop (1.8 KB of gzip was a gigabyte).
            headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
            trust_env=False,
            # The pool is keyed by the address we connect to: never reuse a connection whose TLS
            # session was verified for another host name on the same address.
            limits=httpx.Limits(
                max_keepalive_connections=0
            ),  # no proxy from the environment may bypass the address check
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def fetch(
        self,
        url: str,
        *,
        max_bytes: int,
        kind: str,
        param: str,
        spool_dir: Path | None = None,
        spend: Spend | None = None,
    ) -> FetchedMedia:
        """kind is "image" or "video": the media type a data: URI must declare (or none).

        With spool_dir, a download is written to a temporary file there instead of memory (the
        caller discards it), and a local file is handed over by path, not read: big videos never
        sit in the server's memory. spend(bytes) is told of the bytes as they arrive (it raises
        to stop the fetch): several downloads at once stay within what they may take together."""
        if is_data_uri(url):
            # Decoding megabytes of base64 is CPU work: keep it off the event loop.
            fetched = await asyncio.to_thread(
                decode_data_uri, url, max_bytes=max_bytes, kind=kind, param=param
            )
        else:
            parsed = _parse(url, kind, param)
            if parsed.scheme == "file":
                by_path = spool_dir is not None
                fetched = await self._fetch_file(
                    parsed, max_bytes=max_bytes, kind=kind, param=param, by_path=by_path
                )
            else:
                return await self._download(
                    parsed,
                    max_bytes=max_bytes,
                    kind=kind,
                    param=param,
                    spool_dir=spool_dir,
                    spend=spend,
                )
        if spend is not None:
            spend(fetched.size)
        return fetched

    def check_ahead(self, url: str, kind: str, param: str) -> None:
        """Refuses now what no fetch of `url` could read, for a request that fetches later (a
        job, a conversation's later response): a scheme or shape not read here, file:// not
        enabled or outside its path, a host the rules refuse as written (off the allow-list,
        a literal private address). A data: URI is read whole by its own check; DNS and the
        body are the fetch's (either may change by then)."""
        if is_data_uri(url):
            return
        parsed = _parse(url, kind, param)
        if parsed.scheme == "file":
            self._local_path(parsed, param)
            return
        try:
            check_url_statically(str(parsed), self.policy.allowed_hosts)
        except AddressRefused as refused:
            raise _refused(kind, param, refused) from None

    async def fetch_upload(
        self, file_id: str, *, max_bytes: int, kind: str, param: str
    ) -> FetchedMedia:
        """An uploaded file's bytes (POST /v1/files, purpose vision or user_data)."""
        if self.uploads is None:
            raise MediaError(
                f"Media by file id ({param}) need the Files API, which this server does not run.",
                param=param,
                code="unsupported_parameter",
            )
        project = current_project()  # (the request's, or the job's)
        stored = await asyncio.to_thread(self.uploads.get_file, file_id, project)
        if stored is None:
            raise _no_upload(file_id, param)
        if stored.purpose not in MEDIA_PURPOSES:
            raise MediaError(
                f"File {file_id} (at {param}) has purpose {stored.purpose!r}; media are read "
                f"from files uploaded with purpose 'vision' or 'user_data'.",
                param=param,
                code="invalid_value",
            )
        if stored.bytes > max_bytes:
            raise too_large(kind, max_bytes, param)
        # (the size first: an upload too large is not read)
        data = await asyncio.to_thread(self.uploads.file_content, file_id, project)
        if data is None:  # deleted meanwhile
            raise _no_upload(file_id, param)
        return FetchedMedia(data, None, size=len(data))

    async def _download(
        self,
        url: httpx.URL,
        *,
        max_bytes: int,
        kind: str,
        param: str,
        spool_dir: Path | None,
        spend: Spend | None,
    ) -> FetchedMedia:
        cap = _Cap(max_bytes, kind, param, spend)
        if spool_dir is None:

            async def read(response: httpx.Response) -> FetchedMedia:
                return await _read_capped(response, cap)

            fetch = self._fetch_http(url, kind=kind, param=param, read=read)
            return await self._within_deadline(fetch, kind, param)
        spool_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=spool_dir, suffix=f".{kind}", delete=False) as sink:

            async def spool(response: httpx.Response) -> FetchedMedia:
                fetched = await _read_capped(response, cap, sink)
                sink.flush()  # (here: a full disk or quota found at close is caught below)
                return fetched

            try:
                fetch = self._fetch_http(url, kind=kind, param=param, read=spool)
                return await self._within_deadline(fetch, kind, param)
            except OSError as exc:  # (the spool's own write: a full disk, say)
                Path(sink.name).unlink(missing_ok=True)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoRoomToSpool(param) from exc
                raise
            except BaseException:
                Path(sink.name).unlink(missing_ok=True)
                raise

    async def _within_deadline(
        self, fetch: Awaitable[FetchedMedia], kind: str, param: str
    ) -> FetchedMedia:
        try:
            return await asyncio.wait_for(fetch, self.policy.timeout_s)
        except TimeoutError:
            raise _timed_out(kind, param, self.policy.timeout_s) from None

    async def _fetch_http(
        self,
        url: httpx.URL,
        *,
        kind: str,
        param: str,
        read: Callable[[httpx.Response], Awaitable[T]],
    ) -> T:
        """read(the response) once redirects, if allowed, are followed and checked."""
        for _ in range(self.policy.max_redirects + 1):
            response = await self._send_checked(url, kind, param)
            try:
                if not response.is_redirect:
                    return await read(response)
                if not self.policy.follow_redirects:
                    raise MediaError(
                        f"The {kind} URL at {param} redirects; redirects are not followed "
                        "(--media-follow-redirects).",
                        param=param,
                        code="media_fetch_failed",
                    )
                # Every hop is parsed and checked again like the first URL.
                url = _parse(str(url.join(response.headers.get("location", ""))), kind, param)
            finally:
                await response.aclose()
        raise MediaError(
            f"The {kind} URL at {param} redirects too many times.",
            param=param,
            code="media_fetch_failed",
        )

    async def _send_checked(self, url: httpx.URL, kind: str, param: str) -> httpx.Response:
        """Resolve and check the host once, then connect to exactly that address."""
        if url.scheme not in ("http", "https"):
            raise _bad_scheme(url.scheme, kind, param)
        try:
            request = await checked_request(self.client, "GET", url, self.policy.allowed_hosts)
        except HostUnresolved as unresolved:  # (a fetch that failed, not one refused)
            raise MediaError(
                f"Could not fetch the {kind} at {param}: {unresolved}.",
                param=param,
                code="media_fetch_failed",
            ) from None
        except AddressRefused as refused:
            raise _refused(kind, param, refused) from None
        try:
            return await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            raise _timed_out(kind, param) from None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError):
            raise _unreachable(kind, param) from None

    def _local_path(self, url: httpx.URL, param: str) -> Path:
        """Where a file:// URL's bytes are, if they are below --allowed-local-media-path."""
        root = self.policy.local_media_root
        if root is None:
            raise MediaError(
                f"file:// URLs ({param}) are not enabled on this server (the operator enables them "
                "with --allowed-local-media-path).",
                param=param,
                code="media_url_not_allowed",
            )
        try:
            # resolve() follows symlinks and folds "..": what is checked is where the bytes are.
            path = Path(url.path).resolve()  # httpx's path is already percent-decoded
            inside = path.is_relative_to(root.resolve())
        except (OSError, ValueError, RuntimeError):
            # A NUL byte, a name too long, a symlink loop, no permission: it cannot be read.
            raise _unreadable_file(param) from None
        if url.host not in ("", "localhost") or not inside:
            raise MediaError(
                f"The file at {param} is outside the server's allowed local media path "
                "(--allowed-local-media-path).",
                param=param,
                code="media_url_not_allowed",
            )
        return path

    async def _fetch_file(
        self, url: httpx.URL, *, max_bytes: int, kind: str, param: str, by_path: bool
    ) -> FetchedMedia:
        path = self._local_path(url, param)
        try:
            if not path.is_file():
                raise MediaError(f"No file at {param}.", param=param, code="media_fetch_failed")
            size = path.stat().st_size
            if size > max_bytes:
                raise too_large(kind, max_bytes, param)
            if by_path:
                return FetchedMedia(b"", None, path=path, size=size)
            return FetchedMedia(await asyncio.to_thread(path.read_bytes), None, size=size)
        except OSError:
            raise _unreadable_file(param) from None


def _parse(url: str, kind: str, param: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise _unreachable(kind, param) from None
    if parsed.scheme not in ("http", "https", "file"):
        raise _bad_scheme(parsed.scheme, kind, param, url)  # ("photo.jpg": no scheme at all)
    if parsed.scheme != "file" and not parsed.host:
        raise _unreachable(kind, param)
    return parsed


def _first_bytes(path: Path, num_bytes: int) -> bytes:
    with path.open("rb") as file:
        return file.read(num_bytes)


@contextlib.contextmanager
def _body_errors(kind: str, param: str) -> Iterator[None]:
    """Reading a response's body: a timeout, or a body cut short or that does not decode, is
    the client's error about its URL."""
    try:
        yield
    except httpx.TimeoutException:
        raise _timed_out(kind, param) from None
    except httpx.HTTPError:  # (the answer began: the URL was fine, its body was not)
        raise MediaError(
            f"Could not fetch the {kind} at {param}: its host ended the download before the "
            "whole body arrived (or sent a body that does not decode).",
            param=param,
            code="media_fetch_failed",
        ) from None


def _check_status(response: httpx.Response, kind: str, param: str) -> None:
    if response.status_code != 200:
        raise MediaError(
            f"Could not fetch the {kind} at {param}: the server answered HTTP "
            f"{response.status_code}.",
            param=param,
            code="media_fetch_failed",
        )
    coding = response.headers.get("content-encoding", "").strip().lower()
    if coding not in ("", "identity"):  # (asked for identity: a host that compresses anyway)
        raise MediaError(
            f"Could not fetch the {kind} at {param}: the server sent it compressed "
            f"(Content-Encoding: {coding[:40]}), which this server does not read; serve it "
            "uncompressed (images and videos are compressed already).",
            param=param,
            code="media_fetch_failed",
        )


@dataclass(frozen=True)
class _Cap:
    """What one download may take: max_bytes of its own, and what spend (shared with the
    request's other downloads) allows."""

    max_bytes: int
    kind: str
    param: str
    spend: Spend | None = None

    def take(self, total: int, num_bytes: int) -> None:
        if total > self.max_bytes:
            raise too_large(self.kind, self.max_bytes, self.param)
        if self.spend is not None:
            self.spend(num_bytes)


async def _read_capped(
    response: httpx.Response, cap: _Cap, sink: BinaryIO | None = None
) -> FetchedMedia:
    kind, param = cap.kind, cap.param
    _check_status(response, kind, param)
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap.max_bytes:
        raise too_large(kind, cap.max_bytes, param)
    chunks, total = [], 0
    with _body_errors(kind, param):
        async for chunk in response.aiter_raw(CHUNK_SIZE):  # (as sent: nothing inflated)
            total += len(chunk)
            cap.take(total, len(chunk))
            if sink is None:
                chunks.append(chunk)
            else:
                sink.write(chunk)
    mime = response.headers.get("content-type", "").split(";")[0].strip() or None
    if sink is not None:
        return FetchedMedia(b"", mime, path=Path(sink.name), size=total, is_temporary=True)
    return FetchedMedia(b"".join(chunks), mime, size=total)


# What vLLM's encode_video_url produces: a video as its frames, each a base64 JPEG, comma-joined.
JPEG_FRAMES_TYPES = ("video/jpeg", "video/jpg")
# Frames in one such URL: an hour at one a second (the rate they are read at unless the URL
# says its own, ";fps=N"). Counted before the split, whose pieces cost ~30 times their text
# when tiny ("AAAA," over 40 MB took 1.2 GB).
MAX_JPEG_FRAMES = 3600
# The rates such a URL may say its frames were taken at: 100 s apart to 60 a second
MIN_FRAMES_FPS, MAX_FRAMES_FPS = 0.01, 60.0
# Whitespace base64 may be wrapped with (MIME's 76-character lines), deleted in one pass.
B64_WHITESPACE = b" \t\n\r\v\f"


# A data: URI that names no type, or only "bytes" (Qwen-Agent writes every local video as
# "data:;base64,..."; a browser's FileReader writes application/octet-stream for an unknown
# file): its bytes say what it is, as a download's do, and are judged as those are (vLLM
# decodes them whatever the URI declares). A type that names something else is still a 400.
UNDECLARED_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})


def undeclared_data_uri(url: str) -> bool:
    """A data: URI naming no media type, or only bytes (UNDECLARED_TYPES)."""
    # (its head only: lowercasing a whole URI copies megabytes)
    return url[5:69].split(",", 1)[0].split(";", 1)[0].lower() in UNDECLARED_TYPES


def decode_data_uri(uri: str, *, max_bytes: int, kind: str, param: str) -> FetchedMedia:
    match = DATA_URI.match(uri)
    if match is None or not match.group("b64"):
        raise MediaError(
            f"Invalid data URI at {param}: expected data:{kind}/<type>;base64,<data>.", param=param
        )
    mime = (match.group("mime") or "").lower()
    if mime not in UNDECLARED_TYPES and not mime.startswith(f"{kind}/"):
        hint = VIDEO_PART_HINT if kind == "image" and mime.startswith("video/") else ""
        raise MediaError(
            f"The data URI at {param} declares '{mime or 'no media type'}'; expected "
            f"{kind}/*{hint}.",
            param=param,
        )
    payload = match.group("data")
    # 4 base64 characters carry 3 bytes: refuse oversized payloads before decoding them.
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise too_large(kind, max_bytes, param)
    if kind == "video" and mime in JPEG_FRAMES_TYPES:
        if (count := payload.rstrip(", \t\r\n").count(",") + 1) > MAX_JPEG_FRAMES:
            raise MediaError(
                f"The data URI at {param} holds {count} frames; at most {MAX_JPEG_FRAMES} "
                "(an hour at one a second): send fewer, or the video itself.",
                param=param,
            )
        pieces = [piece for piece in payload.split(",") if piece.strip()]
        frames = tuple(_b64decode(piece, param) for piece in pieces)
        if not frames:
            raise MediaError(f"The data URI at {param} is empty.", param=param)
        fps = _frames_fps(match.group("params"), param)
        size = sum(map(len, frames))
        return FetchedMedia(b"", mime, size=size, image_frames=frames, frames_fps=fps)
    data = _b64decode(payload, param)
    return FetchedMedia(data, mime, size=len(data))


def data_uri_head(uri: str, param: str, num_bytes: int = 64) -> bytes:
    """A base64 data: URI's first bytes, decoded from the start of its payload alone (what it
    is, judged without decoding what may be a video of hundreds of megabytes)."""
    chars = -(-num_bytes // 3) * 4  # (base64 characters that hold them)
    start = uri.find(",") + 1
    text = uri[start : start + 2 * chars].encode("ascii", "replace")
    text = text.translate(None, B64_WHITESPACE)[:chars]
    return _b64decode(text[: len(text) // 4 * 4].decode(), param) if len(text) >= 4 else b""


def _frames_fps(params: str, param: str) -> float | None:
    """A frames URL's own rate, its ";fps=N" (as DashScope's list of frames becomes one)."""
    pairs = (piece.partition("=") for piece in params.split(";"))
    given = [value for key, _, value in pairs if key.lower() == "fps"]
    if not given:
        return None
    try:
        fps = float(given[-1])
    except ValueError:
        fps = 0.0
    if not MIN_FRAMES_FPS <= fps <= MAX_FRAMES_FPS:
        raise MediaError(
            f"The frames' fps in the data URI at {param} must be a number from "
            f"{MIN_FRAMES_FPS:g} to {MAX_FRAMES_FPS:g}.",
            param=param,
        )
    return fps


def _b64decode(payload: str, param: str) -> bytes:
    try:
        # (bytes.translate, not "".join(payload.split()): a space every 4 characters made a
        # string of each 4, ~20 times the payload)
        text = payload.encode("ascii").translate(None, B64_WHITESPACE)
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"The base64 data at {param} is not valid base64.", param=param) from None
    if not data:
        raise MediaError(f"The data URI at {param} is empty.", param=param)
    return data


def _bad_scheme(scheme: str, kind: str, param: str, url: str = "") -> MediaError:
    what = f"Unsupported {kind} URL scheme '{scheme}'" if scheme else f"'{url[:40]}' is not a URL"
    return MediaError(
        f"{what} at {param}: use http(s), a "
        f"data:{kind}/...;base64 URI, or file:// below --allowed-local-media-path.",
        param=param,
        code="media_url_not_allowed",
    )


def _unreadable_file(param: str) -> MediaError:
    return MediaError(
        f"The file at {param} cannot be read.", param=param, code="media_fetch_failed"
    )


def _refused(kind: str, param: str, refused: AddressRefused) -> MediaError:
    return MediaError(
        f"The {kind} URL at {param} is not allowed: {refused}.",
        param=param,
        code="media_url_not_allowed",
    )


def _unreachable(kind: str, param: str) -> MediaError:
    return MediaError(
        f"Could not fetch the {kind} at {param}: the URL is invalid or unreachable.",
        param=param,
        code="media_fetch_failed",
    )


def _no_upload(file_id: str, param: str) -> MediaError:
    return MediaError(
        f"No file with id {file_id!r} (at {param}).", param=param, code="file_not_found"
    )


def _timed_out(kind: str, param: str, limit_s: float | None = None) -> MediaError:
    """limit_s: the whole download's (a slow host: say what the server allows, which the
    operator sets with --media-fetch-timeout)."""
    allowed = "" if limit_s is None else f" (this server allows {limit_s:g} s per download)"
    return MediaError(
        f"Timed out fetching the {kind} at {param}{allowed}.",
        param=param,
        code="media_fetch_failed",
    )


def too_large(kind: str, max_bytes: int, param: str) -> MediaError:
    return MediaError(
        f"The {kind} at {param} is larger than the server's limit of {max_bytes} bytes.",
        param=param,
        code="media_too_large",
    )
