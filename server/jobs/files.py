"""Files in the job store (OpenAI's Files API, for batches): a batch's input file, uploaded
before the batch, and its output and error files, written when it ends. In the same database as
the jobs, so every replica sharing a PostgreSQL store serves every file, and a batch's output
is written in the transaction that ends it. A running batch's answers are saved as they come
(`batch_answers`), so a batch taken over goes on where it was, and a cancelled one keeps what
it had answered. SQL written once for both backends, as the jobs'.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.exceptions import FileStorageFull
from server.jobs.deliveries import Execute
from server.jobs.project import VISIBLE, row_seen, seen_by
from server.jobs.tables import Tables

FILE_COLUMNS = "id, purpose, filename, bytes, created_at"
# A file deleted while an unfinished batch reads it as its input: gone from the API at once,
# its content kept (under this purpose) until no such batch is left; a batch that runs again
# after a restart reads it as the first attempt did.
HELD = "deleted_batch_input"
SHOWN = f"purpose != '{HELD}'"


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


class FileStore(Tables):
    """A file is its project's (server/jobs/project.py): another project's is not found."""

    def add_file(
        self, purpose: str, filename: str, content: bytes, project: str, max_total: int = 0
    ) -> StoredFile:
        """An upload; max_total (0: none): what the project's files may hold in all, this one
        with them, else FileStorageFull. (The project's uploads are counted and written one at
        a time, on every replica: two at once cannot both pass the bound.)"""
        with self.transaction() as execute:
            if max_total:
                self._hold(execute, f"file storage {project}")
                used = stored_bytes(execute, project)
                if used + len(content) > max_total:
                    raise FileStorageFull(used, len(content), max_total)
            return insert_file(execute, self.now(), purpose, filename, content, project)

    def get_file(self, file_id: str, project: str) -> StoredFile | None:
        with self.transaction(write=False) as execute:
            row = execute(
                f"SELECT {FILE_COLUMNS} FROM files WHERE id = ? AND {VISIBLE} AND {SHOWN}",
                (file_id, *seen_by(project)),
            ).fetchone()
        return StoredFile.from_row(row) if row is not None else None

    def file_content(self, file_id: str, project: str, held: bool = False) -> bytes | None:
        """held: a deleted file a batch still reads counts (its input, for that batch)."""
        shown = "" if held else f" AND {SHOWN}"
        with self.transaction(write=False) as execute:
            row = execute(
                f"SELECT content FROM files WHERE id = ? AND {VISIBLE}{shown}",
                (file_id, *seen_by(project)),
            ).fetchone()
        return bytes(row["content"]) if row is not None else None

    def delete_file(self, file_id: str, project: str) -> bool:
        """Gone from the API; its content kept while an unfinished batch reads it (HELD)."""
        with self.transaction() as execute:
            row = execute(
                f"SELECT id FROM files WHERE id = ? AND {VISIBLE} AND {SHOWN}{self.for_update}",
                (file_id, *seen_by(project)),
            ).fetchone()
            if row is None:
                return False
            # (the unfinished batches' rows held: one ending meanwhile waits, then sees HELD)
            if file_id in batch_inputs(execute, self.for_update):
                execute("UPDATE files SET purpose = ? WHERE id = ?", (HELD, file_id))
            else:
                execute("DELETE FROM files WHERE id = ?", (file_id,))
            return True

    def list_files(
        self,
        purpose: str | None,
        limit: int,
        after: str | None,
        newest_first: bool,
        project: str,
    ) -> tuple[list[StoredFile], bool]:
        """At most `limit` of the project's files after the file `after` (a cursor), in
        creation order or its reverse; and whether more follow. A cursor that names no file
        of the project: KeyError."""
        order, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        where, values = [VISIBLE, SHOWN], [*seen_by(project)]
        if purpose is not None:
            where.append("purpose = ?")
            values.append(purpose)
        if after is not None:
            where.append(
                f"(created_at, id) {compare} (SELECT created_at, id FROM files WHERE id = ?)"
            )
            values.append(after)
        query = f"SELECT {FILE_COLUMNS} FROM files WHERE " + " AND ".join(where)
        query += f" ORDER BY created_at {order}, id {order} LIMIT ?"
        with self.transaction(write=False) as execute:
            if after is not None and not row_seen(execute, "files", after, project):
                raise KeyError(after)
            rows = execute(query, (*values, limit + 1)).fetchall()
        return [StoredFile.from_row(row) for row in rows[:limit]], len(rows) > limit

    def save_answers(self, job_id: str, attempt: int, rows: list[tuple[int, int, str]]) -> bool:
        """A batch's answers (line, status, output line), while this attempt holds it (an
        answer given twice, by an attempt that lost its lease and the next one, is kept once)."""
        with self.transaction() as execute:
            # The job's row held until the answers are in: a cancel, a claim or the batch's
            # end waits for them (and then sees them), never deletes around them.
            held = execute(
                "SELECT id FROM jobs WHERE id = ? AND attempt = ? AND status = 'processing'"
                f"{self.for_update}",
                (job_id, attempt),
            ).fetchone()
            if held is None:
                return False
            for line, status, entry in rows:
                execute(
                    "INSERT INTO batch_answers (batch_id, line, status, entry) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (batch_id, line) DO NOTHING",
                    (job_id, line, status, entry),
                )
        return True

    def answers(self, job_id: str) -> list[tuple[int, int, str]]:
        """A batch's answers so far, by line."""
        with self.transaction(write=False) as execute:
            rows = execute(
                "SELECT line, status, entry FROM batch_answers WHERE batch_id = ? ORDER BY line",
                (job_id,),
            ).fetchall()
        return [(row["line"], row["status"], row["entry"]) for row in rows]


def batch_inputs(execute: Execute, lock: str = "") -> set[str]:
    """The input files of the batches not finished (queued, or running); lock: their rows
    held (PostgreSQL's FOR UPDATE)."""
    rows = execute(
        "SELECT request FROM jobs WHERE kind = 'batch' AND status IN ('queued', 'processing')"
        f" ORDER BY id{lock}",
        (),
    ).fetchall()
    return {json.loads(row["request"]).get("input_file_id") for row in rows}


def drop_unread_held_files(execute: Execute) -> None:
    """Deleted input files no unfinished batch reads any more (in one statement: replicas
    ending batches at once do not take the rows in different orders)."""
    held = execute("SELECT id FROM files WHERE purpose = ?", (HELD,)).fetchall()
    unread = sorted({row["id"] for row in held} - batch_inputs(execute))
    if unread:
        marks = ", ".join("?" * len(unread))
        execute(f"DELETE FROM files WHERE id IN ({marks})", tuple(unread))


def answers_as_files(
    execute: Execute, batch_id: str, now: float, keep: bool
) -> dict[str, tuple[str, int]]:
    """Inside the transaction that ends a batch: its saved answers go, and (keep) become its
    output file (the 200s) and error file (the rest), by line, each only when it has a line.
    Returns {"output_file_id" | "error_file_id": (file id, lines)}. The files are the
    batch's project's."""
    job = execute("SELECT project FROM jobs WHERE id = ?", (batch_id,)).fetchone()
    rows = execute(
        "DELETE FROM batch_answers WHERE batch_id = ? RETURNING line, status, entry",
        (batch_id,),
    ).fetchall()
    rows.sort(key=lambda row: row["line"])
    files = {}
    for key, suffix, succeeded in (
        ("output_file_id", "output", True),
        ("error_file_id", "error", False),
    ):
        entries = [row["entry"] for row in rows if (row["status"] == 200) == succeeded]
        if keep and entries:
            content = ("\n".join(entries) + "\n").encode()
            name = f"{batch_id}_{suffix}.jsonl"
            stored = insert_file(execute, now, "batch_output", name, content, job["project"])
            files[key] = (stored.id, len(entries))
    return files


def stored_bytes(execute: Execute, project: str) -> int:
    """What the project's files hold (uploads, batches' outputs, deleted inputs a batch still
    reads); on a server without API keys (ALL), every file."""
    row = execute(
        "SELECT COALESCE(SUM(bytes), 0) AS used FROM files WHERE ? = '' OR project = ?",
        (project, project),
    ).fetchone()
    return int(row["used"])


def insert_file(
    execute: Execute, now: float, purpose: str, filename: str, content: bytes, project: str
) -> StoredFile:
    """A new file of the project, inside the caller's transaction."""
    file_id = f"file-{uuid.uuid4().hex}"
    execute(
        "INSERT INTO files (id, purpose, filename, bytes, created_at, content, project)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (file_id, purpose, filename, len(content), now, content, project),
    )
    return StoredFile(file_id, purpose, filename, len(content), now)
