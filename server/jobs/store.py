"""Durable jobs in SQLite (WAL, synchronous=FULL) under --data-dir.

A job is claimed with a lease and an attempt number; only the holder of the current attempt may
write its progress or result, so a stale worker (its lease expired and the job was claimed again)
can never overwrite a newer result. A server killed mid-job leaves it `processing`; on the next
start `recover` puts it back in the queue and it runs again. One server process per data dir.
A finished job keeps its result but not its request (a base64 video can be hundreds of MB; a
hash of it still answers Idempotency-Key checks), and `prune` drops finished jobs after the
retention time.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.exceptions import IdempotencyKeyReused

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


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    request: dict[str, Any]
    status: str
    progress: float
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: float
    updated_at: float
    attempt: int

    def as_dict(self) -> dict[str, Any]:
        """The job as the status endpoint and webhooks show it."""
        return {
            "id": self.id,
            "object": "media.job",
            "kind": self.kind,
            "status": self.status,
            "progress": self.progress,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "status_url": f"/v2/media/status/{self.id}",
            "result": self.result,
            "error": self.error,
        }

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"],
            kind=row["kind"],
            request=json.loads(row["request"]),
            status=row["status"],
            progress=row["progress"],
            result=json.loads(row["result"]) if row["result"] else None,
            error=json.loads(row["error"]) if row["error"] else None,
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            attempt=row["attempt"],
        )


def request_digest(kind: str, request: dict[str, Any]) -> str:
    canonical = json.dumps([kind, request], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class JobStore:
    """Blocking SQLite calls: the async side calls them through asyncio.to_thread."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._add_request_hashes()
        self.lock = threading.Lock()

    def _add_request_hashes(self) -> None:
        """A data dir from before the request_hash column: add it and fill it in."""
        columns = {row["name"] for row in self.db.execute("PRAGMA table_info(jobs)")}
        if "request_hash" in columns:
            return
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("ALTER TABLE jobs ADD COLUMN request_hash TEXT")
        for row in self.db.execute("SELECT id, kind, request FROM jobs").fetchall():
            digest = request_digest(row["kind"], json.loads(row["request"]))
            self.db.execute("UPDATE jobs SET request_hash = ? WHERE id = ?", (digest, row["id"]))
        self.db.execute("COMMIT")

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def create(self, kind: str, request: dict[str, Any], idempotency_key: str | None) -> Job:
        """A new queued job, or the existing one for the same idempotency key and request (the
        same key with another request: IdempotencyKeyReused)."""
        now = time.time()
        digest = request_digest(kind, request)
        row = None
        with self.lock:
            if idempotency_key is not None:
                row = self.db.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None and row["request_hash"] != digest:
                    raise IdempotencyKeyReused(idempotency_key)
            if row is None:
                job_id = f"job-{uuid.uuid4().hex}"
                self.db.execute(
                    "INSERT INTO jobs (id, kind, request, status, created_at, updated_at,"
                    " idempotency_key, request_hash) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                    (job_id, kind, json.dumps(request), now, now, idempotency_key, digest),
                )
                row = self._row(job_id)
        return Job.from_row(row)  # parsing a big request need not hold the lock

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            row = self._row(job_id)
        return Job.from_row(row) if row is not None else None

    def count_by_status(self) -> dict[str, int]:
        return self._count_by_status("jobs")

    def count_deliveries_by_status(self) -> dict[str, int]:
        return self._count_by_status("deliveries")

    def _count_by_status(self, table: str) -> dict[str, int]:
        with self.lock:
            rows = self.db.execute(f"SELECT status, COUNT(*) FROM {table} GROUP BY status")
            return {status: count for status, count in rows.fetchall()}

    def recover(self) -> int:
        """At start: jobs a killed server left `processing` go back to the queue."""
        with self.lock:
            cursor = self.db.execute(
                "UPDATE jobs SET status = 'queued', lease_until = 0, updated_at = ?"
                " WHERE status = 'processing'",
                (time.time(),),
            )
            return cursor.rowcount

    def claim(self, lease_s: float) -> Job | None:
        """The oldest queued job (or one whose lease expired), as a new attempt."""
        now = time.time()
        with self.lock:
            row = self.db.execute(
                "UPDATE jobs SET status = 'processing', attempt = attempt + 1,"
                " lease_until = ?, updated_at = ? WHERE id = ("
                "  SELECT id FROM jobs WHERE status = 'queued'"
                "  OR (status = 'processing' AND lease_until < ?)"
                "  ORDER BY created_at LIMIT 1) RETURNING *",
                (now + lease_s, now, now),
            ).fetchone()
        return Job.from_row(row) if row is not None else None

    def renew(self, job: Job, lease_s: float) -> bool:
        return self._update_if_current(job, "lease_until = ?", (time.time() + lease_s,))

    def set_progress(self, job: Job, progress: float) -> bool:
        """Progress only moves forward, also across attempts."""
        value = min(max(progress, 0.0), 1.0)
        return self._update_if_current(job, "progress = MAX(progress, ?)", (value,))

    def release(self, job: Job) -> bool:
        """Back to the queue without a result (the engine stopped under it)."""
        return self._update_if_current(job, "status = 'queued', lease_until = 0", ())

    def complete(self, job: Job, result: dict[str, Any]) -> bool:
        return self._finish(job, "status = 'completed', progress = 1, result = ?", result)

    def fail(self, job: Job, error: dict[str, Any]) -> bool:
        return self._finish(job, "status = 'failed', error = ?", error)

    def _finish(self, job: Job, assignments: str, value: dict[str, Any]) -> bool:
        """The job's end and, when it has a webhook, its pending delivery: one transaction, so
        a crash cannot keep one without the other."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self.db.execute(
                    f"UPDATE jobs SET {assignments}, updated_at = ?"
                    " WHERE id = ? AND attempt = ? AND status = 'processing'",
                    (json.dumps(value), time.time(), job.id, job.attempt),
                )
                done = cursor.rowcount == 1
                if done:  # the request (maybe a base64 video) is not needed any more
                    self.db.execute("UPDATE jobs SET request = '{}' WHERE id = ?", (job.id,))
                if done:
                    self._queue_webhook(job)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return done

    def cancel(self, job_id: str) -> Job | None:
        """A queued or processing job is cancelled (and its webhook's `media.cancelled`
        delivery queued in the same transaction); a job that has ended is left as it is.
        Returns the job as it now is, None when there is no such job."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self._row(job_id)
                if row is not None and row["status"] in ("queued", "processing"):
                    job = Job.from_row(row)
                    self.db.execute(
                        "UPDATE jobs SET status = 'cancelled', lease_until = 0, request = '{}',"
                        " updated_at = ? WHERE id = ?",
                        (time.time(), job_id),
                    )
                    self._queue_webhook(job)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return self.get(job_id)

    def _queue_webhook(self, job: Job) -> None:
        """Inside the transaction that ended the job: its delivery, if it has a webhook."""
        url = job.request.get("webhook_url")
        if not url:
            return
        ended = Job.from_row(self._row(job.id))
        event = f"media.{ended.status}"  # media.completed | media.failed | media.cancelled
        payload = json.dumps({"type": event, "data": ended.as_dict()})
        self.db.execute(
            "INSERT INTO deliveries (id, job_id, url, payload, status,"
            " next_attempt_at, created_at) VALUES (?, ?, ?, ?, 'pending', ?, ?)",
            (f"msg_{uuid.uuid4().hex}", job.id, url, payload, time.time(), time.time()),
        )

    def list(self, status: str | None, limit: int, after: str | None) -> tuple[list[Job], bool]:
        """Newest first, at most `limit`, after the job `after` (a cursor); and whether more
        follow. Request bodies are left out (they can be whole videos)."""
        columns = "id, kind, '{}' AS request, status, progress, result, error, created_at,"
        query = f"SELECT {columns} updated_at, attempt FROM jobs"
        where, values = [], []
        if status is not None:
            where.append("status = ?")
            values.append(status)
        if after is not None:
            where.append("(created_at, id) < (SELECT created_at, id FROM jobs WHERE id = ?)")
            values.append(after)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY created_at DESC, id DESC LIMIT ?"
        with self.lock:
            if after is not None and self._row(after) is None:
                raise KeyError(after)  # a stale cursor must not look like the end of the list
            rows = self.db.execute(query, (*values, limit + 1)).fetchall()
        return [Job.from_row(row) for row in rows[:limit]], len(rows) > limit

    def prune(self, older_than_s: float) -> int:
        """Deletes finished jobs last updated before older_than_s ago, with their deliveries;
        a job with a delivery still pending is kept."""
        cutoff = time.time() - older_than_s
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                old = (
                    "SELECT id FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')"
                    " AND updated_at < ? AND id NOT IN"
                    " (SELECT job_id FROM deliveries WHERE status = 'pending')"
                )
                self.db.execute(f"DELETE FROM deliveries WHERE job_id IN ({old})", (cutoff,))
                cursor = self.db.execute(f"DELETE FROM jobs WHERE id IN ({old})", (cutoff,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return cursor.rowcount

    # -- webhook deliveries ---------------------------------------------------------------
    def due_deliveries(self, limit: int = 16) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(
                "SELECT * FROM deliveries WHERE status = 'pending' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at LIMIT ?",
                (time.time(), limit),
            ).fetchall()

    def record_attempt(
        self,
        delivery_id: str,
        attempt: int,
        status: str,
        next_attempt_at: float,
        last_status: int | None,
        last_error: str | None,
    ) -> bool:
        """Records attempt number `attempt` (1-based); False if that attempt was already
        recorded (a duplicate cannot move a delivered webhook back to pending)."""
        with self.lock:
            cursor = self.db.execute(
                "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?,"
                " last_status = ?, last_error = ? WHERE id = ? AND status = 'pending'"
                " AND attempts = ?",
                (
                    status,
                    attempt,
                    next_attempt_at,
                    last_status,
                    last_error,
                    delivery_id,
                    attempt - 1,
                ),
            )
            return cursor.rowcount == 1

    def deliveries_of(self, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.db.execute(
                "SELECT id, url, status, attempts, last_status, last_error, next_attempt_at"
                " FROM deliveries WHERE job_id = ? ORDER BY created_at",
                (job_id,),
            ).fetchall()
        deliveries = [dict(row) for row in rows]
        for delivery in deliveries:  # a time only while one is coming
            if delivery["status"] != "pending":
                delivery["next_attempt_at"] = None
        return deliveries

    def _update_if_current(self, job: Job, assignments: str, values: tuple) -> bool:
        """Writes only while this attempt still holds the job."""
        with self.lock:
            cursor = self.db.execute(
                f"UPDATE jobs SET {assignments}, updated_at = ?"
                " WHERE id = ? AND attempt = ? AND status = 'processing'",
                (*values, time.time(), job.id, job.attempt),
            )
            return cursor.rowcount == 1

    def _row(self, job_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
