"""The checks of a JSON request body that json.loads does not make, for every route at once:
UTF-8 (json.loads also reads UTF-16 and UTF-32, which no API here takes), and no text holding
a lone surrogate ("\\ud83d" alone, as a JavaScript client that cut a string inside an emoji
sends). That is not text: the tokenizer, the job store and the answer's own JSON cannot encode
it, wherever it is (a tool's description, metadata, a prompt to /tokenize), so it is a 400
naming the field."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from server.exceptions import InvalidRequest
from server.strict_json import loads

# An escape of a surrogate with no partner beside it in the raw body: only then is the parsed
# body walked (a body with emoji escaped in pairs, as json.dumps writes them, is not). What it
# matches that is not one (an escaped backslash before "ud83d") the walk lets through.
SURROGATE_ESCAPE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F]"
)
SURROGATE = re.compile("[\ud800-\udfff]")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A body larger than this is parsed on a worker thread: json.loads held the event loop (every
# stream, /health) 2 s for a 171 MB body of escapes.
PARSE_ON_THREAD_BYTES = 1 << 20


class ThreadParsedRequest(Request):
    """A request whose large JSON body is parsed off the event loop (its errors as before)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) > PARSE_ON_THREAD_BYTES:
                self._json = await asyncio.to_thread(loads, body)
            else:
                self._json = loads(body)
        return self._json


class ThreadParsedRoute(APIRoute):
    """Every route's: FastAPI parses the body through ThreadParsedRequest (FastAPI's own way
    to give routes another request class)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parsed_off_the_loop(request: Request) -> Response:
            return await handler(ThreadParsedRequest(request.scope, request.receive))

        return parsed_off_the_loop


async def check_json_body(request: Request) -> None:
    """A FastAPI dependency of every route: runs once the body is read and parsed (FastAPI
    keeps both on the request), before the route's model validates it."""
    if request.method not in BODY_METHODS or "json" not in request.headers.get("content-type", ""):
        return  # (a file upload's multipart body is not JSON)
    if getattr(request.scope.get("route"), "body_field", None) is None:
        return  # a route that takes no body (a cancel): whatever was sent is not read
    body = await request.body()
    if json.detect_encoding(body[:4]) not in ("utf-8", "utf-8-sig"):  # (a BOM, or NULs)
        raise InvalidRequest(
            "The request body is not valid JSON: it must be UTF-8 text (this is UTF-16 or UTF-32).",
            code="invalid_json",
        )
    # (off the event loop past PARSE_ON_THREAD_BYTES: the regex read a 300 MB body holding one
    # escaped emoji for 6 s there, every stream and /health waiting)
    off_loop = len(body) > PARSE_ON_THREAD_BYTES
    if not (
        await asyncio.to_thread(_escapes_surrogate, body) if off_loop else _escapes_surrogate(body)
    ):
        return
    try:
        parsed = await request.json()  # (parsed already: FastAPI keeps it)
    except (ValueError, RecursionError):
        return  # (FastAPI's own error says why)
    where = (
        await asyncio.to_thread(lone_surrogate_at, parsed)
        if off_loop
        else lone_surrogate_at(parsed)
    )
    if where is not None:
        param = _param(where)
        raise InvalidRequest(
            f"Invalid request at {param or 'the body'}: text contains an invalid unicode escape "
            "(a lone surrogate).",
            param=param,
            code="invalid_value",
        )


def _escapes_surrogate(body: bytes) -> bool:
    """Whether the raw body escapes a surrogate with no partner. The regex tries its
    look-behind at every byte (2 s per 50 MB: a large image's base64 held the event loop that
    long), so it reads only a body with an escape of a surrogate at all (a fast search)."""
    if b"\\" not in body:  # (memchr: a body without escapes, media's base64, in one fast pass)
        return False
    if b"\\ud" not in body and b"\\uD" not in body:
        return False
    return SURROGATE_ESCAPE.search(body) is not None


def lone_surrogate_at(value: Any) -> tuple[str | int, ...] | None:
    """The path to the first string (value or object key) holding a lone surrogate, else None.
    Iterative: a body nested as deep as json.loads allows does not overflow the stack here."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                return path
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if SURROGATE.search(key):
                    return path  # (the object whose key it is: the key itself cannot be sent)
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, i)) for i, child in reversed(list(enumerate(item))))
    return None


def _param(path: tuple[str | int, ...]) -> str | None:
    """("messages", 0, "content") -> "messages[0].content"."""
    text = ""
    for item in path:
        text += f"[{item}]" if isinstance(item, int) else (f".{item}" if text else item)
    return text or None
