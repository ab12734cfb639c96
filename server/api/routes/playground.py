"""The browser playground at `/`: plain HTML, JS and CSS shipped in the package (no build step,
no CDN), calling the public API like any other client (--no-playground turns it off)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# (not among the static files: only ever served with its <base> set)
INDEX = (STATIC_DIR.parent / "playground.html").read_text()
BASE = '<base href="/">'


def mount(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def playground(request: Request) -> HTMLResponse:
        # Its paths are relative to its base: the server's root, under --root-path behind a
        # proxy (whether the page was opened as /vlm or /vlm/).
        root = request.scope.get("root_path", "")
        page = INDEX.replace(BASE, f'<base href="{root}/">', 1)
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    app.mount("/playground", StaticFiles(directory=STATIC_DIR), name="playground")
