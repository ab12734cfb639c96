"""PathMiddleware: the path a client sends, as the routes have it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.api.errors import SENT_PATH
from server.api.middleware import PathMiddleware
from server.api.paths import route_path


def routed(path: str, raw: bytes | None = None, root: str = "") -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.update(scope)

    scope = {"type": "http", "path": path, "raw_path": raw if raw is not None else path.encode()}
    asyncio.run(PathMiddleware(app, root)(scope, None, None))  # type: ignore[arg-type]
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


@pytest.mark.parametrize(
    ("sent", "raw", "path", "raw_path"),
    [
        ("/vlm/models", b"/vlm/models", "/vlm/v1/models", b"/vlm/v1/models"),  # (passed on)
        ("/models", b"/models", "/vlm/v1/models", b"/vlm/v1/models"),  # (stripped by the proxy)
        ("/vlm", b"/vlm", "/vlm/", b"/vlm/"),
        ("/vlm/files/a b", b"/vlm/files/a%20b", "/vlm/v1/files/a b", b"/vlm/v1/files/a%20b"),
        ("/vlm/v1/models", b"/%76lm/v1/models", "/vlm/v1/models", b"/vlm/v1/models"),
        ("/vlmx/health", b"/vlmx/health", "/vlm/vlmx/health", b"/vlm/vlmx/health"),  # (a 404)
    ],
)
def test_under_a_root_path_the_path_is_the_prefix_and_the_routes(
    sent: str, raw: bytes, path: str, raw_path: bytes
) -> None:
    """ASGI's form: path and raw_path with the prefix, root_path the prefix (Starlette routes
    and mounts by what follows it); route_path reads the route's path back."""
    scope = routed(sent, raw, root="/vlm")
    assert (scope["path"], scope["raw_path"], scope["root_path"]) == (path, raw_path, "/vlm")
    assert route_path(scope) == path.removeprefix("/vlm")
