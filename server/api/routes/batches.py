"""OpenAI's Batch API: a batch over an uploaded file of requests, its status, cancel, list.
A batch is a durable job (see server/api/batches.py and pipelines/batch.py)."""

from __future__ import annotations

import asyncio
import functools

from fastapi import APIRouter, Depends, Header, Query

from server.api.batches import Batch, BatchCreateRequest, BatchList
from server.api.body import ThreadParsedRoute
from server.api.fields import check_metadata
from server.api.protocol import ErrorResponse
from server.api.services import Services, get_services
from server.exceptions import (
    BatchNotCancellable,
    BatchNotFound,
    FileNotFound,
    InvalidRequest,
)
from server.jobs.project import current_project

BATCH = ("batch",)
router = APIRouter(
    route_class=ThreadParsedRoute,
    tags=["batches"],
    responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 503)},
)


@router.post("/v1/batches", response_model=Batch)
async def create_batch(
    body: BatchCreateRequest,
    services: Services = Depends(get_services),
    idempotency_key: str | None = Header(default=None, max_length=200),
) -> Batch:
    """The batch is queued at once (`validating`); its lines are checked when it runs (a file
    with invalid lines fails the batch, each listed in `errors`)."""
    check_metadata(body.metadata)
    project = current_project()
    stored = await asyncio.to_thread(services.jobs.get_file, body.input_file_id, project)
    if stored is None:
        raise FileNotFound(body.input_file_id, param="input_file_id")
    if stored.purpose != "batch":
        raise InvalidRequest(
            f"File {body.input_file_id} has purpose {stored.purpose!r}; a batch reads a file "
            "uploaded with purpose 'batch'.",
            param="input_file_id",
            code="invalid_value",
        )
    request = body.model_dump(exclude_none=True)
    description = {key: request.get(key) for key in ("input_file_id", "endpoint", "metadata")}
    description["completion_window"] = body.completion_window
    job = await asyncio.to_thread(
        functools.partial(
            services.jobs.create,
            "batch",
            request,
            idempotency_key,
            "batch_",
            description,
            project=project,
        )
    )
    services.job_worker.notify()
    return Batch.of(job)


@router.get("/v1/batches/{batch_id}", response_model=Batch)
async def retrieve_batch(batch_id: str, services: Services = Depends(get_services)) -> Batch:
    job = await services.get_job(batch_id, BATCH)
    if job is None:
        raise BatchNotFound(batch_id)
    return Batch.of(job)


@router.post("/v1/batches/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(batch_id: str, services: Services = Depends(get_services)) -> Batch:
    """A validating or running batch stops at once (its running requests are aborted; what it
    had answered stays in its output and error files); an ended one: 409."""
    job = await services.cancel_job(batch_id, BATCH, BatchNotFound, BatchNotCancellable)
    return Batch.of(job)


@router.get("/v1/batches", response_model=BatchList)
async def list_batches(
    limit: int = Query(default=20, ge=1, le=100),
    after: str | None = Query(default=None, max_length=200, description="the last id seen"),
    services: Services = Depends(get_services),
) -> BatchList:
    jobs, has_more = await services.list_jobs(None, limit, after, BATCH)
    data = [Batch.of(job) for job in jobs]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return BatchList(data=data, first_id=first, last_id=last, has_more=has_more)
