"""The uvicorn server: listens on a socket bound before the model loaded, says once what it
serves, and drains on SIGTERM / Ctrl-C with the listener still up."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI

from server.config import Settings
from server.exceptions import JobStoreStartError, ModelLoadError, StartupError
from server.jobs.project import of_key

if TYPE_CHECKING:
    from server.engine.engine import AsyncEngine

logger = logging.getLogger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT new requests get a 503 `shutting_down` at once (DrainMiddleware) while
    the listener stays open, so clients are answered rather than refused; in-flight requests and
    webhook attempts get up to the config's timeout_graceful_shutdown to finish; then uvicorn
    closes the listener and the lifespan stops the engine. A second Ctrl-C ends the wait."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, settings: Settings):
        super().__init__(config)
        self.app = app
        self.settings = settings
        self.sockets: list[socket.socket] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # the one serving, once started
        # _stop_background_work's put-back: (jobs back in the queue, jobs that could not be)
        self.putting_back: asyncio.Future[tuple[int, int]] | None = None
        # The signals that stopped it, in order (uvicorn keeps its own, privately): Ctrl-C's
        # exit code 130 even where SIGINT came in ignored.
        self.signals: list[int] = []

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)
        if not self.app.state.draining:
            # (in an empty context: the signal interrupts whichever task runs, whose request
            # id the line is not about)
            contextvars.Context().run(
                logger.info, "draining: new requests get 503, in-flight ones may finish"
            )
            if self.loop is not None:  # (a signal handler: the loop's own thread-safe call)
                self.loop.call_soon_threadsafe(self._stop_background_work)
        self.app.state.draining = True
        super().handle_exit(sig, frame)

    def _stop_background_work(self) -> None:
        """The jobs running here go back to the queue at once, not when the drain ends: another
        replica starts them now, and they are back before an orchestrator's SIGKILL (whose
        grace period may be no longer than --shutdown-timeout). No webhook attempt starts
        after; those in flight are waited for like requests (one cut off is sent again: a
        duplicate at its receiver). Once: at the signal, or after the start-up
        it came during (the services did not exist yet)."""
        services = getattr(self.app.state, "services", None)
        if services is not None and self.putting_back is None:
            self.putting_back = asyncio.ensure_future(services.job_worker.stop())
            services.webhooks.drain()

    def jobs_put_back(self) -> tuple[int, int] | None:
        """The jobs running here that went back to the queue at the first signal, and those
        that could not (None: that is not over)."""
        future = self.putting_back
        if future is None or not future.done() or future.cancelled() or future.exception():
            return None
        return future.result()

    def _busy(self) -> bool:
        """A request or a webhook attempt still in flight."""
        services = getattr(self.app.state, "services", None)
        attempts = services.webhooks.in_flight if services is not None else {}
        return getattr(self.app.state, "num_in_flight", 0) > 0 or bool(attempts)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.sockets = sockets or []
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.app.state.draining:  # a signal during the start-up: stop what it started
            self._stop_background_work()
        elif self.started:
            logger.info("%s", startup_summary(self.app, self.settings, self.sockets))
            if keys := self.settings.all_api_keys():
                logger.info("%s", projects_line(keys, self.app.state.metrics.project_label))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        deadline = time.monotonic() + self.config.timeout_graceful_shutdown
        while self._busy() and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # uvicorn's own wait (connections, then tasks) gets what is left of the one timeout.
        self.config.timeout_graceful_shutdown = max(deadline - time.monotonic(), 0.0)
        if getattr(self.app.state, "num_in_flight", 0) > 0:
            # what still runs is cut off when uvicorn's wait ends (DrainMiddleware answers it)
            self.app.state.cut_off = (
                "a second Ctrl-C stopped the server"
                if self.force_exit
                else "still running when --shutdown-timeout was up"
            )
        await super().shutdown(sockets)


class CutOffFilter(logging.Filter):
    """uvicorn logs the requests --shutdown-timeout cuts off as an ERROR; it is what the flag
    asks for (each cut request has its own line), so a warning: not an alert."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "timeout graceful shutdown exceeded" in record.getMessage():
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class ForcedStopFilter(logging.Filter):
    """A second Ctrl-C stops at once: uvicorn skips the app's shutdown and logs the lifespan's
    cancellation as an ERROR with a traceback. It is what the operator asked for: one line,
    which says where the jobs that were running here are."""

    # (Starlette's lifespan sends its traceback as the message; uvicorn's own, as exc_info)
    CANCELLED = ("asyncio.exceptions.CancelledError", "KeyboardInterrupt")

    def __init__(self, server: DrainingServer):
        super().__init__()
        self.server = server

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.server.force_exit:
            return True
        message = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        last_line = message.rstrip().rsplit("\n", 1)[-1]
        if (message.startswith("Traceback") and last_line in self.CANCELLED) or (
            message.startswith("Exception in 'lifespan' protocol")
            and isinstance(exc, asyncio.CancelledError | KeyboardInterrupt)
        ):
            record.msg, record.args = f"{FORCED_STOP}, and {forced_jobs_line(self.server)}", ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


FORCED_STOP = "stopped at once (a second Ctrl-C): in-flight requests were cut off"
FORCED_JOBS_LEASED = (
    "the jobs this server was running go back to the queue when their lease ends (at once "
    "when it restarts on this machine)"
)


def forced_jobs_line(server: DrainingServer) -> str:
    """Where the jobs that were running are, after a second Ctrl-C."""
    put_back = server.jobs_put_back()
    if put_back is None or put_back[1]:
        return FORCED_JOBS_LEASED
    if put_back[0] == 0:
        return "no job was running here"
    back = put_back[0]
    return f"the {back} job(s) this server was running went back to the queue at the first signal"


class StartupErrorFilter(logging.Filter):
    """A lifespan that fails with a StartupError (a KV cache budget that holds nothing, a job
    store that cannot be reached) is an operator's mistake: log its message as one line, not
    Starlette's traceback."""

    MARKERS = tuple(
        f"{kind.__module__}.{kind.__name__}: "
        for kind in (StartupError, ModelLoadError, JobStoreStartError)
    )

    def __init__(self) -> None:
        super().__init__()
        self.startup_error: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Traceback"):
            return True
        for marker in self.MARKERS:
            if marker in message:
                self.startup_error = message.rsplit(marker, 1)[1].strip()
                record.msg, record.args = self.startup_error, ()
                record.exc_info = record.exc_text = None
        return True


def http_protocol(client_timeout: float) -> Any:
    """uvicorn's httptools protocol with a bound on the headers, and with --client-timeout
    its time limits."""
    try:
        from server.api.connection import LimitedHttpProtocol, TimedHttpProtocol
    except ImportError:  # (no httptools, which uvicorn[standard] brings: h11, its own bound)
        if client_timeout > 0:
            logger.warning("--client-timeout needs httptools (uvicorn[standard]): not applied")
        return "auto"
    if client_timeout <= 0:
        return LimitedHttpProtocol
    return functools.partial(TimedHttpProtocol, client_timeout=client_timeout)


def serve(app: FastAPI, settings: Settings, sock: socket.socket) -> int:
    """Runs until shut down; the process exit code (2: the model could not be served)."""
    config = uvicorn.Config(
        app,
        http=http_protocol(settings.client_timeout),
        log_config=None,  # server.log configured logging already
        log_level=settings.log_level,
        access_log=False,  # AccessLogMiddleware writes one line per request, with its latency
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=settings.shutdown_timeout,
        lifespan="on",
    )
    server = DrainingServer(config, app, settings)
    startup_errors = StartupErrorFilter()
    filters = (startup_errors, CutOffFilter(), ForcedStopFilter(server))
    uvicorn_logger = logging.getLogger("uvicorn.error")
    for each in filters:
        uvicorn_logger.addFilter(each)
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits this way when the lifespan fails
        return 2 if startup_errors.startup_error else int(exc.code or 1)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has drained: a clean exit
        return 130
    finally:
        for each in filters:
            uvicorn_logger.removeFilter(each)
    # Ctrl-C's 130 also where SIGINT came in ignored (a background job of a script), which
    # uvicorn's re-raise then leaves ignored: the stop was asked for all the same.
    return 130 if signal.SIGINT in server.signals else 0


def image_budget(auto_image_tokens: int) -> str:
    """What an image without a detail becomes: where a client written for vLLM differs."""
    if not auto_image_tokens:
        return "images without a detail: full resolution"
    return (
        f"images without a detail: at most {auto_image_tokens} tokens "
        "(--auto-image-tokens 0: full resolution, as vLLM)"
    )


def startup_summary(app: FastAPI, settings: Settings, sockets: list[socket.socket]) -> str:
    """One line with what an operator checks first."""
    services = app.state.services
    loaded, engine = services.loaded, services.engine
    kv_tokens = int(engine.stats()["kv_cache_blocks"]) * settings.block_size
    url = open_url(settings.host, sockets)
    hosts = ", ".join(settings.allowed_media_domains) or "any public host"
    keys = settings.all_api_keys()
    num_keys, num_projects = len(keys), len(set(keys.values()))
    parts = [
        f"serving {', '.join(services.served_model_names)} ({loaded.family}, {loaded.path})",
        f"device {loaded.device}, {str(loaded.dtype).removeprefix('torch.')}",
        f"context {engine.max_seq_len} tokens, KV cache {kv_tokens} tokens",
        decode_mode(engine),
        (
            f"auth on ({num_keys} API key{'s' * (num_keys > 1)} in {num_projects} "
            f"project{'s' * (num_projects > 1)})"
            if num_keys
            else "auth off"
        ),
        image_budget(settings.auto_image_tokens),
        f"media hosts: {hosts}",
        f"local media: {settings.allowed_local_media_path or 'off'}",
        f"data dir {settings.data_dir.resolve()} (jobs: {job_store_where(settings)})",
        f"open {url} (API docs: {url}docs)" if settings.playground else f"API docs: {url}docs",
    ]
    return "ready: " + "; ".join(parts)


def decode_mode(engine: AsyncEngine) -> str:
    """The decode speed switches as they ended up (a CUDA graph needs CUDA to be captured)."""
    runner = engine.runner
    attention = "triton" if runner.use_kernel else "reference"
    if runner.graphs is None:
        steps = "eager"
    else:
        steps = "CUDA graphs" if runner.graphs.graphs else "graph buffers, not captured (no CUDA)"
    scheduling = "async" if engine.async_scheduling else "sync"
    decoder = "fused decoder" if runner.decoder is not None else "HF text model"
    if runner.decoder is not None and runner.decoder.is_compiled:
        decoder = "compiled fused decoder"
    return f"decode: {decoder}, {attention} attention, {steps}, {scheduling} scheduling"


def projects_line(keys: dict[str, str], label_of: Callable[[str], str]) -> str:
    """The API keys' projects, as /metrics labels them: a named one with its number of keys,
    a key's own (label_of: ProjectLabels) with the key's last 4 characters (enough to tell which,
    not to use it; none of a key too short to spare them)."""
    named: dict[str, int] = {}
    own = []
    for key, project in keys.items():
        if project == of_key(key):
            label = label_of(project)
            own.append(f"{label} (the key ending ...{key[-4:]})" if len(key) >= 16 else label)
        else:
            named[project] = named.get(project, 0) + 1
    parts = [f"{name} ({n} key{'s' * (n > 1)})" for name, n in sorted(named.items())]
    return "API key projects: " + ", ".join(parts + own)


def job_store_where(settings: Settings) -> str:
    """The job store's kind and where it is: SQLite's file (made absolute: `sqlite:///x` is
    relative to the working directory), PostgreSQL's host:port/db (its URL may carry a
    password: never shown)."""
    store = str(getattr(settings, "job_store", "") or "")
    if store.startswith(("postgresql://", "postgres://")):
        from server.jobs.postgres import where

        return f"postgresql {where(store)}"
    path = Path(store.removeprefix("sqlite:///")) if store else settings.data_dir / "jobs.sqlite3"
    return f"sqlite {path.resolve()}"


def open_url(host: str, sockets: list[socket.socket]) -> str:
    port = sockets[0].getsockname()[1] if sockets else 8000
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"  # listening everywhere: this machine's own address always works
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"
