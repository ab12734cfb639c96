"""POST /v2/media/categories (Animus): structured metadata about an image or a video."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request

from server.api.protocol import (
    ErrorResponse,
    FrameMetadata,
    MediaCategoriesRequest,
    MediaCategoriesResponse,
    Usage,
)
from server.api.routes.chat import until_disconnected
from server.api.services import Services, get_services
from server.exceptions import refuse_unsupported
from server.pipelines.categories import CategoriesRequest

router = APIRouter(responses={s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 500, 503)})


@router.post("/v2/media/categories", response_model=MediaCategoriesResponse, tags=["media"])
async def media_categories(
    body: MediaCategoriesRequest, request: Request, services: Services = Depends(get_services)
) -> MediaCategoriesResponse:
    services.check_model(body.model)
    refuse_unsupported(body.unsupported_fields(), " (asynchronous jobs)")
    job = CategoriesRequest(
        request_id=f"mcat-{uuid.uuid4().hex}",
        media_url=body.media_url,
        keys=body.keys(),
        use_scenes=body.use_scenes,
    )
    result = await until_disconnected(request, services.categories.run(job))
    prompt, image, completion = result.usage
    frames = None
    if result.frames is not None:
        frames = [FrameMetadata(timestamp=f.timestamp, result=f.result) for f in result.frames]
    video_tokens = image if result.media_type == "video" else 0
    return MediaCategoriesResponse(
        id=job.request_id,
        created=int(time.time()),
        model=body.model,
        media_type=result.media_type,  # type: ignore[arg-type]
        result=result.result,
        frames=frames,
        usage=Usage.of(prompt, image - video_tokens, video_tokens, completion),
    )
