"""POST /v1/responses: OpenAI's Responses API, answered as a chat completion (see
server/api/responses.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.responses import (
    InputTokens,
    InputTokensRequest,
    ResponseEvents,
    ResponseObject,
    ResponsesRequest,
    completed,
    response_id,
)
from server.api.routes.chat import ERRORS
from server.api.services import Services, get_services
from server.api.sse import SSE_HEADERS, SSE_RESPONSE, event_stream
from server.api.translated import prompt_tokens, run_translated
from server.exceptions import ResponseNotFound
from server.pipelines.chat import ChatResult

router = APIRouter(responses={200: SSE_RESPONSE, **ERRORS})


@router.post("/v1/responses", response_model=ResponseObject, tags=["responses"])
async def create_response(
    body: ResponsesRequest, request: Request, services: Services = Depends(get_services)
) -> ResponseObject | StreamingResponse:
    rid = response_id()
    started = await run_translated(body, request, services)
    if isinstance(started, ChatResult):
        return completed(rid, body, started)
    chat, run = started.chat, started.run
    logprobs = (run.seq, services.chat.texts(chat)) if body.wants_logprobs else None
    events = ResponseEvents(
        ResponseObject.start(rid, body, chat.sampling), chat.tools, run.seq.inputs.thinks, logprobs
    )
    stream = event_stream(events, run, started.first, started.rest)
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/v1/responses/input_tokens", response_model=InputTokens, tags=["responses"])
async def count_input_tokens(
    body: InputTokensRequest, request: Request, services: Services = Depends(get_services)
) -> InputTokens:
    """The tokens the input would take (`client.responses.input_tokens.count`): the prompt
    built as /v1/responses builds it, images and videos read, nothing run."""
    if body.model is None:  # optional here, as in OpenAI's
        body = body.model_copy(update={"model": services.served_model_names[0]})
    return InputTokens(input_tokens=await prompt_tokens(body, request, services))


# A stored response asked for by id: a 404 that says why (nothing is stored here).
@router.get("/v1/responses/{response_id}", tags=["responses"])
@router.delete("/v1/responses/{response_id}", tags=["responses"])
@router.post("/v1/responses/{response_id}/cancel", tags=["responses"])
@router.get("/v1/responses/{response_id}/input_items", tags=["responses"])
async def stored_response(response_id: str) -> None:
    raise ResponseNotFound(response_id)
