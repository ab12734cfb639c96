"""`open_store`: the job store's contract runs against both backends, each test on an empty
store (a new SQLite file, or a new schema in the real PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from server.jobs.store import JobStore, open_job_store
from tests.jobs.pg import fresh_database


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    else:
        with fresh_database() as url:
            yield url


@pytest.fixture
def open_store(store_url: str, tmp_path: Path) -> Iterator[Callable[[], JobStore]]:
    """Opens the test's store; each call is another process's view of the same data."""
    with ExitStack() as stack:

        def open_one() -> JobStore:
            store = open_job_store(store_url, tmp_path)
            stack.callback(store.close)
            return store

        yield open_one


@pytest.fixture
def store(open_store: Callable[[], JobStore]) -> JobStore:
    return open_store()
