"""The real PostgreSQL the tests use (never a mock): VLM_TEST_POSTGRES_URL, by default the one
every development and CI machine runs on 127.0.0.1:5432 (trust auth, database `test`). Each test
gets a schema of its own. Without a server the tests skip, saying why; under CI=true they fail."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest

BASE_URL = os.environ.get("VLM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def require_postgres() -> str:
    try:
        with psycopg.connect(BASE_URL, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        message = f"no PostgreSQL at {BASE_URL} ({type(exc).__name__}); set VLM_TEST_POSTGRES_URL"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI runs the PostgreSQL tests; start the server)")
        pytest.skip(message)
    return BASE_URL


def with_schema(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-csearch_path={schema}')}"


@contextmanager
def fresh_database(base_url: str | None = None) -> Iterator[str]:
    """A URL whose tables live in a new, empty schema; dropped afterwards."""
    base_url = base_url or require_postgres()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(BASE_URL, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(base_url, schema)
    finally:
        with psycopg.connect(BASE_URL, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")


class TcpProxy:
    """Forwards a local port to PostgreSQL; `cut()` drops every connection and refuses new ones
    (the database going away), `restore()` lets them through again."""

    def __init__(self) -> None:
        parts = urlsplit(BASE_URL)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, base_url: str) -> str:
        """base_url, through the proxy."""
        parts = urlsplit(base_url)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def cut(self) -> None:
        self.open = False
        for sock in self.sockets:
            with _suppress():
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.sockets.clear()

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with _suppress():
        while data := source.recv(65536):
            sink.sendall(data)
    with _suppress():
        sink.shutdown(socket.SHUT_WR)


def _suppress() -> suppress:
    return suppress(OSError)
