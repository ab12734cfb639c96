"""OpenAI's Files API: upload a JSONL file of requests for a batch (purpose batch), or an
image a request names by its id (purpose vision or user_data); list, read, delete. A batch's
output and error files are read here too."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from server.api.batches import FileDeleted, FileList, FileObject
from server.api.body import ThreadParsedRoute
from server.api.protocol import ErrorResponse
from server.api.services import Services, get_services
from server.exceptions import FileNotFound, InvalidRequest, refuse_unsupported
from server.jobs.project import current_project
from server.media.fetch import MEDIA_PURPOSES
from server.media.image import looks_like_image

PURPOSES = ("batch", *MEDIA_PURPOSES)
# Headers Anthropic's SDK sends with every request (its uploads have no purpose).
ANTHROPIC_HEADERS = frozenset({"anthropic-version", "anthropic-beta"})

router = APIRouter(
    route_class=ThreadParsedRoute,
    tags=["files"],
    responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)},
)


@router.post("/v1/files", response_model=FileObject)
async def upload_file(
    request: Request,
    file: UploadFile = File(...),
    # (Anthropic's SDK sends none: its files are a request's inputs, user_data)
    purpose: str | None = Form(default=None),
    expires_after_anchor: str | None = Form(default=None, alias="expires_after[anchor]"),
    expires_after_seconds: str | None = Form(default=None, alias="expires_after[seconds]"),
    services: Services = Depends(get_services),
) -> FileObject:
    """A file of batch requests (purpose batch; JSONL: one `{custom_id, method, url, body}` a
    line, checked when a batch runs over it), or an image for requests to name by its id
    (purpose vision or user_data, which Anthropic's SDK gets without asking; checked when a
    request reads it). The upload is bounded by --max-request-body-bytes, and the project's files
    in all by --max-file-storage-bytes."""
    if purpose is None and ANTHROPIC_HEADERS & set(request.headers):
        purpose = "user_data"
    if purpose is None:
        raise InvalidRequest(
            "purpose is required: batch, vision or user_data.",
            param="purpose",
            code="missing_required_parameter",
        )
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"purpose {purpose!r} is not served here: files are batches' requests (purpose "
            "'batch') or images (purpose 'vision' or 'user_data').",
            param="purpose",
            code="invalid_value",
        )
    if expires_after_anchor is not None or expires_after_seconds is not None:
        refuse_unsupported(["expires_after"])
    head = await file.read(16)
    if not head:
        raise InvalidRequest("The file is empty.", param="file", code="invalid_value")
    if purpose == "vision" and not looks_like_image(head):
        # (no part reads anything else by id: a video or a PDF would fail every request)
        raise InvalidRequest(
            "A file of purpose 'vision' is an image (jpeg, png, webp, gif or bmp); this "
            "one is not. Videos are sent in video_url parts.",
            param="file",
            code="invalid_file_format",
        )
    name = (file.filename or ("batch.jsonl" if purpose == "batch" else "file"))[:255]
    async with services.uploads:  # (read whole only here: a few uploads in memory at once)
        await file.seek(0)
        content = await file.read()
        stored = await asyncio.to_thread(
            services.jobs.add_file,
            purpose,
            name,
            content,
            current_project(),
            services.max_file_storage_bytes,
        )
    return FileObject.of(stored)


@router.get("/v1/files", response_model=FileList)
async def list_files(
    purpose: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=10000, ge=1, le=10000),
    after: str | None = Query(default=None, max_length=200, description="the last id seen"),
    order: Literal["asc", "desc"] = "desc",
    page: str | None = Query(default=None, max_length=200, description="Anthropic's `after`"),
    services: Services = Depends(get_services),
) -> FileList:
    after = after if after is not None else page
    try:
        files, has_more = await asyncio.to_thread(
            services.jobs.list_files, purpose, limit, after, order == "desc", current_project()
        )
    except KeyError:  # (a 400, as the other lists answer a cursor that names nothing)
        raise InvalidRequest(
            f"No file `{after}` to list after (deleted, or never existed).",
            param="after",
            code="invalid_value",
        ) from None
    data = [FileObject.of(stored) for stored in files]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return FileList(
        data=data,
        first_id=first,
        last_id=last,
        has_more=has_more,
        next_page=last if has_more else None,
    )


@router.get("/v1/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str, services: Services = Depends(get_services)) -> FileObject:
    stored = await asyncio.to_thread(services.jobs.get_file, file_id, current_project())
    if stored is None:
        raise FileNotFound(file_id)
    return FileObject.of(stored)


@router.get(
    "/v1/files/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def file_content(file_id: str, services: Services = Depends(get_services)) -> Response:
    content = await asyncio.to_thread(services.jobs.file_content, file_id, current_project())
    if content is None:
        raise FileNotFound(file_id)
    # (never rendered by a browser as what it might look like)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"X-Content-Type-Options": "nosniff"},
    )


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, services: Services = Depends(get_services)) -> FileDeleted:
    if not await asyncio.to_thread(services.jobs.delete_file, file_id, current_project()):
        raise FileNotFound(file_id)
    return FileDeleted(id=file_id, deleted=True)
