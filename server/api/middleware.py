"""ASGI middleware that must see every request, routed or not: request ids, the body-size cap
and API keys. Each answers refusals itself, in the OpenAI error envelope."""

from __future__ import annotations

import hmac
import json
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.log import request_id_var

# A client's X-Request-ID is echoed and logged only if it looks like an id, never arbitrary text.
CLIENT_REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")


async def send_error(
    send: Send,
    status: int,
    message: str,
    error_type: str,
    code: str | None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-ID or a new one), logs with it and
    echoes it in the response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if CLIENT_REQUEST_ID.match(given) else uuid.uuid4().hex
        request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodySizeLimitMiddleware:
    """Refuses a request body over max_bytes with a 413, before the app reads any of it.

    With a Content-Length the header decides (the HTTP server never delivers more than it
    declares); a chunked body is read here up to the limit and then replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        await send_error(
            send,
            413,
            f"The request body is larger than the server's limit of {self.max_bytes} bytes.",
            "invalid_request_error",
            "request_too_large",
        )


class ApiKeyMiddleware:
    """When keys are configured, every route but the open ones needs 'Authorization: Bearer <key>'.
    Keys are compared in constant time, against all keys, so timing reveals nothing."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], open_paths: frozenset[str]):
        self.app = app
        self.keys = tuple(k.encode() for k in keys)
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        matches = [hmac.compare_digest(token.strip(), key) for key in self.keys]
        if scheme.lower() == b"bearer" and any(matches):
            await self.app(scope, receive, send)
            return
        await send_error(
            send,
            401,
            "Invalid or missing API key. Send it as 'Authorization: Bearer <key>'.",
            "authentication_error",
            "invalid_api_key",
            [(b"www-authenticate", b"Bearer")],
        )


class DrainMiddleware:
    """While the server shuts down (app.state.draining), new requests get a 503 at once."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and getattr(scope["app"].state, "draining", False):
            await send_error(
                send,
                503,
                "The server is shutting down; retry on another instance or later.",
                "server_error",
                "shutting_down",
                [(b"retry-after", b"5")],
            )
            return
        await self.app(scope, receive, send)
