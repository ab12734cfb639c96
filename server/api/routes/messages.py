"""POST /v1/messages: Anthropic's Messages API, answered as a chat completion (see
server/api/messages.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from server.api.errors import anthropic_error_type
from server.api.messages import (
    AnthropicError,
    CountTokensRequest,
    MessageEvents,
    MessageObject,
    MessagesRequest,
    TokensCount,
    chat_body_error,
    completed,
    message_id,
    usage_of,
)
from server.api.protocol import ChatCompletionRequest
from server.api.routes.chat import to_chat_request, until_disconnected
from server.api.services import Services, get_services
from server.api.sse import SSE_HEADERS
from server.engine.sequence import SequenceOutput
from server.exceptions import ServerError, refuse_unsupported
from server.pipelines.chat import ChatRequest, ChatRun

logger = logging.getLogger(__name__)
SERVER_ERROR = "The server had an error while processing your request."
ERRORS: dict[int | str, dict] = {
    status: {"model": AnthropicError} for status in (400, 401, 404, 413, 500, 503)
}
SSE_RESPONSE = {"content": {"text/event-stream": {"schema": {"type": "string"}}}}
router = APIRouter(responses={200: SSE_RESPONSE, **ERRORS})


@router.post("/v1/messages", response_model=MessageObject, tags=["messages"])
async def create_message(
    body: MessagesRequest, request: Request, services: Services = Depends(get_services)
) -> MessageObject | StreamingResponse:
    try:
        chat = _chat_request(body, services)
        if not body.stream:
            return completed(body, await until_disconnected(request, services.chat.complete(chat)))
        run = await until_disconnected(request, services.chat.start(chat))
        outputs = services.chat.outputs(run.seq)
        # Wait for the first token before answering 200, so a queue timeout is still a 503.
        first = await until_disconnected(request, anext(outputs))
    except ServerError as exc:  # the chat route names its own fields
        body.name_error(exc)
        raise
    start = MessageObject(id=message_id(), model=body.model, content=[], usage=usage_of(run))
    events = MessageEvents(start, chat.tools, run.seq.inputs.thinks, body.omits_thinking)
    stream = _events(events, run, first, outputs)
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/v1/messages/count_tokens", response_model=TokensCount, tags=["messages"])
async def count_tokens(
    body: CountTokensRequest, request: Request, services: Services = Depends(get_services)
) -> TokensCount:
    """The tokens the messages would take (`client.messages.count_tokens`): the prompt built
    as /v1/messages builds it, images read, nothing run."""
    try:
        chat = _chat_request(body, services)
        inputs = await until_disconnected(request, services.chat.prompt(chat))
    except ServerError as exc:
        body.name_error(exc)
        raise
    return TokensCount(input_tokens=inputs.num_prompt_tokens)


def _chat_request(body: MessagesRequest, services: Services) -> ChatRequest:
    """The chat completion the Messages body describes, checked as the chat route checks it."""
    refuse_unsupported(body.unsupported_fields())
    try:
        chat_body = ChatCompletionRequest.model_validate(body.to_chat_body())
    except ValidationError as exc:
        raise chat_body_error(exc) from None
    return to_chat_request(chat_body, services, services.sampling_defaults, "native")


async def _events(
    events: MessageEvents,
    run: ChatRun,
    first: SequenceOutput,
    rest: AsyncIterator[SequenceOutput],
) -> AsyncIterator[str]:
    for event in events.begin():
        yield event
    output = first
    try:
        for event in events.feed(first):
            yield event
        async for output in rest:
            for event in events.feed(output):
                yield event
    except ServerError as exc:
        error = (anthropic_error_type(exc.status_code), exc.message)
    except Exception:  # the status line went out: the stream says it failed
        logger.exception("the message stream failed")
        error = ("api_error", SERVER_ERROR)
    else:
        for event in events.end(output, run):
            yield event
        return
    for event in events.failed(*error):
        yield event
