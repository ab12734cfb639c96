"""OpenAI's Files and Batch APIs on the wire: a JSONL file of requests uploaded (`POST
/v1/files`, purpose `batch`), a batch over it (`POST /v1/batches`), its status, and its output
and error files (`GET /v1/files/{id}/content`), as the openai SDK's `files` and `batches`
read them.

A batch is a durable job (kind `batch`) in the job store: it survives a restart and is run by
whichever replica claims it; pipelines/batch.py runs its lines.
"""

from __future__ import annotations

import mimetypes
from typing import Any, Literal

from pydantic import BaseModel, Field

from server.api.fields import MetadataPairs, StrictModel
from server.jobs.files import StoredFile
from server.jobs.store import Job

# What a batch's lines may ask for: each is served as the route serves it.
BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/responses"]
COMPLETION_WINDOW_S = 24 * 3600  # OpenAI's only window; here a batch does not expire
BATCH_STATUS = {  # the job's status -> the batch's
    "queued": "validating",
    "processing": "in_progress",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}


# Batch files' own type, which Python's table does not know (it is not yet registered).
JSONL = "application/jsonl"


def mime_type(filename: str) -> str:
    if filename.lower().endswith(".jsonl"):
        return JSONL
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


class FileObject(BaseModel):
    """OpenAI's file object, with Anthropic's names of the same facts beside (its SDK's
    `beta.files` reads type, mime_type, size_bytes, downloadable)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None
    type: Literal["file"] = "file"
    mime_type: str
    size_bytes: int
    downloadable: bool = True

    @classmethod
    def of(cls, stored: StoredFile) -> FileObject:
        return cls(
            id=stored.id,
            bytes=stored.bytes,
            created_at=int(stored.created_at),
            filename=stored.filename,
            purpose=stored.purpose,
            mime_type=mime_type(stored.filename),
            size_bytes=stored.bytes,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
    next_page: str | None = None  # (Anthropic's cursor: the next page's `page`)


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool
    type: Literal["file_deleted"] = "file_deleted"  # (Anthropic's name of it)


class OutputExpiresAfter(StrictModel):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2592000)  # OpenAI's range: an hour to 30 days


class BatchCreateRequest(StrictModel):
    input_file_id: str = Field(max_length=200)
    endpoint: BatchEndpoint
    completion_window: Literal["24h"]
    metadata: MetadataPairs = None
    # Accepted as OpenAI's SDK sends it; the output files are kept as long as the server's
    # job retention keeps them (--job-retention-hours), whatever it says.
    output_expires_after: OutputExpiresAfter | None = None


class BatchRequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]  # {code, message, param, line}


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    ]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: MetadataPairs = None
    model: str | None = None  # its first request's, once it runs
    # {input_tokens, input_tokens_details, output_tokens, output_tokens_details, total_tokens}
    usage: dict[str, Any] | None = None

    @classmethod
    def of(cls, job: Job) -> Batch:
        """A batch as its job stands: its description (what was asked), what it has done so
        far or in all (the job's result), or why it failed (the job's error)."""
        described = job.description or {}
        result = job.result or {}
        created, ended = int(job.created_at), int(job.updated_at)
        status = BATCH_STATUS[job.status]
        return cls(
            id=job.id,
            endpoint=described.get("endpoint", ""),
            errors=_errors(job.error),
            input_file_id=described.get("input_file_id", ""),
            completion_window=described.get("completion_window", "24h"),
            status=status,  # type: ignore[arg-type]
            output_file_id=result.get("output_file_id"),
            error_file_id=result.get("error_file_id"),
            created_at=created,
            in_progress_at=result.get("in_progress_at"),
            expires_at=created + COMPLETION_WINDOW_S,
            finalizing_at=ended if status == "completed" else None,
            completed_at=ended if status == "completed" else None,
            failed_at=ended if status == "failed" else None,
            cancelled_at=ended if status == "cancelled" else None,
            cancelling_at=ended if status == "cancelled" else None,
            request_counts=BatchRequestCounts(**result.get("request_counts", {})),
            metadata=described.get("metadata"),
            model=result.get("model"),
            usage=result.get("usage"),
        )


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


def _errors(error: dict[str, Any] | None) -> BatchErrors | None:
    """A failed batch's reasons: each invalid line's, or the one reason it failed for."""
    if error is None:
        return None
    if details := error.get("data"):
        return BatchErrors(data=details)
    keys = ("code", "message", "param")
    return BatchErrors(data=[{**{k: error.get(k) for k in keys}, "line": None}])
