"""POST /v1/messages: Anthropic's Messages API, answered as a chat completion (see
server/api/messages.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.body import ThreadParsedRoute
from server.api.messages import (
    AnthropicError,
    CountTokensRequest,
    MessageEvents,
    MessageObject,
    MessagesRequest,
    TokensCount,
    completed,
    message_id,
    usage_of,
)
from server.api.services import Services, get_services
from server.api.sse import SSE_RESPONSE, EventStream
from server.api.translated import prompt_tokens, run_translated
from server.pipelines.chat import ChatResult

ERRORS: dict[int | str, dict] = {
    status: {"model": AnthropicError} for status in (400, 401, 404, 413, 500, 503)
}
router = APIRouter(route_class=ThreadParsedRoute, responses={200: SSE_RESPONSE, **ERRORS})


@router.post("/v1/messages", response_model=MessageObject, tags=["messages"])
async def create_message(
    body: MessagesRequest, request: Request, services: Services = Depends(get_services)
) -> MessageObject | StreamingResponse:
    started = await run_translated(body, request, services)
    if isinstance(started, ChatResult):
        return completed(body, started)
    run = started.run
    start = MessageObject(id=message_id(), model=body.model, content=[], usage=usage_of(run))
    events = MessageEvents(start, started.chat.tools, run.seq.inputs.thinks, body.omits_thinking)
    stream = started.events(events, body)
    return EventStream(stream)


@router.post("/v1/messages/count_tokens", response_model=TokensCount, tags=["messages"])
async def count_tokens(
    body: CountTokensRequest, request: Request, services: Services = Depends(get_services)
) -> TokensCount:
    """The tokens the messages would take (`client.messages.count_tokens`): the prompt built
    as /v1/messages builds it, images read, nothing run."""
    return TokensCount(input_tokens=await prompt_tokens(body, request, services))
