"""POST /v2/media/categories (Animus): structured metadata about an image or a video, answered
at once or, with `"async": true`, as a durable job whose status is at /v2/media/status/{id}."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse

from server.api.body import ThreadParsedRoute
from server.api.protocol import (
    ErrorResponse,
    FrameMetadata,
    JobStatus,
    MediaCategoriesRequest,
    MediaCategoriesResponse,
    MediaJob,
    MediaJobList,
    Usage,
)
from server.api.routes.chat import until_disconnected
from server.api.services import Services, get_services
from server.exceptions import JobNotFound
from server.jobs.store import Job
from server.jobs.worker import Handler, Progress, engine_request_id
from server.media.frames import FrameRequest
from server.pipelines.categories import CategoriesPipeline, CategoriesRequest, CategoriesResult

router = APIRouter(
    route_class=ThreadParsedRoute,
    responses={s: {"model": ErrorResponse} for s in (400, 401, 404, 409, 413, 500, 503)},
)


@router.post(
    "/v2/media/categories",
    response_model=MediaCategoriesResponse,
    responses={202: {"model": MediaJob}},
    tags=["media"],
)
async def media_categories(
    body: MediaCategoriesRequest,
    request: Request,
    services: Services = Depends(get_services),
    idempotency_key: str | None = Header(default=None, max_length=200),
) -> MediaCategoriesResponse | JSONResponse:
    body.model = body.model or services.served_model_names[0]
    services.check_model(body.model)
    if body.is_async():
        await services.categories.check_for_job(body.media_url)
        job = await services.submit_job(
            "categories", body.model_dump(by_alias=True), idempotency_key
        )
        return await services.job_accepted(job)
    job_id = f"mcat-{uuid.uuid4().hex}"
    result = await until_disconnected(
        request, services.categories.run(pipeline_request(job_id, body))
    )
    return categories_response(job_id, body.model, result)


@router.get("/v2/media/status/{job_id}", response_model=MediaJob, tags=["media"])
async def media_status(job_id: str, services: Services = Depends(get_services)) -> MediaJob:
    job = await services.get_job(job_id)
    if job is None:
        raise JobNotFound(job_id)
    (view,) = await services.job_views([job])
    return view


@router.post("/v2/media/status/{job_id}/cancel", response_model=MediaJob, tags=["media"])
@router.delete("/v2/media/status/{job_id}", response_model=MediaJob, tags=["media"])
async def cancel_job(job_id: str, services: Services = Depends(get_services)) -> MediaJob:
    """A queued or processing job stops (its engine work is aborted; its webhook, if any,
    reports `media.cancelled` once); cancelling it again answers the same; an ended job: 409."""
    (view,) = await services.job_views([await services.cancel_job(job_id)])
    return view


@router.get("/v2/media/jobs", response_model=MediaJobList, tags=["media"])
async def list_jobs(
    status: JobStatus | None = None,
    limit: int = Query(default=20, ge=1, le=100),
    after: str | None = Query(default=None, max_length=200, description="the last id seen"),
    services: Services = Depends(get_services),
) -> MediaJobList:
    jobs, has_more = await services.list_jobs(status, limit, after)
    data = await services.job_views(jobs)
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return MediaJobList(data=data, first_id=first, last_id=last, has_more=has_more)


def pipeline_request(request_id: str, body: MediaCategoriesRequest) -> CategoriesRequest:
    wishes = FrameRequest(
        "frames", fps=body.fps, max_frames=body.max_frames, use_scenes=bool(body.use_scenes)
    )
    return CategoriesRequest(request_id, body.media_url, body.keys(), wishes)


def categories_response(
    response_id: str, model: str, result: CategoriesResult
) -> MediaCategoriesResponse:
    prompt, image, completion, cached = result.usage
    frames = None
    if result.frames is not None:
        frames = [FrameMetadata(timestamp=f.timestamp, result=f.result) for f in result.frames]
    video_tokens = image if result.media_type == "video" else 0
    return MediaCategoriesResponse(
        id=response_id,
        created=int(time.time()),
        model=model,
        media_type=result.media_type,  # type: ignore[arg-type]
        result=result.result,
        frames=frames,
        usage=Usage.of(prompt, image - video_tokens, video_tokens, completion, cached),
    )


def categories_job_handler(
    pipeline: CategoriesPipeline, job_priority: int | None = None
) -> Handler:
    """What the job worker runs for a `categories` job: the same pipeline, the same answer,
    at `job_priority` (None: priorities are not looked at); progress is frames analysed /
    planned."""

    async def handle(job: Job, progress: Progress) -> dict:
        body = MediaCategoriesRequest.model_validate(job.request)
        request = pipeline_request(engine_request_id(job), body)
        request = replace(request, priority=job_priority or 0)
        result = await pipeline.run(request, on_progress=progress)
        # the answer's own id, as the synchronous request's (mcat-), the same on every attempt
        response_id = f"mcat-{job.id.removeprefix('job-')}"
        return categories_response(response_id, body.model, result).model_dump()

    return handle
