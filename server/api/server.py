"""The uvicorn server, with a graceful drain on SIGTERM / SIGINT."""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT new requests get a 503 at once (DrainMiddleware), in-flight ones get up
    to the config's timeout_graceful_shutdown to finish, then the lifespan stops the engine."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.app.state.draining:
            logger.info("draining: refusing new requests, finishing in-flight ones")
        self.app.state.draining = True
        super().handle_exit(sig, frame)


def serve(app: FastAPI, host: str, port: int, log_level: str, shutdown_timeout: float) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # server.log configured logging already
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout,
    )
    DrainingServer(config, app).run()
