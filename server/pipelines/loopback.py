"""A streamed request the server sends to its own app (a background response that streams):
the answer's status, then its body as the app sends it. httpx's ASGI transport, which batch
lines use, hands a body over only once it is whole; this is the same call, read as it goes."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.types import ASGIApp, Message


@contextlib.asynccontextmanager
async def streamed(
    app: ASGIApp, path: str, body: dict[str, Any], headers: dict[str, str]
) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
    """POST `body` to `path`: (status, the body's chunks). Leaving the block hangs up (the
    app sees the client go, as a real client's), and waits for the app to end."""
    payload = json.dumps(body).encode()
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
    status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    hung_up = asyncio.Event()
    requests = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive() -> Message:
        if requests:
            return requests.pop()
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and not status.done():
            status.set_result(message["status"])
        elif message["type"] == "http.response.body":
            if message.get("body"):
                chunks.put_nowait(message["body"])
            if not message.get("more_body", False):
                chunks.put_nowait(None)

    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    raw += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    task = asyncio.create_task(app(post_scope(path, raw), receive, send))
    # An app that ends without an answer (it crashed) ends the body too.
    task.add_done_callback(lambda _: chunks.put_nowait(None))
    try:
        await asyncio.wait({status, task}, return_when=asyncio.FIRST_COMPLETED)
        if not status.done():  # ended before its status line: the app's crash
            task.result()  # (raises it)
            raise RuntimeError(f"POST {path} ended without an answer")
        yield status.result(), _until_end(chunks)
    finally:
        hung_up.set()
        if not task.done():
            task.cancel()
        await asyncio.wait({task})  # (a cancel of this task itself still goes through)
        if not task.cancelled():
            task.exception()  # (retrieved: the app's own handlers logged it)


async def _until_end(chunks: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (chunk := await chunks.get()) is not None:
        yield chunk


StreamDispatch = Callable[
    [str, dict[str, Any], str],
    contextlib.AbstractAsyncContextManager[tuple[int, AsyncIterator[bytes]]],
]


def loopback_streams(app: ASGIApp) -> StreamDispatch:
    """Streamed requests to `app` (internal: no API key), a job's, named by its request id."""

    def open_stream(path: str, body: dict[str, Any], request_id: str):  # noqa: ANN202
        return streamed(app, path, body, {"X-Request-ID": request_id})

    return open_stream


async def sse_blocks(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """Server-sent events, one block ("event: ...\\ndata: ...") at a time."""
    buffer, text = "", codecs.getincrementaldecoder("utf-8")()  # (a character across chunks)
    async for chunk in chunks:
        buffer += text.decode(chunk)
        *blocks, buffer = buffer.split("\n\n")
        for block in blocks:
            if block.strip():
                yield block
    if buffer.strip():
        yield buffer


def post_scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of a POST to the app itself, from loopback."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 0),
        "server": ("loopback", 80),
    }
