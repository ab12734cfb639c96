"""Logging set-up: every record carries the id of the request it belongs to, and times are
ISO-8601 in UTC (log lines from several machines sort and compare as they are).

`text` is for people; `json` (one object per line) is for log shippers. A record may carry
structured `fields` (logger.info(..., extra={"fields": {...}})): JSON lines include them as keys."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
# A scope key only the server's own requests to itself carry (a server never takes scope
# keys from the network): a batch's lines and background responses, which run in the task of
# their job, and so in its project, and need no API key. Their access lines say so, and they
# are counted apart from clients' requests (vlm_internal_requests).
INTERNAL = "vlm.internal"

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def iso_time(created: float) -> str:
    """2026-11-28T12:07:14.123Z"""
    moment = datetime.fromtimestamp(created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        # uvicorn's general logger is named uvicorn.error, its INFO lines included ("Started
        # server process"): an alert on logger names that say error would fire at every start
        if record.name == "uvicorn.error":
            record.name = "uvicorn"
        return True


# Control characters a client may have put in what a message quotes (a path, an id, a model
# name): written escaped, so no request can start a line of its own in the log.
# (C0, DEL, C1, and the Unicode line and paragraph separators some log viewers break lines at)
CONTROL_CHARS = {c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)]}
CONTROL_CHARS |= {10: "\\n", 13: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class TextFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return iso_time(record.created)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        """One line a record (a traceback, appended after, keeps its lines)."""
        record.message = record.message.translate(CONTROL_CHARS)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # psycopg's pool warns (several lines) at each failed connection attempt; the job store
    # says once, in one line, that the database cannot be reached (at start and in outages)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    # transformers' warnings through this handler (time, request id), not its own stderr one
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    # Progress bars (weights loading) only on a terminal: in a log file, journald or `docker
    # logs` they are a line of carriage returns without time or level; a JSON log's every
    # line is an object.
    if fmt == "json" or not sys.stderr.isatty():
        transformers_logging.disable_progress_bar()
