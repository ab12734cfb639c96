"""The browser playground at `/`: plain HTML, JS and CSS shipped in the package (no build step,
no CDN), calling the public API like any other client (--no-playground turns it off)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def mount(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/playground", StaticFiles(directory=STATIC_DIR), name="playground")
