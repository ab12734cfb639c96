"""PathMiddleware: the path a client sends, as the routes have it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.api.errors import SENT_PATH
from server.api.middleware import PathMiddleware


def routed(path: str, raw: bytes | None = None) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.update(scope)

    scope = {"type": "http", "path": path, "raw_path": raw if raw is not None else path.encode()}
    asyncio.run(PathMiddleware(app)(scope, None, None))  # type: ignore[arg-type]
    return seen


@pytest.mark.parametrize(
    ("sent", "path"),
    [
        ("/models", "/v1/models"),
        ("/chat/completions/", "/v1/chat/completions"),
        ("/v1/models/", "/v1/models"),
        ("/fine_tuning/jobs", "/v1/fine_tuning/jobs"),
        ("/health", "/health"),  # the server's own root routes stay
        ("/tokenize", "/tokenize"),
        ("/v2/media/completions", "/v2/media/completions"),
        ("/", "/"),
        ("*x", "*x"),  # (a request target without "/": passed on, a 404; it was a 500)
        ("", ""),
    ],
)
def test_paths_as_routed(sent: str, path: str) -> None:
    scope = routed(sent)
    assert scope["path"] == path
    assert scope["raw_path"] == path.encode()
    if path != sent:
        assert scope[SENT_PATH] == sent


def test_percent_escapes_are_kept_in_the_raw_path() -> None:
    scope = routed("/files/a b", b"/files/a%20b")
    assert (scope["path"], scope["raw_path"]) == ("/v1/files/a b", b"/v1/files/a%20b")
