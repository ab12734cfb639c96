"""Stored answers of the Responses API (`store`, OpenAI's default): a response is kept with its
own input items, so a later request names it as `previous_response_id` instead of sending the
conversation again, and `GET /v1/responses/{id}` reads it back. Each row holds only what its
request added; a conversation is its chain of rows, read back by following
previous_response_id (one recursive query). In the job store's database, so every replica
sharing a PostgreSQL store continues every conversation. A conversation is kept while it is
used: a row is deleted --job-retention-hours after it was made or last continued (a new turn
renews the turns before it, at most once an hour each).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.jobs.conversations import append_items
from server.jobs.deliveries import Execute
from server.jobs.project import ALL, VISIBLE, seen_by, visible
from server.jobs.tables import Tables

# The most turns a conversation read back may have (a guard against runaway chains).
MAX_CHAIN = 10_000
# A turn is renewed when a later one is saved, if it was not renewed for this long.
RENEW_AFTER_S = 3600.0
# A stored response's statuses while it may still change (a background run, a stream).
RUNNING = ("queued", "in_progress")
# A stream renews its row's used_at every STREAM_LEASE_S / 4 while it runs: one older than
# STREAM_LEASE_S is a stream whose server stopped (crashed, killed) before writing its end.
STREAM_LEASE_S = 120.0
# The rows of the conversation that ends with a response (?: its id, ?: MAX_CHAIN - 1),
# newest first; a project's (?, ?: seen_by(project) twice): a turn it does not see breaks
# the chain there.
CHAIN = (
    "WITH RECURSIVE chain (id, previous_response_id, depth) AS ("
    f" SELECT id, previous_response_id, 0 FROM responses WHERE id = ? AND {VISIBLE}"
    " UNION ALL"
    " SELECT r.id, r.previous_response_id, c.depth + 1"
    " FROM responses r JOIN chain c ON r.id = c.previous_response_id"
    f" WHERE c.depth < ? AND {visible('r.')})"
)


def chain_values(response_id: str, project: str) -> tuple:
    """CHAIN's values."""
    return (response_id, *seen_by(project), MAX_CHAIN - 1, *seen_by(project))


@dataclass(frozen=True)
class StoredTurn:
    """One stored response: the input items its request added, and the response (its
    output items included)."""

    input: list[dict[str, Any]]
    response: dict[str, Any]
    used_at: float  # made, continued, or (a stream) renewed while it runs


@dataclass(frozen=True)
class StoredEvents:
    """What a client following a background response's events reads at each look."""

    events: list[tuple[int, int, str]]  # (sequence number, job attempt, event text), in order
    status: str | None  # the response's status (None: it is not stored)
    last_number: int  # of the last event stored (-1: none)
    last_event: str  # its text
    attempt_at: int | None  # the attempt whose event bears the number asked after (None: none)


class BrokenChain(Exception):
    """A conversation's response is not stored (never was, deleted, or past retention)."""

    def __init__(self, response_id: str):
        super().__init__(response_id)
        self.response_id = response_id


class ConversationTooLong(Exception):
    """A conversation of more than MAX_CHAIN turns."""


class ResponseStore(Tables):
    """A response is its project's (server/jobs/project.py): another project's is not found,
    nor continued."""

    def save_response(
        self, response: dict[str, Any], input_items: list[dict[str, Any]], project: str
    ) -> None:
        with self.transaction() as execute:
            insert_response(execute, self.now(), response, input_items, project)

    def get_response(self, response_id: str, project: str) -> StoredTurn | None:
        with self.transaction(write=False) as execute:
            row = execute(
                f"SELECT input, response, used_at FROM responses WHERE id = ? AND {VISIBLE}",
                (response_id, *seen_by(project)),
            ).fetchone()
        return _turn(row) if row is not None else None

    def renew_response(self, response_id: str) -> None:
        """A stream's row marked as still running (its lease: STREAM_LEASE_S)."""
        with self.transaction() as execute:
            execute("UPDATE responses SET used_at = ? WHERE id = ?", (self.now(), response_id))

    def conversation(self, response_id: str, project: str, whole: bool = True) -> list[StoredTurn]:
        """The turns of the conversation that ends with this response, oldest first. Raises
        BrokenChain naming the newest of its responses that is not stored, or not the
        project's (whole=False: the turns after it), ConversationTooLong past MAX_CHAIN."""
        query = (
            f"{CHAIN} SELECT c.previous_response_id, r.input, r.response, r.used_at"
            " FROM chain c JOIN responses r ON r.id = c.id ORDER BY c.depth DESC"
        )
        with self.transaction(write=False) as execute:
            rows = execute(query, chain_values(response_id, project)).fetchall()
        if not rows:
            raise BrokenChain(response_id)
        oldest = rows[0]["previous_response_id"]
        if oldest is not None and len(rows) == MAX_CHAIN:
            raise ConversationTooLong()
        if oldest is not None and whole:
            raise BrokenChain(oldest)
        return [_turn(row) for row in rows]

    def update_response(
        self,
        response: dict[str, Any],
        conversation: tuple[str, list[dict[str, Any]]] | None = None,
        attempt: int | None = None,
        events: list[tuple[int, str]] | None = None,
        unused_since: float | None = None,
    ) -> bool:
        """A running response's new state, written only while it is still running (never
        over a cancel, nor after a delete) and, with `attempt`, while that attempt of its job
        still holds the job (a stale attempt never writes over a newer one's run). With
        `conversation` (its id, items), those items are added to it in the same transaction
        (a conversation gone meanwhile takes none); `events`: a stream's last (add_events);
        `unused_since`: only if the row was not used (a stream's renewal) since then."""
        with self.transaction() as execute:
            if not self._still_running(execute, response["id"], attempt, unused_since):
                return False
            insert_events(execute, response["id"], attempt or 0, events or [])
            execute(
                "UPDATE responses SET response = ? WHERE id = ?",
                (json.dumps(response, ensure_ascii=False), response["id"]),
            )
            if conversation is not None:  # (the request's own: checked when it started)
                append_items(execute, *conversation, self.now(), self.for_update, ALL)
            return True

    def delete_response(self, response_id: str, project: str) -> bool:
        with self.transaction() as execute:
            cursor = execute(
                f"DELETE FROM responses WHERE id = ? AND {VISIBLE}",
                (response_id, *seen_by(project)),
            )
            if cursor.rowcount != 1:
                return False
            execute("DELETE FROM response_events WHERE response_id = ?", (response_id,))
            return True

    def add_events(self, response_id: str, attempt: int, events: list[tuple[int, str]]) -> bool:
        """A streaming background response's next events, (sequence number, event text),
        written while it runs and this attempt of its job holds the job."""
        with self.transaction() as execute:
            if not self._still_running(execute, response_id, attempt):
                return False
            insert_events(execute, response_id, attempt, events)
            return True

    def start_events(self, response_id: str, attempt: int, event: Callable[[int], str]) -> int:
        """An attempt's first event (`event(its number)`), numbered after every event stored
        so far (numbers keep rising when a run starts over, so a client following an earlier
        attempt sees the change at once); the earlier attempts' own events go (the events
        made when it was queued, attempt 0, stay). Returns the next number, -1 when the
        response is no longer running or this attempt does not hold its job."""
        with self.transaction() as execute:
            if not self._still_running(execute, response_id, attempt):
                return -1
            row = execute(
                "SELECT MAX(sequence_number) AS last FROM response_events WHERE response_id = ?",
                (response_id,),
            ).fetchone()
            number = -1 if row is None or row["last"] is None else row["last"]
            execute(
                "DELETE FROM response_events WHERE response_id = ? AND attempt > 0",
                (response_id,),
            )
            insert_events(execute, response_id, attempt, [(number + 1, event(number + 1))])
            return number + 2

    def events_after(self, response_id: str, after: int) -> StoredEvents:
        """A background response's events numbered after `after`, and what a client
        following them needs to know besides (StoredEvents)."""
        with self.transaction(write=False) as execute:
            row = execute("SELECT response FROM responses WHERE id = ?", (response_id,)).fetchone()
            rows = execute(
                "SELECT sequence_number, attempt, event FROM response_events"
                " WHERE response_id = ? AND sequence_number > ? ORDER BY sequence_number",
                (response_id, after),
            ).fetchall()
            last = execute(
                "SELECT sequence_number, event FROM response_events WHERE response_id = ?"
                " ORDER BY sequence_number DESC LIMIT 1",
                (response_id,),
            ).fetchone()
            at = execute(
                "SELECT attempt FROM response_events WHERE response_id = ? AND sequence_number = ?",
                (response_id, after),
            ).fetchone()
        return StoredEvents(
            events=[(r["sequence_number"], r["attempt"], r["event"]) for r in rows],
            status=json.loads(row["response"])["status"] if row is not None else None,
            last_number=last["sequence_number"] if last is not None else -1,
            last_event=last["event"] if last is not None else "",
            attempt_at=at["attempt"] if at is not None else None,
        )

    def _still_running(
        self,
        execute: Execute,
        response_id: str,
        attempt: int | None,
        unused_since: float | None = None,
    ) -> bool:
        """Its row is running (locked till the transaction ends), with `attempt` that
        attempt of its job still holds the job, with `unused_since` it was not used since."""
        row = execute(
            f"SELECT response, used_at FROM responses WHERE id = ?{self.for_update}",
            (response_id,),
        ).fetchone()
        if row is None or json.loads(row["response"])["status"] not in RUNNING:
            return False
        if unused_since is not None and row["used_at"] >= unused_since:
            return False
        return attempt is None or _holds(execute, response_id, attempt)


def insert_response(
    execute: Execute,
    now: float,
    response: dict[str, Any],
    input_items: list[dict[str, Any]],
    project: str,
) -> None:
    """A new turn of the project. The conversation before it is renewed (kept as long as it
    is used), the turns not renewed for RENEW_AFTER_S only: a long conversation's turns are
    not all rewritten at every new one."""
    previous = response.get("previous_response_id")
    execute(
        "INSERT INTO responses"
        " (id, previous_response_id, created_at, used_at, input, response, project)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            response["id"],
            previous,
            now,
            now,
            json.dumps(input_items, ensure_ascii=False),
            json.dumps(response, ensure_ascii=False),
            project,
        ),
    )
    if previous is not None:
        execute(
            f"{CHAIN} UPDATE responses SET used_at = ?"
            " WHERE id IN (SELECT id FROM chain) AND used_at < ?",
            (*chain_values(previous, project), now, now - RENEW_AFTER_S),
        )


def insert_events(
    execute: Execute, response_id: str, attempt: int, events: list[tuple[int, str]]
) -> None:
    for number, event in events:
        execute(
            "INSERT INTO response_events (response_id, sequence_number, attempt, event)"
            " VALUES (?, ?, ?, ?)",
            (response_id, number, attempt, event),
        )


def _holds(execute: Execute, job_id: str, attempt: int) -> bool:
    row = execute(
        "SELECT id FROM jobs WHERE id = ? AND attempt = ? AND status = 'processing'",
        (job_id, attempt),
    ).fetchone()
    return row is not None


def _turn(row: Any) -> StoredTurn:
    return StoredTurn(json.loads(row["input"]), json.loads(row["response"]), row["used_at"])
