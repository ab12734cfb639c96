"""Files in the job store (OpenAI's Files API, for batches): a batch's input file, uploaded
before the batch, and its output and error files, written when it ends. In the same database as
the jobs, so every replica sharing a PostgreSQL store serves every file, and a batch's output
is written in the transaction that ends it. SQL written once for both backends, as the jobs'.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from server.jobs.deliveries import Execute

FILE_COLUMNS = "id, purpose, filename, bytes, created_at"


@dataclass(frozen=True)
class StoredFile:
    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> StoredFile:
        return cls(
            id=row["id"],
            purpose=row["purpose"],
            filename=row["filename"],
            bytes=row["bytes"],
            created_at=row["created_at"],
        )


class FileStore(ABC):
    @abstractmethod
    def transaction(self, write: bool = True) -> AbstractContextManager[Execute]: ...

    @abstractmethod
    def now(self) -> float: ...

    def add_file(self, purpose: str, filename: str, content: bytes) -> StoredFile:
        with self.transaction() as execute:
            return insert_file(execute, self.now(), purpose, filename, content)

    def get_file(self, file_id: str) -> StoredFile | None:
        with self.transaction(write=False) as execute:
            row = execute(f"SELECT {FILE_COLUMNS} FROM files WHERE id = ?", (file_id,)).fetchone()
        return StoredFile.from_row(row) if row is not None else None

    def file_content(self, file_id: str) -> bytes | None:
        with self.transaction(write=False) as execute:
            row = execute("SELECT content FROM files WHERE id = ?", (file_id,)).fetchone()
        return bytes(row["content"]) if row is not None else None

    def delete_file(self, file_id: str) -> bool:
        with self.transaction() as execute:
            return execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount == 1

    def list_files(
        self, purpose: str | None, limit: int, after: str | None, newest_first: bool
    ) -> tuple[list[StoredFile], bool]:
        """At most `limit` files after the file `after` (a cursor), in creation order or its
        reverse; and whether more follow. A cursor that names no file: KeyError."""
        order, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        where, values = [], []
        if purpose is not None:
            where.append("purpose = ?")
            values.append(purpose)
        if after is not None:
            where.append(
                f"(created_at, id) {compare} (SELECT created_at, id FROM files WHERE id = ?)"
            )
            values.append(after)
        query = f"SELECT {FILE_COLUMNS} FROM files"
        if where:
            query += " WHERE " + " AND ".join(where)
        query += f" ORDER BY created_at {order}, id {order} LIMIT ?"
        with self.transaction(write=False) as execute:
            if (
                after is not None
                and not execute("SELECT id FROM files WHERE id = ?", (after,)).fetchone()
            ):
                raise KeyError(after)
            rows = execute(query, (*values, limit + 1)).fetchall()
        return [StoredFile.from_row(row) for row in rows[:limit]], len(rows) > limit


def insert_file(
    execute: Execute, now: float, purpose: str, filename: str, content: bytes
) -> StoredFile:
    """A new file, inside the caller's transaction."""
    file_id = f"file-{uuid.uuid4().hex}"
    execute(
        "INSERT INTO files (id, purpose, filename, bytes, created_at, content)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (file_id, purpose, filename, len(content), now, content),
    )
    return StoredFile(file_id, purpose, filename, len(content), now)
