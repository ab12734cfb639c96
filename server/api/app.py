"""create_app(settings): the FastAPI app; its lifespan builds the engine and the pipelines."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__
from server.api.errors import install_error_handlers
from server.api.routes import chat, health
from server.api.services import Services
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.inputs import InputBuilder
from server.engine.loader import LoadedModel, load_model
from server.log import request_id_var
from server.media.fetch import FetchPolicy, MediaFetcher
from server.pipelines.chat import ChatPipeline

logger = logging.getLogger(__name__)

# A client's X-Request-ID is echoed and logged only if it looks like an id, never arbitrary text.
CLIENT_REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")


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


def create_app(settings: Settings, loaded: LoadedModel | None = None) -> FastAPI:
    """loaded: a model the caller already loaded (the CLI does, to fail before serving)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal loaded
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if loaded is None:
            loaded = await asyncio.to_thread(load_model, settings.engine_config())
        engine = AsyncEngine.build(loaded, settings.engine_config())
        engine.start()
        fetcher = MediaFetcher(
            FetchPolicy(
                timeout_s=settings.media_fetch_timeout,
                allowed_hosts=tuple(settings.allowed_media_domains),
                follow_redirects=settings.media_follow_redirects,
                local_media_root=settings.allowed_local_media_path,
            )
        )
        image_processor = loaded.processor.image_processor
        pipeline = ChatPipeline(
            engine,
            InputBuilder(loaded.processor, loaded.image_token_id),
            fetcher,
            settings.media_limits(),
            model_max_pixels=image_processor.size["longest_edge"],
            max_concurrent_preprocessing=settings.max_concurrent_preprocessing,
        )
        app.state.services = Services(
            loaded=loaded,
            engine=engine,
            chat=pipeline,
            served_model_names=tuple(settings.served_model_names()),
            api_keys=tuple(settings.api_keys),
        )
        logger.info("serving %s", ", ".join(settings.served_model_names()))
        try:
            yield
        finally:
            await engine.stop()
            await fetcher.aclose()

    app = FastAPI(
        title="vlm-server",
        version=__version__,
        summary="OpenAI-compatible inference server for Qwen2-VL vision-language models",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(chat.router)
    app.add_middleware(RequestIdMiddleware)
    return app
