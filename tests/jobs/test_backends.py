"""What only one backend has: SQLite data dirs from older versions open; on PostgreSQL, replicas
that start together migrate the schema once, retention clean-up is one replica at a time, and a
database that goes away is JobStoreUnavailable until it is back (then the same store works)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from server.exceptions import IdempotencyKeyReused, InvalidRequest, JobStoreUnavailable
from server.jobs.postgres import PostgresJobStore
from server.jobs.sqlite import SCHEMA, SqliteJobStore
from server.jobs.store import open_job_store
from tests.jobs.pg import TcpProxy, fresh_database


def test_a_data_dir_from_before_request_hashes_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA.replace("    request_hash TEXT", "    unused_column TEXT"))
    old.execute(
        "INSERT INTO jobs (id, kind, request, status, created_at, updated_at, idempotency_key)"
        " VALUES ('job-old', 'categories', '{\"a\": 1, \"webhook_url\": \"http://h/\"}',"
        " 'queued', 0, 0, 'k')"
    )
    old.commit()
    old.close()
    store = SqliteJobStore(path)
    claimed = store.claim(lease_s=60)  # it finishes (and drops its request) after the upgrade
    assert claimed is not None and store.complete(claimed, {"ok": True})
    assert store.create("categories", {"a": 1, "webhook_url": "http://h/"}, "k").id == "job-old"
    with pytest.raises(IdempotencyKeyReused):
        store.create("categories", {"a": 2}, "k")
    (delivery,) = store.due_deliveries()  # its webhook URL was carried over
    assert delivery["url"] == "http://h/"
    store.close()
    assert SqliteJobStore(path).get("job-old") is not None  # migrated once, opens again


def test_a_data_dir_set_back_by_an_older_server_migrates_again(tmp_path: Path) -> None:
    """Version 3 (files, batches' descriptions) over a data dir an older server opened after
    it (that server writes version 2 back): migrating again changes nothing; a newer one's
    data dir is refused in words."""
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    stored = store.add_file("batch", "a.jsonl", b"{}", project="")
    store.close()
    older = sqlite3.connect(path)
    older.execute("PRAGMA user_version = 2")
    older.commit()
    older.close()
    store = SqliteJobStore(path)
    assert store.file_content(stored.id, project="") == b"{}"
    store.close()
    version_3 = sqlite3.connect(path)  # a data dir from before the batches' saved answers
    version_3.execute("DROP TABLE batch_answers")
    version_3.execute("PRAGMA user_version = 3")
    version_3.commit()
    version_3.close()
    store = SqliteJobStore(path)
    assert store.answers("batch_x") == []  # the table is back
    store.close()
    version_4 = sqlite3.connect(path)  # a data dir from before the stored responses
    version_4.execute("DROP TABLE responses")
    version_4.execute("PRAGMA user_version = 4")
    version_4.commit()
    version_4.close()
    store = SqliteJobStore(path)
    assert store.get_response("resp_x", project="") is None  # the table is back
    store.close()
    version_5 = sqlite3.connect(path)  # a data dir from before the streamed background events
    version_5.execute("DROP TABLE response_events")
    version_5.execute("PRAGMA user_version = 5")
    version_5.commit()
    version_5.close()
    store = SqliteJobStore(path)
    assert store.events_after("resp_x", -1).events == []  # the table is back
    store.close()
    newer = sqlite3.connect(path)
    newer.execute("PRAGMA user_version = 9")
    newer.commit()
    newer.close()
    with pytest.raises(ValueError, match="newer version"):
        SqliteJobStore(path)


def test_the_default_store_is_under_the_data_dir(tmp_path: Path) -> None:
    store = open_job_store(None, tmp_path)
    assert isinstance(store, SqliteJobStore) and (tmp_path / "jobs.sqlite3").exists()
    with pytest.raises(ValueError, match="job-store"):
        open_job_store("mysql://x", tmp_path)


def test_replicas_starting_together_migrate_once() -> None:
    with fresh_database() as url:
        stores: list[PostgresJobStore] = []
        threads = [
            threading.Thread(target=lambda: stores.append(PostgresJobStore(url))) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(stores) == 4
        with stores[0].transaction(write=False) as execute:
            versions = execute("SELECT version FROM schema_version", ()).fetchall()
        assert [row["version"] for row in versions] == [1, 2, 3, 4, 5, 6, 7]  # each migration once
        # a DBA tells the server's connections apart (pg_stat_activity), unless the URL names
        # them itself
        with stores[0].transaction(write=False) as execute:
            named = execute(
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()", ()
            ).fetchone()
        assert named["application_name"] == "vlm-server"
        for store in stores:
            store.close()
    from server.jobs.postgres import connection_kwargs

    assert "application_name" not in connection_kwargs(url + "&application_name=mine")
    # a connection whose database stops answering is given up in seconds, not the kernel's
    # minutes (unless the URL says otherwise)
    with psycopg.connect(url, **connection_kwargs(url)) as connection:
        parameters = connection.info.get_parameters()
    assert parameters["tcp_user_timeout"] == "15000" and parameters["keepalives_idle"] == "10"
    assert connection_kwargs(url + "&tcp_user_timeout=0")["keepalives_count"] == 3
    assert "tcp_user_timeout" not in connection_kwargs(url + "&tcp_user_timeout=0")


def test_a_column_a_newer_replica_adds_does_not_fail_this_ones_claims() -> None:
    """A rolling upgrade: a newer replica's migration adds a column to jobs while this one
    runs. psycopg prepares a statement run 5 times on a connection, and a prepared `RETURNING
    *` whose rows change shape fails ("cached plan must not change result type"): each pooled
    connection's next claim failed, logged as an error. Statements are not prepared."""
    with fresh_database() as url:
        store = PostgresJobStore(url)
        try:
            for _ in range(8):
                store.create("categories", {}, None)
                assert store.claim(60) is not None
            with psycopg.connect(url, autocommit=True) as connection:
                connection.execute("ALTER TABLE jobs ADD COLUMN later INTEGER NOT NULL DEFAULT 0")
            for _ in range(3):
                job = store.create("categories", {}, None)
                assert store.claim(60) == store.get(job.id)
        finally:
            store.close()


def test_one_replica_at_a_time_prunes() -> None:
    with fresh_database() as url:
        first, second = PostgresJobStore(url), PostgresJobStore(url)
        first.create("categories", {}, None)
        claimed = first.claim(lease_s=60)
        assert claimed is not None and first.complete(claimed, {})
        with first.transaction() as execute:
            assert first._try_lock(execute, "prune")  # the first replica is pruning
            assert second.prune(older_than_s=-1) == 0  # so the second skips its turn
        assert second.prune(older_than_s=-1) == 1
        first.close()
        second.close()


@contextlib.contextmanager
def store_behind_a_proxy() -> Iterator[tuple[PostgresJobStore, TcpProxy]]:
    """A store on a fresh database through a proxy the test can cut."""
    with fresh_database() as url:
        proxy = TcpProxy()
        store = PostgresJobStore(proxy.url(url))
        try:
            yield store, proxy
        finally:
            store.close()
            proxy.close()


def test_a_database_that_goes_away_is_unavailable_then_back() -> None:
    with store_behind_a_proxy() as (store, proxy):
        job = store.create("categories", {}, None)
        proxy.cut()
        started = time.monotonic()
        with pytest.raises(JobStoreUnavailable):
            store.get(job.id)
        with pytest.raises(JobStoreUnavailable):
            store.create("categories", {}, None)
        assert time.monotonic() - started < 30  # a prompt 503, not a hang
        assert store.unreachable_since is not None  # (/health and the metrics say so)
        proxy.restore()
        deadline = time.monotonic() + 30
        while True:
            try:
                assert store.get(job.id) is not None
                break
            except JobStoreUnavailable:
                assert time.monotonic() < deadline, "the store did not reconnect"
                time.sleep(0.2)
        assert store.unreachable_since is None


def test_the_store_answers_within_seconds_of_a_long_outages_end() -> None:
    """psycopg_pool's reconnect delays double (1, 3, 7, 15 s after the cut...): a 10 s outage
    was answered 5 s after it ended, a 45 s one 20 s after. The store's pool tries again
    every second at most."""
    with store_behind_a_proxy() as (store, proxy):
        job = store.create("categories", {}, None)
        proxy.cut()
        cut_until = time.monotonic() + 10
        while time.monotonic() < cut_until:  # (requests keep coming meanwhile)
            with contextlib.suppress(JobStoreUnavailable):
                store.get(job.id)
            time.sleep(0.2)
        proxy.restore()
        restored = time.monotonic()
        while True:
            with contextlib.suppress(JobStoreUnavailable):
                if store.get(job.id) is not None:
                    break
            assert time.monotonic() - restored < 3, "the pool did not reconnect in 3 s"
            time.sleep(0.1)


def test_a_busy_database_is_not_an_unreachable_one() -> None:
    """A statement cancelled (or a lost deadlock) is an error of that transaction, and a pool
    whose connections are all in use times out: neither makes the store unreachable for
    /health (a healthy database was reported down, and every call's wait cut short)."""
    with fresh_database() as url:
        store = PostgresJobStore(url)
        try:
            with pytest.raises(JobStoreUnavailable), store.transaction() as execute:
                execute("SET LOCAL statement_timeout = 1", ())
                execute("SELECT pg_sleep(1)", ())
            assert store.unreachable_since is None
            held = [store.pool.getconn() for _ in range(store.pool.max_size)]
            try:
                with pytest.raises(JobStoreUnavailable), store.transaction() as execute:
                    execute("SELECT 1", ())
            finally:
                for connection in held:
                    store.pool.putconn(connection)
            assert store.unreachable_since is None
        finally:
            store.close()


def test_a_nul_character_from_a_client_is_a_bad_request_on_postgres() -> None:
    """PostgreSQL text cannot hold NUL: an id or cursor with one is the client's mistake (400),
    never a 500."""
    with fresh_database() as url:
        store = PostgresJobStore(url)
        try:
            for call in (
                lambda: store.get("job-\x00"),
                lambda: store.cancel("job-\x00"),
                lambda: store.list(None, 10, "job-\x00"),
                lambda: store.create("categories", {"webhook_url": "http://h/\x00"}, None),
            ):
                with pytest.raises(InvalidRequest):
                    call()
            assert store.get("job-x") is None  # the store is fine afterwards
        finally:
            store.close()


def test_a_job_store_that_cannot_be_opened_is_one_clear_start_up_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At start-up an unreachable database, or a search_path schema that does not exist, is
    the operator's to fix: a StartupError with one line saying so (the CLI exits with 2).
    (Its retries shortened from 10 s to 2 s each: the same errors, 30 s less of CI.)"""
    from server.exceptions import JobStoreStartError
    from server.jobs import postgres

    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT_S", 1)
    from server.jobs.postgres import PostgresJobStore
    from tests.helpers import free_port
    from tests.jobs.pg import require_postgres, with_schema

    with pytest.raises(JobStoreStartError, match="cannot connect .*: Connection refused"):
        PostgresJobStore(f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    # a host name that does not resolve (yet: a service DNS adds once it is up) is waited
    # for as a refused connection is, and said as one
    with pytest.raises(JobStoreStartError, match="cannot connect .*failed to resolve host"):
        PostgresJobStore("postgresql://postgres:pw@nosuchhost.invalid:5432/test")
    missing = with_schema(require_postgres(), f"missing_{uuid.uuid4().hex[:8]}")
    with pytest.raises(JobStoreStartError, match="CREATE SCHEMA"):
        PostgresJobStore(missing)
    # the reason in PostgreSQL's words (after the retries: a database an init job is about to
    # create may be there by then); a URL the client cannot read at once, no password shown
    with pytest.raises(JobStoreStartError, match='database "no_such_db" does not exist'):
        PostgresJobStore("postgresql://postgres@127.0.0.1:5432/no_such_db")
    for url, words in (
        ("postgresql://postgres@127.0.0.1:5432/test?sslmode=bogus", "invalid sslmode"),
        ("postgresql://u:p%zzsecret@127.0.0.1:5432/test", "cannot read the URL"),
    ):
        with pytest.raises(JobStoreStartError, match=words) as refused:
            PostgresJobStore(url)
        assert "secret" not in str(refused.value)
    # a short password is hidden where it stands, not wherever its letters are
    with pytest.raises(JobStoreStartError, match="cannot read the URL") as refused:
        PostgresJobStore("postgresql://u:p@[bad")
    assert "postgresql://u:***@[bad" in str(refused.value), refused.value
