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


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """Refuses a request body over max_bytes with a 413, checked against Content-Length first
    and then while the body streams in, so an oversized body is never read whole."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

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
