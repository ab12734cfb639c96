"""The embedded job store: one SQLite file (WAL, synchronous=FULL) under --data-dir, for one
machine. Several processes may open it (a second server started by mistake on the same data
dir): writes take SQLite's write lock, and a job is only taken over when its lease expired.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.exceptions import JobStoreStartError, JobStoreUnavailable
from server.jobs.project import PROJECT_TABLES
from server.jobs.store import Execute, JobStore, request_digest

BUSY_TIMEOUT_S = 10.0  # another process's write transaction is waited for, this long

# Version 1: the schema before versioning (CREATE IF NOT EXISTS: an old data dir is version 0).
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    request TEXT NOT NULL,
    status TEXT NOT NULL,            -- queued | processing | completed | failed | cancelled
    progress REAL NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT                -- sha256 of kind + request: idempotency survives slimming
);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,             -- the webhook-id: the same on every retry
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    payload TEXT NOT NULL,           -- the exact body, so retries send the same bytes
    status TEXT NOT NULL,            -- pending | delivered | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_of_job ON deliveries (job_id)
"""

# Version 2: who holds a lease, the webhook URL beside the request, values shared by processes.
SCHEMA_2 = """
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN webhook_url TEXT;
CREATE TABLE shared_values (name TEXT PRIMARY KEY, value TEXT NOT NULL)
"""

# Version 3: files (the Files API's, for batches), and what a batch is, readable while it runs
# and after (its request is dropped when it ends).
SCHEMA_3 = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    purpose TEXT NOT NULL,           -- batch (uploaded) | batch_output (a batch's results)
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    content BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_time ON files (created_at, id)
"""

# Version 4: a running batch's answers, saved as they come.
SCHEMA_4 = """
CREATE TABLE IF NOT EXISTS batch_answers (  -- a running batch's answers so far: a batch taken
    batch_id TEXT NOT NULL,                 -- over goes on from them, and its end turns them
    line INTEGER NOT NULL,                  -- into its output and error files
    status INTEGER NOT NULL,
    entry TEXT NOT NULL,
    PRIMARY KEY (batch_id, line)
)
"""

# Version 5: the Responses API's stored responses (server/jobs/responses.py) and
# conversations (server/jobs/conversations.py).
SCHEMA_5 = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    previous_response_id TEXT,       -- the conversation's response before it
    created_at REAL NOT NULL,
    used_at REAL NOT NULL,           -- made, or continued by a later turn (retention)
    input TEXT NOT NULL,             -- JSON: the input items its request added
    response TEXT NOT NULL           -- JSON: the response object
);
CREATE INDEX IF NOT EXISTS responses_by_use ON responses (used_at);
CREATE TABLE IF NOT EXISTS conversations (  -- the Conversations API's (jobs/conversations.py)
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    used_at REAL NOT NULL,
    metadata TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS conversation_items (
    conversation_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    id TEXT NOT NULL,
    item TEXT NOT NULL,              -- JSON: the item
    PRIMARY KEY (conversation_id, position)
);
CREATE INDEX IF NOT EXISTS conversations_by_use ON conversations (used_at)
"""
# Version 6: the events of background responses that stream (read by GET ...?stream=true).
SCHEMA_6 = """
CREATE TABLE IF NOT EXISTS response_events (
    response_id TEXT NOT NULL,
    sequence_number INTEGER NOT NULL,
    attempt INTEGER NOT NULL,        -- the job attempt that wrote it (a new one starts over)
    event TEXT NOT NULL,             -- the server-sent event, as sent
    PRIMARY KEY (response_id, sequence_number)
)
"""
# Version 7: whose each job, file, response and conversation is (server/jobs/project.py;
# '': every project's, as everything was before).
PROJECT_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_project ON jobs (project, created_at);
CREATE INDEX IF NOT EXISTS files_by_project ON files (project, created_at)
"""
logger = logging.getLogger(__name__)

SCHEMA_VERSION = 8  # (version 8: jobs' takeovers, Job.takeovers)


def _dict_row(cursor: sqlite3.Cursor, values: tuple) -> dict:
    return {column[0]: value for column, value in zip(cursor.description, values, strict=True)}


def _owner_only(path: Path) -> None:
    """The database (every project's prompts, answers, files, and the webhook secret) readable
    by the server's user alone: made 0600 before SQLite opens it, which gives its WAL and
    shared-memory files the same mode; one an older version made 0644 is narrowed."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    except OSError:  # (not ours to open: SQLite says why, as the store's error)
        return
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if name.stat().st_mode & 0o077:
                name.chmod(0o600)
                logger.warning(
                    "%s was readable by others: made 0600 (the server's user only)", name
                )
        except OSError:  # (absent, or not ours to change: left as it is)
            pass


# The write-ahead log is cut back to this after a checkpoint (a burst of large requests left it
# at 133 MB for good).
WAL_KEPT_BYTES = 64 * 1024 * 1024
INCREMENTAL = 2  # PRAGMA auto_vacuum's value
# Freed pages given back to the disk at a time: each step's moved pages pass through the WAL,
# checkpointed between steps, so giving back 600 MB never needs 600 MB more disk (nor holds
# the store's lock that long).
GIVE_BACK_PAGES = 2048


_SAID_KEEPS_SIZE: set[Path] = set()  # the files _freed_pages_returned has logged


def _freed_pages_returned(db: sqlite3.Connection, path: Path) -> bool:
    """A new file lets pages freed (rows pruned, a finished job's request dropped) go back to
    the disk (prune does it): a burst of large async requests grew the file to 1.4 GB, 99.8 %
    free, and it never shrank. A file an older version made keeps that: switching it is a
    rebuild (VACUUM) that needs its size again in free disk and holds off every other server
    using it for as long, which an operator does with the servers stopped (DEPLOYMENT.md)."""
    if db.execute("PRAGMA auto_vacuum").fetchone()["auto_vacuum"] == INCREMENTAL:
        return True
    if db.execute("SELECT count(*) AS n FROM sqlite_master").fetchone()["n"]:
        if path in _SAID_KEEPS_SIZE:  # (opened twice at start: checked, then served)
            return False
        _SAID_KEEPS_SIZE.add(path)
        logger.info(
            "%s keeps its largest size after deletes (made by an older version): with the "
            "servers stopped, %s lets it shrink (docs/DEPLOYMENT.md)",
            path,
            f"python3 -c \"import sqlite3; sqlite3.connect('{path}').executescript("
            f"'PRAGMA auto_vacuum=INCREMENTAL; VACUUM;')\"",
        )
        return False
    db.execute(f"PRAGMA auto_vacuum={INCREMENTAL}")  # (a new file: before any table)
    return True


class SqliteJobStore(JobStore):
    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.lock = threading.Lock()  # one connection, shared by threads
        self.closed = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _owner_only(path)
            self.db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S
            )
        except (sqlite3.OperationalError, OSError) as exc:  # a directory, a read-only disk
            reason = getattr(exc, "strerror", None) or str(exc)
            raise JobStoreStartError(
                f"--job-store: cannot use the SQLite database {path}: {reason} (it must be "
                "a file the server can create or write, in a writable directory)"
            ) from exc
        try:
            self.db.row_factory = _dict_row
            self.gives_back = _freed_pages_returned(self.db, path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA journal_size_limit={WAL_KEPT_BYTES}")
            self.db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.DatabaseError as exc:  # not SQLite, or damaged (its words say which)
            self.db.close()
            raise JobStoreStartError(
                f"--job-store: cannot use the SQLite database {path}: {exc}"
            ) from exc
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        with self.lock:
            self.closed = True  # (a prune's give-back still in its thread stops at its next step)
            self.db.close()

    def prune(self, older_than_s: float) -> int:
        """(and the pages freed since, a finished job's request among them, go back to the
        disk: without it the file kept its largest size for good)"""
        pruned = super().prune(older_than_s)
        self._give_back_freed_pages()
        return pruned

    def _give_back_freed_pages(self) -> None:
        """A few pages at a time, the lock let go between steps; a disk too full for the
        step's WAL stops it until the next prune (the pages stay free for new rows)."""
        if not self.gives_back:
            return  # (an older file: nothing to give back this way)
        while True:
            with self.lock:
                if self.closed:
                    return
                free = self._free_pages()
                if not free:
                    return
                try:  # (a script: stepped to its end, every page of the step)
                    self.db.executescript(f"PRAGMA incremental_vacuum({GIVE_BACK_PAGES});")
                    self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.OperationalError as exc:
                    logger.warning("%s: freed pages not given back to the disk: %s", self.path, exc)
                    return
                if self._free_pages() >= free:
                    return  # (none went: another process's transaction, say)

    def _free_pages(self) -> int:
        return self.db.execute("PRAGMA freelist_count").fetchone()["freelist_count"]

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Execute]:
        """BEGIN IMMEDIATE for writes: the write lock from the start, so two processes never
        both read a row as claimable and then both claim it."""
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.OperationalError as exc:  # locked past the busy timeout, disk gone
                self.answered(_busy(exc))
                raise JobStoreUnavailable() from exc
            try:
                yield self.db.execute
                self.db.execute("COMMIT")
            except BaseException as exc:
                self.db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    self.answered(_busy(exc))
                    raise JobStoreUnavailable() from exc
                raise
            self.answered(True)

    def _migrate(self) -> None:
        with self.transaction() as execute:
            version = execute("PRAGMA user_version", ()).fetchone()["user_version"]
            if version < 1:
                for statement in SCHEMA.split(";"):
                    execute(statement, ())
                _add_request_hashes(execute)
            if version < 2:
                for statement in SCHEMA_2.split(";"):
                    execute(statement, ())
                _fill_webhook_urls(execute)
            if version > SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path} was written by a newer version of this server (job store "
                    f"schema {version}; this one reads up to {SCHEMA_VERSION})"
                )
            if version < 3:
                # (idempotent: a data dir migrated, then opened by an older server that set
                # the version back, and migrated again)
                if not _has_column(execute, "jobs", "description"):
                    execute("ALTER TABLE jobs ADD COLUMN description TEXT", ())
                for statement in SCHEMA_3.split(";"):
                    execute(statement, ())
            if version < 4:
                for statement in SCHEMA_4.split(";"):
                    execute(statement, ())
            if version < 5:
                for statement in SCHEMA_5.split(";"):
                    execute(statement, ())
            if version < 6:
                for statement in SCHEMA_6.split(";"):
                    execute(statement, ())
            if version < 7:
                for table in PROJECT_TABLES:
                    if not _has_column(execute, table, "project"):
                        execute(
                            f"ALTER TABLE {table} ADD COLUMN project TEXT NOT NULL DEFAULT ''", ()
                        )
                for statement in PROJECT_INDEXES.split(";"):
                    execute(statement, ())
            if version < 8 and not _has_column(execute, "jobs", "takeovers"):
                execute("ALTER TABLE jobs ADD COLUMN takeovers INTEGER NOT NULL DEFAULT 0", ())
            if version < SCHEMA_VERSION:
                execute(f"PRAGMA user_version = {SCHEMA_VERSION}", ())


def _has_column(execute: Execute, table: str, column: str) -> bool:
    return any(row["name"] == column for row in execute(f"PRAGMA table_info({table})", ()))


def _add_request_hashes(execute: Execute) -> None:
    """A data dir from before the request_hash column: add it and fill it in."""
    columns = {row["name"] for row in execute("PRAGMA table_info(jobs)", ()).fetchall()}
    if "request_hash" in columns:
        return
    execute("ALTER TABLE jobs ADD COLUMN request_hash TEXT", ())
    for row in execute("SELECT id, kind, request FROM jobs", ()).fetchall():
        digest = request_digest(row["kind"], json.loads(row["request"]))
        execute("UPDATE jobs SET request_hash = ? WHERE id = ?", (digest, row["id"]))


def _fill_webhook_urls(execute: Execute) -> None:
    """Unfinished jobs from before the webhook_url column (finished ones have no request)."""
    rows = execute(
        "SELECT id, request FROM jobs WHERE status IN ('queued', 'processing')", ()
    ).fetchall()
    for row in rows:
        url = json.loads(row["request"]).get("webhook_url")
        if url:
            execute("UPDATE jobs SET webhook_url = ? WHERE id = ?", (url, row["id"]))


def _busy(exc: sqlite3.OperationalError) -> bool:
    """A write lock another process held past the busy timeout: the file answers, busy (not
    unreachable for /health); anything else (the disk gone, the file unreadable) is not."""
    return "locked" in str(exc)
