"""POST /v1/responses: OpenAI's Responses API, answered as a chat completion (see
server/api/responses.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from server.api.protocol import ChatCompletionRequest
from server.api.responses import (
    ResponseEvents,
    ResponseObject,
    ResponsesRequest,
    chat_body_error,
    completed,
    response_id,
    responses_param,
)
from server.api.routes.chat import ERRORS, to_chat_request, until_disconnected
from server.api.services import Services, get_services
from server.api.sse import SSE_HEADERS
from server.engine.sequence import SequenceOutput
from server.exceptions import ServerError, refuse_unsupported
from server.pipelines.chat import ChatRequest, ChatRun

logger = logging.getLogger(__name__)
SERVER_ERROR = "The server had an error while processing your request."
SSE_RESPONSE = {"content": {"text/event-stream": {"schema": {"type": "string"}}}}
router = APIRouter(responses={200: SSE_RESPONSE, **ERRORS})


@router.post("/v1/responses", response_model=ResponseObject, tags=["responses"])
async def create_response(
    body: ResponsesRequest, request: Request, services: Services = Depends(get_services)
) -> ResponseObject | StreamingResponse:
    refuse_unsupported(body.unsupported_fields())
    try:
        chat_body = ChatCompletionRequest.model_validate(body.to_chat_body())
    except ValidationError as exc:
        raise chat_body_error(exc) from None
    rid = response_id()
    try:
        chat = to_chat_request(chat_body, services, services.sampling_defaults, "native")
        if not body.stream:
            result = await until_disconnected(request, services.chat.complete(chat))
            return completed(rid, body, result)
        run = await until_disconnected(request, services.chat.start(chat))
        outputs = services.chat.outputs(run.seq)
        # Wait for the first token before answering 200, so a queue timeout is still a 503.
        first = await until_disconnected(request, anext(outputs))
    except ServerError as exc:  # the chat route names its own fields
        exc.param = responses_param(exc.param)
        raise
    stream = _events(ResponseObject.start(rid, body), chat, run, first, outputs)
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)


async def _events(
    response: ResponseObject,
    chat: ChatRequest,
    run: ChatRun,
    first: SequenceOutput,
    rest: AsyncIterator[SequenceOutput],
) -> AsyncIterator[str]:
    events = ResponseEvents(response, chat.tools, run.seq.inputs.thinks)
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
        error = {"code": exc.code or exc.error_type, "message": exc.message, "param": exc.param}
    except Exception:  # the status line went out: the stream says it failed
        logger.exception("the response stream failed")
        error = {"code": "server_error", "message": SERVER_ERROR, "param": None}
    else:
        for event in events.end(output.finish_reason or "stop", run):
            yield event
        return
    for event in events.failed(error, run):
        yield event
