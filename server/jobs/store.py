"""The job store: one interface, two backends (sqlite.py, the embedded single-node default, and
postgres.py, shared by several replicas). The SQL below is written once for both.

A job is claimed with a lease, an attempt number and an owner; only the holder of the current
attempt may write its progress or result, so a stale worker (its lease expired and the job was
claimed again) can never overwrite a newer result. A job whose holder stops renewing is taken
over when its lease expires, by whichever process claims next (or at once when its holder is
provably gone: owner.py); never because another process started.
A finished job keeps its result but not its request (a base64 video can be hundreds of MB; a
hash of it still answers Idempotency-Key checks), and `prune` drops finished jobs after the
retention time. Connection trouble is JobStoreUnavailable (a 503 with Retry-After).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.exceptions import IdempotencyKeyReused, JobStoreUnavailable, JobStoreUnconfirmed
from server.jobs.conversations import ConversationStore
from server.jobs.deliveries import DeliveryStore, Execute
from server.jobs.files import FileStore, answers_as_files, drop_unread_held_files
from server.jobs.project import ALL, PROJECT_TABLES, VISIBLE, row_seen, scoped_key, seen_by
from server.jobs.responses import ResponseStore

# Every column but the request, which only the worker (at claim) needs.
SUMMARY = (
    "id, kind, status, progress, result, error, created_at, updated_at, attempt, owner,"
    " webhook_url, request_hash, description, project, takeovers"
)
# How long a job whose COMMIT went unanswered is looked up while the store comes back, and
# how often (JobStore._committed).
SETTLE_S = 5.0
SETTLE_RETRY_S = 0.5


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
    owner: str | None = None
    description: dict[str, Any] | None = None  # what a batch is (kept when its request is not)
    project: str = ALL  # whose it is (server/jobs/project.py)
    # How many of its attempts were cut short by their server stopping (their lease ran out
    # while running: a replica killed, crashed or cut off), not counting orderly releases.
    takeovers: int = 0

    def as_dict(self, root_path: str = "") -> dict[str, Any]:
        """The job as the status endpoint and webhooks show it (root_path: --root-path, the
        prefix its status_url is served under)."""
        return {
            "id": self.id,
            "object": "media.job",
            "kind": self.kind,
            "status": self.status,
            "progress": self.progress,
            "created_at": int(self.created_at),  # (whole seconds, as every other object's)
            "updated_at": int(self.updated_at),
            "status_url": f"{root_path}/v2/media/status/{self.id}",
            "result": self.result,
            "error": self.error,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any], request: dict[str, Any] | None = None) -> Job:
        if request is None:
            request = json.loads(row.get("request") or "{}")
        return cls(
            id=row["id"],
            kind=row["kind"],
            request=request,
            status=row["status"],
            progress=float(row["progress"]),
            result=json.loads(row["result"]) if row["result"] else None,
            error=json.loads(row["error"]) if row["error"] else None,
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            attempt=row["attempt"],
            owner=row.get("owner"),
            description=json.loads(row["description"]) if row.get("description") else None,
            project=row.get("project") or ALL,
            takeovers=row.get("takeovers") or 0,
        )


def request_digest(kind: str, request: dict[str, Any]) -> str:
    canonical = json.dumps([kind, request], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def open_job_store(url: str | None, data_dir: Path) -> JobStore:
    """--job-store: sqlite:///PATH or postgresql://...; none: DATA_DIR/jobs.sqlite3."""
    if not url:
        from server.jobs.sqlite import SqliteJobStore

        return SqliteJobStore(data_dir / "jobs.sqlite3")
    if url.startswith(("postgresql://", "postgres://")):
        from server.jobs.postgres import PostgresJobStore

        return PostgresJobStore(url)
    if url.startswith("sqlite:///"):
        from server.jobs.sqlite import SqliteJobStore

        return SqliteJobStore(Path(url.removeprefix("sqlite:///")))
    raise ValueError("--job-store must be sqlite:///PATH or postgresql://...")


class LeaseLost(Exception):
    """Inside a transaction: this attempt no longer holds the job (rolls the writes back)."""


class JobStore(DeliveryStore, FileStore, ResponseStore, ConversationStore):
    """Blocking calls: the async side calls them through asyncio.to_thread."""

    greatest = "MAX"  # the two-argument maximum
    # --root-path, set by the server: the prefix a webhook's status_url names.
    root_path = ""

    def watch(self, on_new_job: Callable[[], None]) -> None:
        """Calls on_new_job (from any thread) when another process queues a job. By default
        nothing does: the worker's polling finds it."""
        return None

    def _try_lock(self, execute: Execute, name: str) -> bool:
        """A lock held until the transaction ends, for work one process at a time does."""
        return True

    def _announce(self, execute: Execute) -> None:
        """Inside the transaction that queued a job: tell the other processes."""
        return None

    # -- jobs -----------------------------------------------------------------------------
    def create(
        self,
        kind: str,
        request: dict[str, Any],
        idempotency_key: str | None,
        id_prefix: str = "job-",
        description: dict[str, Any] | None = None,
        job_id: str | None = None,
        also: Callable[[Execute], None] | None = None,
        project: str = ALL,
    ) -> Job:
        """A new queued job of the project, or the project's existing one for the same
        idempotency key and request (the same key with another request: IdempotencyKeyReused).
        job_id: the new job's id, when the caller made it (a background response's is the
        response's); also: writes of the caller's in the transaction that queues a new job
        (the response it runs for)."""
        now, digest = self.now(), request_digest(kind, request)
        stored_key = scoped_key(project, idempotency_key)
        new_id, written = job_id or f"{id_prefix}{uuid.uuid4().hex}", False
        try:
            with self.transaction() as execute:
                row = _job_with_key(execute, stored_key)
                row = row or _shared_job_with_key(execute, project, idempotency_key, digest)
                if row is None:
                    row = execute(
                        "INSERT INTO jobs (id, kind, request, status, created_at, updated_at,"
                        " idempotency_key, request_hash, webhook_url, description, project)"
                        " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)"
                        f" ON CONFLICT (idempotency_key) DO NOTHING RETURNING {SUMMARY}",
                        (
                            new_id,
                            kind,
                            json.dumps(request),
                            now,
                            now,
                            stored_key,
                            digest,
                            request.get("webhook_url"),
                            json.dumps(description) if description is not None else None,
                            project,
                        ),
                    ).fetchone()
                    if row is not None:
                        if also is not None:
                            also(execute)
                        self._announce(execute)
                    else:  # another process took the key between the look-up and the insert
                        row = _job_with_key(execute, stored_key)
                if row["request_hash"] != digest:
                    raise IdempotencyKeyReused(idempotency_key or "")
                written = True  # (what is left is the COMMIT)
        except JobStoreUnavailable:
            if not written:
                raise  # nothing was done
            row = self._committed(new_id)
        return Job.from_row(row, request)

    def _committed(self, job_id: str) -> dict[str, Any]:
        """The row of a job whose COMMIT went unanswered (a connection lost as it was sent):
        it may have been written. Looked up while the store comes back (up to
        SETTLE_S): there, it was; not there, nothing was done (JobStoreUnavailable, a 503 its
        client can send again); no answer, JobStoreUnconfirmed (its client must look it up
        before sending again, or a second job would be made)."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            try:
                with self.transaction(write=False) as execute:
                    row = execute(f"SELECT {SUMMARY} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            except JobStoreUnavailable:
                if time.monotonic() >= deadline:
                    raise JobStoreUnconfirmed(job_id) from None
                time.sleep(SETTLE_RETRY_S)
                continue
            if row is None:
                raise JobStoreUnavailable()
            return row

    def get(self, job_id: str) -> Job | None:
        """The job without its request (which can be a whole video), whoever's it is (a route
        checks that its client's project sees `job.project`)."""
        with self.transaction(write=False) as execute:
            row = execute(f"SELECT {SUMMARY} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row, {}) if row is not None else None

    def count_by_status(self) -> dict[str, int] | None:
        return self._count_by_status("jobs")

    def keyed_tables(self) -> list[str]:
        """The tables holding objects an API key's project made: a server started without
        keys shows them to every client."""
        with self.transaction(write=False) as execute:
            return [
                table
                for table in PROJECT_TABLES
                # (`>`, not `<>`: jobs' and files' project index answers it)
                if execute(f"SELECT 1 FROM {table} WHERE project > '' LIMIT 1", ()).fetchone()
            ]

    def claim(self, lease_s: float, owner: str = "", kinds: tuple[str, ...] = ()) -> Job | None:
        """The oldest queued job (or one whose lease expired: a takeover) of these kinds (any:
        empty), as a new attempt by `owner`."""
        now = self.now()
        with self.transaction() as execute:
            row = execute(
                "UPDATE jobs SET status = 'processing', attempt = attempt + 1,"
                " takeovers = takeovers + CASE WHEN status = 'processing' THEN 1 ELSE 0 END,"
                " lease_until = ?, owner = ?, updated_at = ? WHERE id = ("
                "  SELECT id FROM jobs WHERE (status = 'queued'"
                f"  OR (status = 'processing' AND lease_until < ?)){_of_kind(kinds)}"
                f"  ORDER BY created_at LIMIT 1{self.skip_locked}) RETURNING *",
                (now + lease_s, owner, now, now, *kinds),
            ).fetchone()
        return Job.from_row(row) if row is not None else None

    def claimable(self, lanes: list[tuple[str, ...]]) -> list[bool]:
        """For each lane (job kinds; empty: any), whether a claim would find a job now: one
        read (each lane's query stops at its first job), so that idle workers need not each
        try a claim (a write) to find there is none."""
        now = self.now()
        with self.transaction(write=False) as execute:
            return [
                execute(
                    "SELECT 1 FROM jobs WHERE (status = 'queued'"
                    f" OR (status = 'processing' AND lease_until < ?)){_of_kind(kinds)} LIMIT 1",
                    (now, *kinds),
                ).fetchone()
                is not None
                for kinds in lanes
            ]

    def lease_owners(self) -> list[str]:
        """Who holds the leases of processing jobs now."""
        with self.transaction(write=False) as execute:
            rows = execute(
                "SELECT DISTINCT owner FROM jobs WHERE status = 'processing' AND owner IS NOT NULL",
                (),
            ).fetchall()
        return [row["owner"] for row in rows]

    def expire_leases(self, owner: str) -> int:
        """Ends the leases `owner` holds (it is known to be gone): its jobs can be claimed."""
        with self.transaction() as execute:
            cursor = execute(
                "UPDATE jobs SET lease_until = 0 WHERE status = 'processing' AND owner = ?",
                (owner,),
            )
            if cursor.rowcount:
                self._announce(execute)
            return cursor.rowcount

    def renew(self, job: Job, lease_s: float) -> bool:
        return self._update_if_current(job, "lease_until = ?", (self.now() + lease_s,))

    def set_progress(self, job: Job, progress: float) -> bool:
        """Progress only moves forward, also across attempts."""
        value = min(max(progress, 0.0), 1.0)
        return self._update_if_current(job, f"progress = {self.greatest}(progress, ?)", (value,))

    def release(self, job: Job) -> bool:
        """Back to the queue without a result (the engine stopped under it)."""
        return self._update_if_current(job, "status = 'queued', lease_until = 0", (), True)

    def set_partial_result(self, job: Job, result: dict[str, Any]) -> bool:
        """What a running job has done so far (a batch's request counts), in its result."""
        return self._update_if_current(job, "result = ?", (json.dumps(result),))

    def complete(self, job: Job, result: dict[str, Any]) -> bool:
        """The job's result; a batch's saved answers become its output and error files, each
        file's id in the result, in the same transaction (or none of it)."""
        assignments = "status = 'completed', progress = 1, result = ?"
        return self._finish(job, assignments, result, keep_answers=True)

    def fail(self, job: Job, error: dict[str, Any]) -> bool:
        return self._finish(job, "status = 'failed', error = ?", error)

    def _finish(
        self,
        job: Job,
        assignments: str,
        value: dict[str, Any],
        keep_answers: bool = False,
    ) -> bool:
        """The job's end and, when it has a webhook, its pending delivery: one transaction, so
        a crash cannot keep one without the other. The request is not needed any more."""
        try:
            with self.transaction() as execute:
                # The job's row first (as a cancel or a save takes it): no deadlock with them.
                if not execute(
                    "SELECT id FROM jobs WHERE id = ? AND attempt = ? AND status = 'processing'"
                    f"{self.for_update}",
                    (job.id, job.attempt),
                ).fetchone():
                    raise LeaseLost()
                files = answers_as_files(execute, job.id, self.now(), keep_answers)
                value = {**value, **{key: file_id for key, (file_id, _) in files.items()}}
                row = execute(
                    f"UPDATE jobs SET {assignments}, request = '{{}}', lease_until = 0,"
                    " updated_at = ? WHERE id = ? AND attempt = ? AND status = 'processing'"
                    f" RETURNING {SUMMARY}",
                    (json.dumps(value), self.now(), job.id, job.attempt),
                ).fetchone()
                if row is None:
                    raise LeaseLost()  # (its files are not kept either)
                queued = self._queue_webhook(execute, row)
                if row["kind"] == "batch":
                    drop_unread_held_files(execute)  # (its input, deleted while it ran)
        except LeaseLost:
            return False
        if queued:
            self.deliveries_queued()
        return True

    def cancel(self, job_id: str) -> Job | None:
        """A queued or processing job is cancelled (and its webhook's `media.cancelled`
        delivery queued in the same transaction); a job that has ended is left as it is.
        Returns the job as it now is, None when there is no such job."""
        with self.transaction() as execute:
            row = execute(
                "UPDATE jobs SET status = 'cancelled', lease_until = 0, request = '{}',"
                " updated_at = ? WHERE id = ? AND status IN ('queued', 'processing')"
                f" RETURNING {SUMMARY}",
                (self.now(), job_id),
            ).fetchone()
            queued = False
            if row is not None:
                self._keep_answers(execute, row)
                queued = self._queue_webhook(execute, row)
                if row["kind"] == "batch":
                    drop_unread_held_files(execute)
        if queued:
            self.deliveries_queued()
        return self.get(job_id)

    def _keep_answers(self, execute: Execute, cancelled: Mapping[str, Any]) -> None:
        """A cancelled batch keeps what it had answered, as files, and counts as many."""
        files = answers_as_files(execute, cancelled["id"], self.now(), keep=True)
        if not files:
            return
        result = json.loads(cancelled["result"] or "{}")
        result.update({key: file_id for key, (file_id, _) in files.items()})
        result["request_counts"] = {
            "total": result.get("request_counts", {}).get("total", 0),
            "completed": files.get("output_file_id", ("", 0))[1],
            "failed": files.get("error_file_id", ("", 0))[1],
        }
        execute("UPDATE jobs SET result = ? WHERE id = ?", (json.dumps(result), cancelled["id"]))

    def _queue_webhook(self, execute: Execute, ended: Mapping[str, Any]) -> bool:
        """Inside the transaction that ended the job: its delivery, if it has a webhook (True
        then)."""
        if not ended["webhook_url"]:
            return False
        event = f"media.{ended['status']}"  # media.completed | media.failed | media.cancelled
        now = self.now()
        # Standard Webhooks' payload: type, timestamp (of the event, ISO 8601) and data.
        when = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
        payload = json.dumps(
            {
                "type": event,
                "timestamp": when,
                "data": Job.from_row(ended, {}).as_dict(self.root_path),
            },
            separators=(",", ":"),
        )
        execute(
            "INSERT INTO deliveries (id, job_id, url, payload, status,"
            " next_attempt_at, created_at) VALUES (?, ?, ?, ?, 'pending', ?, ?)",
            (f"msg_{uuid.uuid4().hex}", ended["id"], ended["webhook_url"], payload, now, now),
        )
        return True

    def list(
        self,
        status: str | None,
        limit: int,
        after: str | None,
        kinds: tuple[str, ...] = (),
        project: str = ALL,
    ) -> tuple[list[Job], bool]:
        """The project's jobs, newest first, at most `limit`, after the job `after` (a cursor),
        of these kinds (all: empty); and whether more follow. Request bodies are left out
        (they can be videos)."""
        query = f"SELECT {SUMMARY} FROM jobs"
        where, values = [VISIBLE], [*seen_by(project)]
        if kinds:
            where.append(f"kind IN ({', '.join('?' * len(kinds))})")
            values.extend(kinds)
        if status is not None:
            where.append("status = ?")
            values.append(status)
        if after is not None:
            where.append("(created_at, id) < (SELECT created_at, id FROM jobs WHERE id = ?)")
            values.append(after)
        query += " WHERE " + " AND ".join(where)
        query += " ORDER BY created_at DESC, id DESC LIMIT ?"
        with self.transaction(write=False) as execute:
            if after is not None and not row_seen(execute, "jobs", after, project):
                raise KeyError(after)  # a stale cursor must not look like the end of the list
            rows = execute(query, (*values, limit + 1)).fetchall()
        return [Job.from_row(row, {}) for row in rows[:limit]], len(rows) > limit

    def prune(self, older_than_s: float) -> int:
        """Deletes finished jobs last updated before older_than_s ago, with their deliveries
        (a job with a delivery still pending is kept), batches' output files as old, and
        stored responses and conversations neither made nor used since. One process at a
        time does it."""
        cutoff = self.now() - older_than_s
        old = (
            "SELECT id FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')"
            " AND updated_at < ? AND id NOT IN"
            " (SELECT job_id FROM deliveries WHERE status = 'pending')"
        )
        with self.transaction() as execute:
            if not self._try_lock(execute, "prune"):
                return 0
            execute(f"DELETE FROM deliveries WHERE job_id IN ({old})", (cutoff,))
            execute(
                "DELETE FROM files WHERE purpose = 'batch_output' AND created_at < ?", (cutoff,)
            )
            drop_unread_held_files(execute)
            execute(  # (not a background response still queued or running)
                "DELETE FROM responses WHERE used_at < ? AND id NOT IN"
                " (SELECT id FROM jobs WHERE status IN ('queued', 'processing'))",
                (cutoff,),
            )
            execute(  # the events of responses gone (NOT EXISTS: an anti-join on PostgreSQL)
                "DELETE FROM response_events WHERE NOT EXISTS"
                " (SELECT 1 FROM responses r WHERE r.id = response_events.response_id)",
                (),
            )
            execute("DELETE FROM conversations WHERE used_at < ?", (cutoff,))
            execute(  # theirs, and any whose conversation is gone (NOT EXISTS, as above)
                "DELETE FROM conversation_items WHERE NOT EXISTS (SELECT 1 FROM conversations c"
                " WHERE c.id = conversation_items.conversation_id)",
                (),
            )
            execute(  # answers no running batch holds (a batch ended by an older server)
                "DELETE FROM batch_answers WHERE batch_id NOT IN"
                " (SELECT id FROM jobs WHERE status IN ('queued', 'processing'))",
                (),
            )
            return execute(f"DELETE FROM jobs WHERE id IN ({old})", (cutoff,)).rowcount

    def _update_if_current(
        self, job: Job, assignments: str, values: tuple, announce: bool = False
    ) -> bool:
        """Writes only while this attempt still holds the job."""
        with self.transaction() as execute:
            cursor = execute(
                f"UPDATE jobs SET {assignments}, updated_at = ?"
                " WHERE id = ? AND attempt = ? AND status = 'processing'",
                (*values, self.now(), job.id, job.attempt),
            )
            if announce and cursor.rowcount:
                self._announce(execute)
            return cursor.rowcount == 1


def _job_with_key(execute: Execute, idempotency_key: str | None) -> Any:
    if idempotency_key is None:
        return None
    return execute(
        f"SELECT {SUMMARY} FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
    ).fetchone()


def _shared_job_with_key(
    execute: Execute, project: str, idempotency_key: str | None, digest: str
) -> Any:
    """A job in ALL under the same key and request, which the project sees: one made before
    this server kept projects (or before it had API keys) was stored under the bare key, and
    the client's retry after the upgrade must find it, not make a second job. Another request
    under that key is the project's own (the key was never the project's)."""
    if project == ALL:
        return None
    row = _job_with_key(execute, scoped_key(ALL, idempotency_key))
    if row is None or row["project"] != ALL or row["request_hash"] != digest:
        return None
    return row


def _of_kind(kinds: tuple[str, ...]) -> str:
    """A claim's condition on the job's kind (none: any kind)."""
    return f" AND kind IN ({', '.join('?' * len(kinds))})" if kinds else ""
