from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server import __version__
from server.api.body import ThreadParsedRoute
from server.api.errors import error_response
from server.api.protocol import ErrorResponse, ModelCard, ModelList
from server.api.services import Services, get_services
from server.exceptions import ModelNotDeletable
from server.jobs.project import current_project

router = APIRouter(route_class=ThreadParsedRoute)


@router.get("/health", tags=["server"])
async def health(services: Services = Depends(get_services)) -> JSONResponse:
    """200 while the engine runs, 503 once it has stopped (open without an API key).
    media_slots: requests holding or waiting for a slot to download or decode their media
    (before the engine's queue, num_queued). job_store: "ok", or "unreachable" while the job
    store does not answer (jobs, stored responses and files are 503s meanwhile; chat and
    completions are served: still a 200)."""
    engine = services.engine
    if not engine.is_running:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    store = "ok" if services.jobs.unreachable_since is None else "unreachable"
    return JSONResponse(
        {
            "status": "ok",
            "num_running": engine.num_running,
            "num_queued": engine.num_queued,
            "media_slots": {name: s.counts() for name, s in services.chat.media.slots().items()},
            "job_store": store,
        }
    )


PING = {
    "tags": ["server"],
    "response_class": Response,
    "responses": {200: {"description": "running (no body)"}, 503: {"description": "stopped"}},
}


# vLLM's /ping (GET or POST: the SageMaker-style health check some deployments probe); one
# operation id per method, as an OpenAPI document needs them unique.
@router.get("/ping", operation_id="ping_get", **PING)  # type: ignore[arg-type]
@router.post("/ping", operation_id="ping_post", **PING)  # type: ignore[arg-type]
async def ping(services: Services = Depends(get_services)) -> Response:
    """/health without a body: 200 while the engine runs, 503 once it has stopped."""
    return Response(status_code=200 if services.engine.is_running else 503)


@router.get("/version", tags=["server"])
async def version() -> dict[str, str]:
    """The server's version (open without an API key, like /health)."""
    return {"version": __version__}


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses={400: {"model": ErrorResponse}},  # (a bad page size)
    tags=["models"],
)
async def list_models(
    services: Services = Depends(get_services),
    limit: int | None = Query(default=None, ge=1, le=1000),
    after_id: str | None = None,
    before_id: str | None = None,
) -> ModelList:
    """Every served name (OpenAI's list); Anthropic's SDK pages it with limit, after_id and
    before_id (an id not served: an empty page, so a pager stops)."""
    names = list(services.served_model_names)
    if after_id is not None:
        names = names[names.index(after_id) + 1 :] if after_id in names else []
    if before_id is not None:
        names = names[: names.index(before_id)] if before_id in names else []
    more = limit is not None and len(names) > limit
    if more:  # (before_id pages backwards: the page nearest it)
        names = names[-limit:] if before_id is not None and after_id is None else names[:limit]
    data = [model_card(services, name) for name in names]
    return ModelList(data=data, has_more=more)


# `:path`: served names are often hub ids with a slash (Qwen/Qwen2-VL-2B-Instruct).
@router.get(
    "/v1/models/{model:path}",
    response_model=ModelCard,
    responses={404: {"model": ErrorResponse}},
    tags=["models"],
)
async def retrieve_model(model: str, services: Services = Depends(get_services)) -> ModelCard:
    services.check_model(model)
    return model_card(services, model)


@router.delete(
    "/v1/models/{model:path}",
    responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    tags=["models"],
)
async def delete_model(model: str, services: Services = Depends(get_services)) -> None:
    """OpenAI's (a fine-tuned model's): the served model is not deleted (403); another is
    not here (404)."""
    services.check_model(model)
    raise ModelNotDeletable(model)


def model_card(services: Services, name: str) -> ModelCard:
    return ModelCard(
        id=name,
        created=services.started_at,
        # the checkpoint's directory, absolute: a tool on this machine (vllm bench serve) loads
        # the tokenizer from it
        root=str(services.loaded.path.resolve()),
        max_model_len=services.engine.max_seq_len,
    )


@router.get("/metrics", tags=["server"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (open unless --metrics-require-api-key or --metrics-project: then
    any key's, or only that project's keys: the metrics count every project's tokens)."""
    reader = request.app.state.metrics_project
    if reader is not None and current_project() != reader:
        message = "/metrics is for the operator's API keys only (--metrics-project)."
        return error_response(request, 403, message, "permission_error", code="permission_denied")
    body = await asyncio.to_thread(request.app.state.metrics.render)  # it counts the job store
    return Response(body, media_type=CONTENT_TYPE_LATEST)
