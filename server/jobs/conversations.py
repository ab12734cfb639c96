"""Conversations (OpenAI's Conversations API): a durable list of items (messages, function
calls and their outputs, reasoning) that a response named by `conversation` reads as its
history, and adds its input and output items to. In the job store's database, so every
replica sharing a PostgreSQL store serves every conversation; deleted with its items
--job-retention-hours after it was made or last used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.jobs.deliveries import Execute
from server.jobs.project import VISIBLE, row_seen, seen_by
from server.jobs.tables import Tables


class ConversationStore(Tables):
    """A conversation is its project's (server/jobs/project.py): another project's is not
    found."""

    def create_conversation(
        self,
        conversation_id: str,
        metadata: dict[str, str],
        items: list[dict[str, Any]],
        project: str,
    ) -> dict[str, Any]:
        now = self.now()
        with self.transaction() as execute:
            execute(
                "INSERT INTO conversations (id, created_at, used_at, metadata, project)"
                " VALUES (?, ?, ?, ?, ?)",
                (conversation_id, now, now, json.dumps(metadata), project),
            )
            _append(execute, conversation_id, 0, items)
        return _conversation(conversation_id, now, metadata)

    def get_conversation(self, conversation_id: str, project: str) -> dict[str, Any] | None:
        with self.transaction(write=False) as execute:
            row = execute(
                f"SELECT id, created_at, metadata FROM conversations WHERE id = ? AND {VISIBLE}",
                (conversation_id, *seen_by(project)),
            ).fetchone()
        return (
            _conversation(row["id"], row["created_at"], json.loads(row["metadata"]))
            if row
            else None
        )

    def update_conversation(
        self, conversation_id: str, metadata: dict[str, str], project: str
    ) -> dict[str, Any] | None:
        with self.transaction() as execute:
            row = execute(
                f"UPDATE conversations SET metadata = ?, used_at = ? WHERE id = ? AND {VISIBLE}"
                " RETURNING created_at",
                (json.dumps(metadata), self.now(), conversation_id, *seen_by(project)),
            ).fetchone()
        return _conversation(conversation_id, row["created_at"], metadata) if row else None

    def delete_conversation(self, conversation_id: str, project: str) -> bool:
        """The conversation, then its items: its row goes first, so items being added to it
        meanwhile (which hold that row) are in before its items are deleted."""
        with self.transaction() as execute:
            cursor = execute(
                f"DELETE FROM conversations WHERE id = ? AND {VISIBLE}",
                (conversation_id, *seen_by(project)),
            )
            if cursor.rowcount != 1:
                return False
            execute("DELETE FROM conversation_items WHERE conversation_id = ?", (conversation_id,))
            execute("DELETE FROM shared_values WHERE name = ?", (_lock_name(conversation_id),))
            return True

    def lock_conversation(
        self, conversation_id: str, project: str, holder: str, lease_s: float
    ) -> bool | None:
        """Takes the conversation for one response's turn (it reads the items, runs, adds its
        own) for lease_s, or renews the holder's lease: True. False while another holder's
        lease runs; None when the project has no such conversation. The lease is a row of
        shared_values (a lock of every replica sharing the store; a holder that died loses it
        when its lease runs out)."""
        with self.transaction() as execute:
            if not _held(execute, conversation_id, project, self.for_update):
                return None
            now, lease = self.now(), _lease(execute, conversation_id)
            if lease is not None and lease.holder != holder and lease.until > now:
                return False
            execute(
                "INSERT INTO shared_values (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (_lock_name(conversation_id), json.dumps([holder, now + lease_s])),
            )
            return True

    def renew_conversation_lock(self, conversation_id: str, holder: str, lease_s: float) -> bool:
        """The holder's lease, if it still has it, runs lease_s from now (never taken anew:
        a renewal still writing as its turn ends must not put back the lease it ended)."""
        with self.transaction() as execute:
            lease = _lease(execute, conversation_id)
            if lease is None or lease.holder != holder:
                return False
            cursor = execute(  # (only the value read: not one another holder wrote since)
                "UPDATE shared_values SET value = ? WHERE name = ? AND value = ?",
                (json.dumps([holder, self.now() + lease_s]), lease.name, lease.value),
            )
            return cursor.rowcount == 1

    def unlock_conversation(self, conversation_id: str, holder: str) -> None:
        """The holder's lease ended (one another holder took over, its own expired, is left)."""
        with self.transaction() as execute:
            lease = _lease(execute, conversation_id)
            if lease is not None and lease.holder == holder:
                execute(  # (only the value read: not a lease another holder took since)
                    "DELETE FROM shared_values WHERE name = ? AND value = ?",
                    (lease.name, lease.value),
                )

    def add_items(self, conversation_id: str, items: list[dict[str, Any]], project: str) -> bool:
        """Items after the conversation's last; False when there is no such conversation."""
        with self.transaction() as execute:
            return append_items(
                execute, conversation_id, items, self.now(), self.for_update, project
            )

    def conversation_items(self, conversation_id: str, project: str) -> list[dict[str, Any]] | None:
        """Its items, oldest first; None when there is no such conversation."""
        with self.transaction(write=False) as execute:
            if not row_seen(execute, "conversations", conversation_id, project):
                return None
            rows = execute(
                "SELECT item FROM conversation_items WHERE conversation_id = ? ORDER BY position",
                (conversation_id,),
            ).fetchall()
        return [json.loads(row["item"]) for row in rows]

    def delete_item(self, conversation_id: str, item_id: str, project: str) -> bool:
        with self.transaction() as execute:
            if not row_seen(execute, "conversations", conversation_id, project):
                return False
            cursor = execute(
                "DELETE FROM conversation_items WHERE conversation_id = ? AND id = ?",
                (conversation_id, item_id),
            )
            return cursor.rowcount >= 1


def append_items(
    execute: Execute,
    conversation_id: str,
    items: list[dict[str, Any]],
    now: float,
    for_update: str,
    project: str,
) -> bool:
    """Inside a transaction: items after the conversation's last (its row held meanwhile: two
    answers adding at once queue); False when the project has no such conversation."""
    if not _held(execute, conversation_id, project, for_update):
        return False
    row = execute(
        "SELECT MAX(position) AS last FROM conversation_items WHERE conversation_id = ?",
        (conversation_id,),
    ).fetchone()
    last = row["last"] if row["last"] is not None else -1
    _append(execute, conversation_id, last + 1, items)
    execute("UPDATE conversations SET used_at = ? WHERE id = ?", (now, conversation_id))
    return True


def _append(
    execute: Execute, conversation_id: str, first: int, items: list[dict[str, Any]]
) -> None:
    for position, item in enumerate(items, start=first):
        execute(
            "INSERT INTO conversation_items (conversation_id, position, id, item)"
            " VALUES (?, ?, ?, ?)",
            (conversation_id, position, item["id"], json.dumps(item, ensure_ascii=False)),
        )


def _held(execute: Execute, conversation_id: str, project: str, for_update: str) -> bool:
    """Whether the project has the conversation; its row then held till the transaction ends
    (for_update: PostgreSQL's FOR UPDATE; SQLite's write transactions hold everything)."""
    row = execute(
        f"SELECT id FROM conversations WHERE id = ? AND {VISIBLE}{for_update}",
        (conversation_id, *seen_by(project)),
    ).fetchone()
    return row is not None


def _lock_name(conversation_id: str) -> str:
    return f"conversation-lock:{conversation_id}"


@dataclass(frozen=True)
class _Lease:
    name: str  # its shared_values row
    value: str  # as stored ([holder, until] in JSON): a write checks it is still this one
    holder: str
    until: float


def _lease(execute: Execute, conversation_id: str) -> _Lease | None:
    """The conversation's lock lease, as it stands (expired or not); None: no one's."""
    name = _lock_name(conversation_id)
    row = execute("SELECT value FROM shared_values WHERE name = ?", (name,)).fetchone()
    if row is None:
        return None
    holder, until = json.loads(row["value"])
    return _Lease(name, row["value"], holder, until)


def _conversation(conversation_id: str, created_at: float, metadata: dict) -> dict[str, Any]:
    return {
        "id": conversation_id,
        "object": "conversation",
        "created_at": int(created_at),
        "metadata": metadata,
    }
