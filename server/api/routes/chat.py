"""POST /v1/chat/completions, /chat/completions (router style), /v2/media/completions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Literal, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.protocol import (
    ANIMUS_DEFAULT_TEMPERATURE,
    OPENAI_DEFAULT_TEMPERATURE,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    completion_id,
)
from server.api.services import Services, get_services
from server.api.sse import chat_stream
from server.exceptions import ClientDisconnected, InvalidRequest, refuse_unsupported
from server.pipelines.chat import ChatRequest

T = TypeVar("T")
SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
RESPONSES: dict[int | str, dict] = {
    # stream: true -> server-sent events; each `data` is a chat.completion.chunk JSON or [DONE].
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}}},
    **{status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)},
}
router = APIRouter(responses=RESPONSES)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["chat"])
async def chat_completions(
    body: ChatCompletionRequest, request: Request, services: Services = Depends(get_services)
) -> ChatCompletionResponse | StreamingResponse:
    return await _complete(body, request, services, OPENAI_DEFAULT_TEMPERATURE, "native")


@router.post("/chat/completions", response_model=ChatCompletionResponse, tags=["chat"])
async def chat_completions_alias(
    body: ChatCompletionRequest, request: Request, services: Services = Depends(get_services)
) -> ChatCompletionResponse | StreamingResponse:
    return await _complete(body, request, services, OPENAI_DEFAULT_TEMPERATURE, "native")


@router.post("/v2/media/completions", response_model=ChatCompletionResponse, tags=["media"])
async def media_completions(
    body: ChatCompletionRequest, request: Request, services: Services = Depends(get_services)
) -> ChatCompletionResponse | StreamingResponse:
    """Animus media completions: the chat contract with temperature defaulting to 0.1."""
    return await _complete(body, request, services, ANIMUS_DEFAULT_TEMPERATURE, "captions")


async def _complete(
    body: ChatCompletionRequest,
    request: Request,
    services: Services,
    default_temperature: float,
    default_video_mode: Literal["native", "captions"],
) -> ChatCompletionResponse | StreamingResponse:
    services.check_model(body.model)
    refuse_unsupported(body.unsupported_fields())
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest(
            "stream_options is only allowed when stream is true.",
            param="stream_options",
            code="invalid_value",
        )
    chat_request = ChatRequest(
        request_id=completion_id(),
        messages=body.to_messages(),
        sampling=body.to_sampling_params(default_temperature),
        video_mode=body.to_video_mode(default_video_mode),
        use_scenes=bool(body.use_scenes),
    )
    if not body.stream:
        result = await until_disconnected(request, services.chat.complete(chat_request))
        return ChatCompletionResponse.from_result(chat_request.request_id, body.model, result)
    run = await until_disconnected(request, services.chat.start(chat_request))
    outputs = services.chat.outputs(run.seq)
    # Wait for the first token before answering 200, so a queue timeout is still a 503.
    first = await until_disconnected(request, anext(outputs))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        chat_stream(run, first, outputs, body.model, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


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
