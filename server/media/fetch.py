"""Fetch media bytes from http(s) URLs and data: URIs, with a byte cap and a timeout.

The cap is enforced while streaming, so an oversized body is never read whole; a data: URI's
size is checked before it is decoded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass

import httpx

from server.exceptions import MediaError

DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)"
    r"(?P<b64>;base64)?,(?P<data>.*)$",
    re.DOTALL,
)
CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True)
class FetchedMedia:
    data: bytes
    mime_type: str | None  # as declared by the data: URI or the Content-Type header


class MediaFetcher:
    """One shared httpx client; created and closed by the app's lifespan."""

    def __init__(self, timeout_s: float, user_agent: str = "vlm-server"):
        self.timeout_s = timeout_s  # for the whole fetch, not per read: a slow drip ends too
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            headers={"User-Agent": user_agent},
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def fetch(self, url: str, *, max_bytes: int, kind: str, param: str) -> FetchedMedia:
        """kind is "image" or "video": the media type a data: URI must declare."""
        if url.startswith("data:"):
            # Decoding megabytes of base64 is CPU work: keep it off the event loop.
            return await asyncio.to_thread(
                decode_data_uri, url, max_bytes=max_bytes, kind=kind, param=param
            )
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme not in ("http", "https"):
            raise MediaError(
                f"Unsupported {kind} URL scheme '{scheme or url[:16]}': use http(s) or a "
                f"data:{kind}/...;base64 URI.",
                param=param,
            )
        try:
            return await asyncio.wait_for(
                self._fetch_http(url, max_bytes=max_bytes, kind=kind, param=param),
                self.timeout_s,
            )
        except TimeoutError:
            raise _timed_out(kind, param) from None

    async def _fetch_http(self, url: str, *, max_bytes: int, kind: str, param: str) -> FetchedMedia:
        try:
            async with self.client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise MediaError(
                        f"Could not fetch the {kind} at {param}: the server answered HTTP "
                        f"{response.status_code}.",
                        param=param,
                        code="media_fetch_failed",
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise _too_large(kind, max_bytes, param)
                chunks, total = [], 0
                async for chunk in response.aiter_bytes(CHUNK_SIZE):
                    total += len(chunk)
                    if total > max_bytes:
                        raise _too_large(kind, max_bytes, param)
                    chunks.append(chunk)
                mime = response.headers.get("content-type", "").split(";")[0].strip() or None
                return FetchedMedia(b"".join(chunks), mime)
        except httpx.TimeoutException:
            raise _timed_out(kind, param) from None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError):
            raise MediaError(
                f"Could not fetch the {kind} at {param}: the URL is invalid or unreachable.",
                param=param,
                code="media_fetch_failed",
            ) from None


def decode_data_uri(uri: str, *, max_bytes: int, kind: str, param: str) -> FetchedMedia:
    match = DATA_URI.match(uri)
    if match is None or not match.group("b64"):
        raise MediaError(
            f"Invalid data URI at {param}: expected data:{kind}/<type>;base64,<data>.", param=param
        )
    mime = (match.group("mime") or "").lower()
    if not mime.startswith(f"{kind}/"):
        raise MediaError(
            f"The data URI at {param} declares '{mime or 'no media type'}'; expected {kind}/*.",
            param=param,
        )
    payload = match.group("data")
    # 4 base64 characters carry 3 bytes: refuse oversized payloads before decoding them.
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise _too_large(kind, max_bytes, param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"The data URI at {param} is not valid base64.", param=param) from None
    if not data:
        raise MediaError(f"The data URI at {param} is empty.", param=param)
    return FetchedMedia(data, mime)


def _timed_out(kind: str, param: str) -> MediaError:
    return MediaError(
        f"Timed out fetching the {kind} at {param}.", param=param, code="media_fetch_failed"
    )


def _too_large(kind: str, max_bytes: int, param: str) -> MediaError:
    return MediaError(
        f"The {kind} at {param} is larger than the server's limit of {max_bytes} bytes.",
        param=param,
        code="media_too_large",
    )
