"""The path a request is routed by: its ASGI path less the scope's root_path (--root-path,
the prefix a reverse proxy serves the API under; PathMiddleware puts both in the scope, as
the ASGI spec has them, so Starlette's routes and mounts match under it)."""

from __future__ import annotations

from starlette.types import Scope


def route_path(scope: Scope) -> str:
    """`/v1/models` for `/vlm/v1/models` under root_path `/vlm`."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and (path == root or path.startswith(f"{root}/")):
        return path[len(root) :] or "/"
    return path
