"""POST /v1/chat/completions, /chat/completions (router style), /v2/media/completions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import replace
from typing import Literal, TypeVar

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.body import ThreadParsedRoute
from server.api.fields import check_metadata
from server.api.protocol import (
    ANIMUS_DEFAULTS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    MediaCompletionRequest,
    MediaJob,
    check_stream_options,
    completion_id,
    usage_wanted,
)
from server.api.services import Services, get_services
from server.api.sse import EventStream, chat_stream
from server.engine.sampling import SamplingDefaults
from server.exceptions import (
    ChatCompletionNotFound,
    ClientDisconnected,
    InvalidRequest,
    ServerError,
    refuse_unsupported,
)
from server.jobs.store import Job
from server.jobs.worker import Handler, Progress, engine_request_id
from server.pipelines.chat import ChatPipeline, ChatRequest
from server.pipelines.choices import merged

T = TypeVar("T")
logger = logging.getLogger(__name__)
SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
ERRORS: dict[int | str, dict] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)
}
RESPONSES: dict[int | str, dict] = {
    # stream: true -> server-sent events; each `data` is a chat.completion.chunk JSON or [DONE].
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}}},
    **ERRORS,
}
router = APIRouter(route_class=ThreadParsedRoute, responses=RESPONSES)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["chat"])
async def chat_completions(
    body: ChatCompletionRequest, request: Request, services: Services = Depends(get_services)
) -> ChatCompletionResponse | StreamingResponse:
    return await _complete(body, request, services, services.sampling_defaults, "native")


@router.get("/v1/chat/completions", tags=["chat"])
async def list_stored_chat_completions() -> dict:
    """OpenAI's list of stored chat completions (`store: true`): this server stores none, so
    the list is empty (a client listing them gets no 405)."""
    return {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


@router.get("/v1/chat/completions/{completion_id}", tags=["chat"])
@router.post("/v1/chat/completions/{completion_id}", tags=["chat"])
@router.delete("/v1/chat/completions/{completion_id}", tags=["chat"])
@router.get("/v1/chat/completions/{completion_id}/messages", tags=["chat"])
async def stored_chat_completion(completion_id: str) -> None:
    """Retrieve, update, delete a stored chat completion, or list its messages: none is."""
    raise ChatCompletionNotFound(completion_id)


@router.post(
    "/v2/media/completions",
    response_model=ChatCompletionResponse,
    responses={202: {"model": MediaJob}, 409: {"model": ErrorResponse}},
    tags=["media"],
)
async def media_completions(
    body: MediaCompletionRequest,
    request: Request,
    services: Services = Depends(get_services),
    idempotency_key: str | None = Header(default=None, max_length=200),
) -> ChatCompletionResponse | StreamingResponse | JSONResponse:
    """Animus media completions: the chat contract with temperature defaulting to 0.1 and
    videos read through frame captions; with `async` or `webhook_url`, a durable job."""
    if not body.is_async():
        answer = await _complete(body, request, services, ANIMUS_DEFAULTS, "captions")
        if isinstance(answer, ChatCompletionResponse):
            return answer.with_call_lists()
        return answer
    if body.stream:
        raise InvalidRequest(
            "stream cannot be combined with async or webhook_url: a job's answer comes at its "
            "status URL (and by webhook).",
            param="stream",
            code="invalid_value",
        )
    # Everything that can be refused without fetching media is refused now, not in the job.
    await services.chat.check_for_job(to_chat_request(body, services, ANIMUS_DEFAULTS, "captions"))
    request_body = body.model_dump(by_alias=True, exclude_unset=True)
    job = await services.submit_job("completions", request_body, idempotency_key)
    return await services.job_accepted(job)


def completions_job_handler(pipeline: ChatPipeline, job_priority: int | None = None) -> Handler:
    """What the job worker runs for a `completions` job: the answer the request would have got
    synchronously, at the body's `priority` or else `job_priority` (None: priorities are not
    looked at, all run at 0). Progress: video frames captioned / planned, held below 1 until
    the answer over the captions is written too."""

    async def handle(job: Job, progress: Progress) -> dict:
        body = MediaCompletionRequest.model_validate(job.request)
        chat_request = to_chat_request(body, None, ANIMUS_DEFAULTS, "captions")
        chat_request = replace(
            chat_request,
            request_id=engine_request_id(job),
            sampling=replace(chat_request.sampling, priority=_priority(body, job_priority)),
            on_progress=lambda fraction: progress(min(fraction, 0.99)),
        )
        result = await pipeline.complete(chat_request)
        response_id = f"chatcmpl-{job.id.removeprefix('job-')}"  # the same on every attempt
        answer = ChatCompletionResponse.from_result(response_id, body.model, result)
        return answer.with_call_lists().model_dump()

    return handle


def to_chat_request(
    body: ChatCompletionRequest,
    services: Services | None,
    defaults: SamplingDefaults,
    default_video_mode: Literal["native", "captions"],
) -> ChatRequest:
    """The request checked against what this server serves and supports, as the pipeline's."""
    if services is not None and body.model is not None:  # optional (as in vLLM)
        services.check_model(body.model)
    refuse_unsupported(body.unsupported_fields())
    check_metadata(body.metadata)  # (ignored here, but within OpenAI's bounds as it checks)
    check_stream_options(body)
    body.check_prompt_logprobs()
    if ignored := body.ignored_fields():
        logger.debug("fields with no effect here, ignored: %s", ", ".join(ignored))
    if body.request_id is not None:
        logger.info("client request_id %r", body.request_id)  # repr: no forged lines
    tools = body.to_tools()
    messages = body.to_messages()
    structured = body.to_structured()
    if tools is not None and tools.writes_beside(structured):
        tools = replace(tools, json_calls=True)  # (the answer's calls are read as JSON)
    return ChatRequest(
        request_id=completion_id(),
        messages=messages,
        sampling=body.to_sampling_params(defaults, tools, structured),
        video_mode=body.to_video_mode(default_video_mode),
        use_scenes=bool(body.use_scenes),
        # a job's n was checked when it was accepted
        n=body.num_choices(services.max_n) if services is not None else body.n or 1,
        tools=tools,
        template=body.to_template(),
        grammar_param=body.structured_param(),
        tools_param=body.forced_tool_param(tools),
        aside=structured if tools is not None and tools.is_forced else None,
        tokens_as_ids=bool(body.return_tokens_as_token_ids),
        return_token_ids=bool(body.return_token_ids),
        return_image_sizes=bool(body.return_image_sizes),
        include_reasoning=body.include_reasoning is not False,
        truncation=body.truncation(),
        max_tokens_param=(
            "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        ),
    )


async def _complete(
    body: ChatCompletionRequest,
    request: Request,
    services: Services,
    defaults: SamplingDefaults,
    default_video_mode: Literal["native", "captions"],
) -> ChatCompletionResponse | StreamingResponse:
    chat_request = to_chat_request(body, services, defaults, default_video_mode)
    model = services.answering_model(body.model)
    if not body.stream:
        result = await until_disconnected(request, services.chat.complete(chat_request))
        return ChatCompletionResponse.from_result(chat_request.request_id, model, result)
    run = await until_disconnected(request, services.chat.start(chat_request))
    outputs = merged([services.chat.outputs(seq) for seq in run.seqs])
    # Wait for the first token before answering 200, so a queue timeout is still a 503.
    try:
        first = await until_disconnected(request, anext(outputs))
    except ServerError as exc:  # (a constraint that failed at the first token names its field)
        chat_request.name_error(exc)
        raise
    usage = usage_wanted(body.stream_options)
    texts = services.chat.texts(chat_request)
    return EventStream(chat_stream(run, first, outputs, model, usage, texts, chat_request))


def _priority(body: MediaCompletionRequest, job_priority: int | None) -> int:
    if job_priority is None:
        return 0
    return job_priority if body.priority is None else body.priority


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs work, cancelling it (which aborts its sequence) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the next message is the disconnect (or nothing, ever).
    while (await request.receive())["type"] != "http.disconnect":
        pass
