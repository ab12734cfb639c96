"""uvicorn's HTTP connection with a bound on a request's headers and a client's two time limits
(nginx's client_header_timeout and client_body_timeout). uvicorn closes a keep-alive connection
left idle between requests (--timeout-keep-alive), but never one that opened and sent nothing,
one that sent half a request's headers, or one whose body stopped coming: each held a file
descriptor (a body, its buffered bytes too) for as long as the client liked, and a few thousand
of them exhaust the server's. Here a request's headers must be complete within --client-timeout
of its first byte (or of the connection), and its body may pause at most that long; then the
connection closes (a request already running sees the client gone, a 499). A request's line and
headers may take MAX_HEADER_BYTES (nginx's and h11's are smaller): httptools bounds neither, and
read a header growing without end in time that grows as its square, on the event loop, before
any API key is checked (a 120 MB header held every request for 10 s)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.api.errors import error_body

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
TOO_LARGE = "request_headers_too_large"


class CloseLog:
    """One line a second at most for the connections closed (a flood of them, slowloris-style,
    must not flood the log): the first at once, then each second's count, with the latest's
    address and reason."""

    def __init__(self, every_s: float = 1.0):
        self.every_s = every_s
        self.unlogged = 0
        self.latest: tuple[Any, str] = (None, "")
        self.window: asyncio.TimerHandle | None = None  # while on, closes are only counted
        self.loop: asyncio.AbstractEventLoop | None = None  # the window's

    def log(self, client: Any, reason: str) -> None:
        self.unlogged += 1
        self.latest = (client, reason)
        # (a window of a loop that has ended never closes: a new loop starts its own)
        if self.window is None or self.loop is not asyncio.get_running_loop():
            self._write()

    def _write(self) -> None:
        if not self.unlogged:
            self.window = None
            return
        client, reason = self.latest
        where = f"{client[0]}:{client[1]}" if client else "a client"
        logger.info("closed %d connection(s), the latest from %s: %s", self.unlogged, where, reason)
        self.unlogged = 0
        self.loop = asyncio.get_running_loop()
        self.window = self.loop.call_later(self.every_s, self._write)


CLOSES = CloseLog()


class LimitedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose request line and headers may take MAX_HEADER_BYTES: beyond, a
    431 (OpenAI's error body) and the connection closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.headers_done = False  # the request being read is past its headers
        self.header_bytes = 0  # what came of them so far
        self.begun = False  # a request began in the piece being read

    def data_received(self, data: bytes) -> None:
        """Counted once read, from the piece after the one a request began in: that piece may
        also hold earlier requests (pipelined: hundreds of small ones in one read) and their
        bodies, and is bounded by the transport's read size anyway."""
        self.begun = False
        super().data_received(data)
        if not self.headers_done and not self.begun:
            self.header_bytes += len(data)
            if self.header_bytes > MAX_HEADER_BYTES:
                self._refuse_headers()

    def _refuse_headers(self) -> None:
        if self.transport.is_closing():
            return
        cycle = self.cycle  # (a request still being answered on this connection: no 431
        if cycle is None or cycle.response_complete:  # written into its answer)
            message = (
                f"The request's headers are longer than this server reads "
                f"({MAX_HEADER_BYTES // 1024} KiB)."
            )
            error = error_body(False, 431, message, "invalid_request_error", None, TOO_LARGE)
            body = json.dumps(error).encode()
            head = "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json"
            head += f"\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n"
            self.transport.write(head.encode() + body)
        CLOSES.log(self.client, f"its request's headers passed {MAX_HEADER_BYTES // 1024} KiB")
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.headers_done, self.header_bytes, self.begun = False, 0, True

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.headers_done = True


class TimedHttpProtocol(LimitedHttpProtocol):
    """HttpToolsProtocol with one timer: armed while a request is incomplete (from the
    connection or the request's first byte until its headers end: one deadline for all of them,
    however slowly they trickle; then again from each piece of its body), off while the
    request is answered and between requests (uvicorn's keep-alive timer is there)."""

    def __init__(self, *args: Any, client_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_timeout = client_timeout
        self.deadline: asyncio.TimerHandle | None = None
        self.was_behind = False  # the last check found the wait the server's

    def _arm(self) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(self.client_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _timed_out(self) -> None:
        self.deadline = None
        behind = self._waiting_on_server()
        if behind or self.was_behind:  # (a wait that ended since the last check: the
            self.was_behind = behind  # client's clock starts again from now)
            self._arm()
            return
        if not self.transport.is_closing():
            part = "body paused" if self.headers_done else "headers were not complete"
            timeout = f"{self.client_timeout:g}"
            CLOSES.log(self.client, f"its request's {part} for --client-timeout ({timeout} s)")
            self.transport.close()

    def _waiting_on_server(self) -> bool:
        """Whether the wait is the server's, not the client's: the app has not read what came,
        the client waits for its 100 Continue, or the request being read was pipelined behind
        one still being answered (its answer must not be cut)."""
        if self.flow is not None and self.flow.read_paused:
            return True
        cycle = self.cycle
        if not self.headers_done:  # (cycle: the connection's previous request, if any)
            return cycle is not None and not cycle.response_complete
        return bool(self.pipeline) or (cycle is not None and cycle.waiting_for_100_continue)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.was_behind = False
        if self.deadline is None:  # (a new connection's first request: armed since it opened)
            self._arm()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.was_behind = False
        self._arm()  # the body's first piece (a request without one completes at once)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self.was_behind = False  # (the client moves: a later pause has the limit alone)
        self._arm()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.deadline is not None:  # a request read behind the one just answered: its
            self._arm()  # clock starts now (nginx's too)

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # (the connection is another protocol's from here)
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
