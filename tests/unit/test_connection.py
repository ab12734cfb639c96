"""The client time limits of a connection (server/api/connection.py), on a real uvicorn server
with a small echoing app: a connection that sends nothing, headers that trickle and never end, a
body that stops, against a slow but steady body, a slow answer and keep-alive requests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import uvicorn

from server.api import connection
from server.api.connection import TimedHttpProtocol

pytestmark = pytest.mark.anyio

LIMIT = 1.0  # seconds


class EchoApp:
    """Answers with the request's body (after twice the limit on /slow; reading it that late on
    /late); notes each client gone."""

    def __init__(self) -> None:
        self.disconnects = 0

    async def __call__(self, scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["path"] == "/late":  # (reads the body only after twice the limit)
            await asyncio.sleep(2 * LIMIT)
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/slow":
            await asyncio.sleep(2 * LIMIT)
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class QuietServer(uvicorn.Server):
    """Leaves the test process's signals alone (a CI timeout's SIGTERM still ends it)."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


@asynccontextmanager
async def serving(app: EchoApp) -> AsyncIterator[int]:
    http = functools.partial(TimedHttpProtocol, client_timeout=LIMIT)
    config = uvicorn.Config(
        app,
        http=http,  # type: ignore[arg-type]
        lifespan="off",
        log_config=None,
        timeout_graceful_shutdown=1,  # (a failed test's connection left open: not waited for)
    )
    server = QuietServer(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def closed_after(reader: asyncio.StreamReader, started: float) -> float:
    """Seconds from `started` until the server closed the connection (it sent nothing)."""
    assert await asyncio.wait_for(reader.read(), 10 * LIMIT) == b""
    return time.monotonic() - started


async def test_a_connection_that_sends_nothing_is_closed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="server.api.connection")
    monkeypatch.setattr(connection, "CLOSES", connection.CloseLog())  # (none logged this second)
    async with serving(EchoApp()) as port:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert LIMIT * 0.9 <= await closed_after(reader, started) < LIMIT * 3
        writer.close()
    # the operator sees why (one line a second at most, however many are closed)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "server.api.connection"]
    assert "the latest from 127.0.0.1:" in line
    assert "headers were not complete for --client-timeout (1 s)" in line


async def test_headers_that_trickle_are_closed_at_one_deadline() -> None:
    """A byte of header every tenth of the limit does not keep the connection: the headers
    have one deadline (slowloris), not one per piece."""
    async with serving(EchoApp()) as port:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")

        async def trickle() -> None:
            for _ in range(100):
                await asyncio.sleep(LIMIT / 10)
                writer.write(b"X")

        sending = asyncio.create_task(trickle())
        try:
            assert await closed_after(reader, started) < LIMIT * 3
        finally:
            sending.cancel()
            writer.close()


async def test_a_body_that_stops_is_closed_and_the_app_sees_the_client_gone() -> None:
    app = EchoApp()
    async with serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        started = time.monotonic()
        assert LIMIT * 0.9 <= await closed_after(reader, started) < LIMIT * 3
        writer.close()
        await asyncio.sleep(0.1)
    assert app.disconnects == 1


async def test_a_slow_but_steady_body_a_slow_answer_and_keep_alive_are_served() -> None:
    async with serving(EchoApp()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n")
        for byte in b"hello, world":  # 12 pieces, 2.4 limits in all
            await asyncio.sleep(LIMIT / 5)
            writer.write(bytes([byte]))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(12) == b"hello, world"
        # the same connection: an answer that takes twice the limit (no timer while answering)
        writer.write(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10 * LIMIT)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(2) == b"ok"
        writer.close()


async def test_waits_that_are_the_servers_never_close_the_connection() -> None:
    """An app that reads the body late (the client waits for its 100 Continue, or uvicorn stops
    reading a large body until the app takes it), and a request pipelined behind one still
    being answered: the connection stays, whatever the limit."""
    async with serving(EchoApp()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /late HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10 * LIMIT)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"ok")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(2) == b"ok"

        big = bytes(1_000_000)  # (past uvicorn's high-water mark: it pauses reading)
        writer.write(b"POST /late HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + big)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10 * LIMIT)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(len(big)) == big

        # a second request's first line sent while the first is answered for twice the limit
        writer.write(
            b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhiGET / HTTP/1.1\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10 * LIMIT)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(2) == b"hi"
        writer.write(b"Host: x\r\n\r\n")  # its headers end now: served
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()


async def test_a_flood_of_closes_is_a_line_a_second_and_none_goes_uncounted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="server.api.connection")
    log = connection.CloseLog(every_s=0.1)
    for port in range(5):
        log.log(("10.0.0.1", port), "why")
    await asyncio.sleep(0.35)
    lines = [r.getMessage() for r in caplog.records if r.name == "server.api.connection"]
    assert lines == [
        "closed 1 connection(s), the latest from 10.0.0.1:0: why",  # at once
        "closed 4 connection(s), the latest from 10.0.0.1:4: why",  # the rest, a window later
    ]
    assert log.window is None  # (quiet again: the next close is logged at once)


async def test_head_on_a_real_server_is_headers_alone_and_the_connection_goes_on() -> None:
    """HEAD through uvicorn (HeadMiddleware answers it as the GET): the GET's headers and no
    body, for a JSON route and a streamed one, and the connection's next request is read
    right (a body, or a chunked stream's end, left on the wire would corrupt it)."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from server.api.middleware import HeadMiddleware

    app = FastAPI()

    @app.get("/json")
    async def answer() -> dict:
        return {"ok": True}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def pieces() -> AsyncIterator[bytes]:
            for _ in range(500):
                yield b"x" * 10
                await asyncio.sleep(0.01)

        return StreamingResponse(pieces())

    app.add_middleware(HeadMiddleware)
    async with serving(app) as port:  # type: ignore[arg-type]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for path in ("/json", "/stream", "/json"):
            writer.write(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            writer.write(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head  # (not a stray body's bytes)
            assert b"content-length: 11" in head.lower()
            assert await reader.readexactly(11) == b'{"ok":true}'
        writer.close()


async def test_headers_past_the_bound_are_a_431_and_requests_are_not_counted_together() -> None:
    """The line and headers may take MAX_HEADER_BYTES past the piece they began in (httptools
    read an endless header in time growing as its square, on the event loop): beyond, a 431 in
    OpenAI's error shape and the connection closed. A body sent with its headers, keep-alive
    requests and hundreds pipelined in one write are not held against one another."""
    import json

    near = connection.MAX_HEADER_BYTES - 1024
    async with serving(EchoApp()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b"b" * (2 * connection.MAX_HEADER_BYTES)
        for _ in range(2):  # (keep-alive: the second request's headers are its own)
            head = f"POST / HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * near}\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert await reader.readexactly(len(body)) == body
        pipelined = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 100 + b"\r\n\r\n"
        writer.write(pipelined * 700)  # (95 KB in one write)
        for _ in range(700):
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert answer.startswith(b"HTTP/1.1 200"), answer  # (echoing no body)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: a")
        await writer.drain()
        answer = b""
        for _ in range(4):  # (a header that goes on, piece after piece, within LIMIT: answered)
            writer.write(b"a" * connection.MAX_HEADER_BYTES)
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(65536), 0.1)
                break
        head, _, sent = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 ")
        error = json.loads(sent)["error"]
        assert error["code"] == "request_headers_too_large" and "64 KiB" in error["message"]
        writer.close()


def test_the_server_takes_the_timed_protocol_unless_the_limit_is_off() -> None:
    from server.api.connection import LimitedHttpProtocol
    from server.api.server import http_protocol

    assert http_protocol(0) is LimitedHttpProtocol  # (the headers' bound, no time limits)
    timed = http_protocol(45)
    assert timed.func is TimedHttpProtocol and timed.keywords == {"client_timeout": 45}
