"""Stored answers of the Responses API (`store`, OpenAI's default): a response is kept with its
own input items, so a later request names it as `previous_response_id` instead of sending the
conversation again, and `GET /v1/responses/{id}` reads it back. Each row holds only what its
request added; a conversation is its chain of rows, read back by following
previous_response_id (one recursive query). In the job store's database, so every replica
sharing a PostgreSQL store continues every conversation; deleted with the finished jobs,
--job-retention-hours after they were made.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from server.jobs.deliveries import Execute

# A conversation longer than this many responses is cut off at the oldest (a guard against a
# cycle no request can make, and against runaway chains).
MAX_CHAIN = 10_000


@dataclass(frozen=True)
class StoredTurn:
    """One stored response: the input items its request added, and the response (its
    output items included)."""

    input: list[dict[str, Any]]
    response: dict[str, Any]


class BrokenChain(Exception):
    """A conversation's response is not stored (never was, deleted, or past retention)."""

    def __init__(self, response_id: str):
        super().__init__(response_id)
        self.response_id = response_id


class ResponseStore(ABC):
    @abstractmethod
    def transaction(self, write: bool = True) -> AbstractContextManager[Execute]: ...

    @abstractmethod
    def now(self) -> float: ...

    def save_response(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        with self.transaction() as execute:
            execute(
                "INSERT INTO responses (id, previous_response_id, created_at, input, response)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    response["id"],
                    response.get("previous_response_id"),
                    self.now(),
                    json.dumps(input_items, ensure_ascii=False),
                    json.dumps(response, ensure_ascii=False),
                ),
            )

    def get_response(self, response_id: str) -> StoredTurn | None:
        with self.transaction(write=False) as execute:
            row = execute(
                "SELECT input, response FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        return _turn(row) if row is not None else None

    def conversation(self, response_id: str) -> list[StoredTurn]:
        """The turns of the conversation that ends with this response, oldest first. Raises
        BrokenChain naming the first response of it that is not stored."""
        query = (
            "WITH RECURSIVE chain (id, previous_response_id, input, response, depth) AS ("
            " SELECT id, previous_response_id, input, response, 0 FROM responses WHERE id = ?"
            " UNION ALL"
            " SELECT r.id, r.previous_response_id, r.input, r.response, c.depth + 1"
            " FROM responses r JOIN chain c ON r.id = c.previous_response_id"
            " WHERE c.depth < ?)"
            " SELECT previous_response_id, input, response FROM chain ORDER BY depth DESC"
        )
        with self.transaction(write=False) as execute:
            rows = execute(query, (response_id, MAX_CHAIN)).fetchall()
        if not rows:
            raise BrokenChain(response_id)
        oldest = rows[0]["previous_response_id"]
        if oldest is not None and len(rows) <= MAX_CHAIN:
            raise BrokenChain(oldest)
        return [_turn(row) for row in rows]

    def delete_response(self, response_id: str) -> bool:
        with self.transaction() as execute:
            cursor = execute("DELETE FROM responses WHERE id = ?", (response_id,))
            return cursor.rowcount == 1


def _turn(row: Any) -> StoredTurn:
    return StoredTurn(json.loads(row["input"]), json.loads(row["response"]))
