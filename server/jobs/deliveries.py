"""The job store's other half: webhook deliveries and the values every process shares (the
webhook secret), in the same database and with SQL written once for both backends. Each backend
provides `transaction()`; rows come back as dicts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, cast

from server.exceptions import JobStoreUnavailable

logger = logging.getLogger(__name__)


# A delivery's next attempt this far off was never meant (no retry schedule is a year long):
# an earlier version stored a receiver's infinite Retry-After so, and the delivery hung.
NEVER_DUE_S = 400 * 86400.0


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


Execute = Callable[[str, tuple], Cursor]  # SQL with ? placeholders; rows are dicts


class DeliveryStore(ABC):
    skip_locked = ""  # appended to a SELECT that picks rows for one process only

    def __init__(self) -> None:
        self.last_counts: dict[str, dict[str, int]] = {}
        self.delivery_watchers: list[Callable[[], None]] = []

    def watch_deliveries(self, on_queued: Callable[[], None]) -> None:
        """Calls on_queued (from the thread that queued it) once a webhook delivery this
        process queued is committed: this process's sender starts it at once, rather than at
        its next poll (the poll finds other processes' deliveries and retries coming due)."""
        self.delivery_watchers.append(on_queued)

    def unwatch_deliveries(self, on_queued: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self.delivery_watchers.remove(on_queued)

    def deliveries_queued(self) -> None:
        """After the commit that queued them: a watcher's trouble (its event loop closed at
        shutdown) is not the caller's, whose job has ended all the same."""
        for watcher in list(self.delivery_watchers):
            try:
                watcher()
            except Exception:
                logger.debug("a delivery watcher failed", exc_info=True)

    @abstractmethod
    def transaction(self, write: bool = True) -> AbstractContextManager[Execute]:
        """One transaction; its statements go through the yielded function."""

    @abstractmethod
    def close(self) -> None: ...

    def now(self) -> float:
        return time.time()

    # Since when (time.monotonic()) the store has not answered, until a transaction goes
    # through again: /health and vlm_job_store_up say so (None: it answers).
    unreachable_since: float | None = None

    def answered(self, ok: bool) -> None:
        """A transaction's outcome (the subclasses' transaction tells): answered, or not."""
        if ok:
            self.unreachable_since = None
        elif self.unreachable_since is None:
            self.unreachable_since = time.monotonic()

    def count_deliveries_by_status(self) -> dict[str, int] | None:
        return self._count_by_status("deliveries")

    def _count_by_status(self, table: str) -> dict[str, int] | None:
        """For /metrics: while the store is unreachable, the last counts it gave (None: none
        yet), not asked again (a scrape waited out the connection timeout for each table;
        the job worker's polls find out when it is back)."""
        if self.unreachable_since is None:
            try:
                with self.transaction(write=False) as execute:
                    rows = execute(f"SELECT status, COUNT(*) AS n FROM {table} GROUP BY status", ())
                    counts = {row["status"]: row["n"] for row in rows.fetchall()}
                    self.last_counts[table] = counts
            except JobStoreUnavailable:
                pass
        return self.last_counts.get(table)

    def due_deliveries(self, limit: int = 16, hold_s: float = 0.0) -> list[dict[str, Any]]:
        """Pending deliveries whose time has come, held for hold_s: no other process starts
        the same attempt meanwhile (one that dies mid-attempt leaves it due again after).
        Each with its job's project."""
        now = self.now()
        # (a time past NEVER_DUE_S: an infinite Retry-After an earlier version stored, due now)
        due = "status = 'pending' AND (next_attempt_at <= ? OR next_attempt_at > ?)"
        with self.transaction(write=False) as execute:  # (idle, a read, not a write, a second)
            found = f"SELECT 1 FROM deliveries WHERE {due} LIMIT 1"
            if not execute(found, (now, now + NEVER_DUE_S)).fetchone():
                return []
        with self.transaction() as execute:
            rows = execute(
                "UPDATE deliveries SET next_attempt_at = ? WHERE id IN ("
                f" SELECT id FROM deliveries WHERE {due}"
                f" ORDER BY next_attempt_at LIMIT ?{self.skip_locked}) RETURNING *,"
                # (whose secret signs it, with --webhook-secret-per-project)
                " (SELECT project FROM jobs WHERE jobs.id = deliveries.job_id) AS project",
                (now + hold_s, now, now + NEVER_DUE_S, limit),
            ).fetchall()
        return [dict(row) for row in rows]

    def record_attempt(
        self,
        delivery_id: str,
        attempt: int,
        status: str,
        retry_in_s: float,
        last_status: int | None,
        last_error: str | None,
    ) -> bool:
        """Records attempt number `attempt` (1-based), the next one (pending) retry_in_s from
        now by the store's clock, which every replica's retries go by (the machines' own
        need not agree); False if that attempt was already recorded (a duplicate cannot move
        a delivered webhook back to pending)."""
        next_attempt_at = self.now() + retry_in_s if status == "pending" else 0.0
        with self.transaction() as execute:
            cursor = execute(
                "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?,"
                " last_status = ?, last_error = ? WHERE id = ? AND status = 'pending'"
                " AND attempts = ?",
                (status, attempt, next_attempt_at, last_status, last_error, delivery_id)
                + (attempt - 1,),
            )
            return cursor.rowcount == 1

    def redeliver(self, job_ids: list[str] | None = None, since: float | None = None) -> int:
        """Failed deliveries (their retries ran out) pending again, with a whole new schedule
        of retries: every one, those of `job_ids`, or those made at or after `since` (the
        store's clock). The same webhook-id: a receiver that got one after all can tell.
        Returns how many."""
        where, values = ["status = 'failed'"], [self.now()]
        if job_ids is not None:
            where.append(f"job_id IN ({', '.join('?' * len(job_ids))})" if job_ids else "0 = 1")
            values.extend(job_ids)
        if since is not None:
            where.append("created_at >= ?")
            values.append(since)
        with self.transaction() as execute:
            cursor = execute(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?"
                f" WHERE {' AND '.join(where)}",
                tuple(values),
            )
            return cursor.rowcount

    def deliveries_of(self, job_id: str) -> list[dict[str, Any]]:
        return self.deliveries_of_jobs([job_id])[job_id]

    def deliveries_of_jobs(self, job_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Each job's webhook deliveries, oldest first (a page of jobs in one query)."""
        found: dict[str, list[dict[str, Any]]] = {job_id: [] for job_id in job_ids}
        if not job_ids:
            return found
        marks = ", ".join("?" * len(job_ids))
        with self.transaction(write=False) as execute:
            rows = execute(
                "SELECT job_id, id, url, status, attempts, last_status, last_error,"
                f" next_attempt_at FROM deliveries WHERE job_id IN ({marks})"
                " ORDER BY created_at",
                tuple(job_ids),
            ).fetchall()
        for row in rows:
            delivery = dict(row)
            if delivery["status"] != "pending":  # a time only while one is coming
                delivery["next_attempt_at"] = None
            elif math.isfinite(when := delivery["next_attempt_at"]):  # (whole seconds, up)
                delivery["next_attempt_at"] = math.ceil(when)
            else:  # (an earlier version stored a receiver's infinite Retry-After)
                delivery["next_attempt_at"] = None
            found[delivery.pop("job_id")].append(delivery)
        return found

    # -- values every replica shares ------------------------------------------------------
    def shared_value(self, name: str, candidate: str) -> str:
        """The stored value of `name`; `candidate` becomes it if there is none yet (the first
        process to ask wins, every later one gets the same)."""
        with self.transaction() as execute:
            execute(
                "INSERT INTO shared_values (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (name, candidate),
            )
            value = _shared(execute, name)
        return cast(str, value)  # (inserted just before, if it was not there)

    def stored_value(self, name: str) -> str | None:
        """The stored value of `name`, if any (none is made)."""
        with self.transaction(write=False) as execute:
            return _shared(execute, name)

    def replace_shared_value(self, name: str, value: str) -> str | None:
        """Sets `name` to `value` for every process from now on; the value it had, if any."""
        with self.transaction() as execute:
            previous = _shared(execute, name)
            execute(
                "INSERT INTO shared_values (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )
        return previous


def _shared(execute: Execute, name: str) -> str | None:
    row = execute("SELECT value FROM shared_values WHERE name = ?", (name,)).fetchone()
    return None if row is None else row["value"]
