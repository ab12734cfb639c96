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
from server.api.routes.chat import ERRORS, translated_request, until_disconnected
from server.api.services import Services, get_services
from server.api.sse import SSE_HEADERS, SSE_RESPONSE, event_stream
from server.exceptions import ResponseNotFound, ServerError

router = APIRouter(responses={200: SSE_RESPONSE, **ERRORS})


@router.post("/v1/responses", response_model=ResponseObject, tags=["responses"])
async def create_response(
    body: ResponsesRequest, request: Request, services: Services = Depends(get_services)
) -> ResponseObject | StreamingResponse:
    rid = response_id()
    try:
        chat = translated_request(body, services)
        if not body.stream:
            result = await until_disconnected(request, services.chat.complete(chat))
            return completed(rid, body, result)
        run = await until_disconnected(request, services.chat.start(chat))
        outputs = services.chat.outputs(run.seq)
        # Wait for the first token before answering 200, so a queue timeout is still a 503.
        first = await until_disconnected(request, anext(outputs))
    except ServerError as exc:  # the chat route names its own fields
        body.name_error(exc)
        raise
    logprobs = (run.seq, services.chat.texts(chat)) if body.wants_logprobs else None
    events = ResponseEvents(
        ResponseObject.start(rid, body, chat.sampling), chat.tools, run.seq.inputs.thinks, logprobs
    )
    stream = event_stream(events, run, first, outputs)
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/v1/responses/input_tokens", response_model=InputTokens, tags=["responses"])
async def count_input_tokens(
    body: InputTokensRequest, request: Request, services: Services = Depends(get_services)
) -> InputTokens:
    """The tokens the input would take (`client.responses.input_tokens.count`): the prompt
    built as /v1/responses builds it, images and videos read, nothing run."""
    if body.model is None:  # optional here, as in OpenAI's
        body = body.model_copy(update={"model": services.served_model_names[0]})
    try:
        chat = translated_request(body, services)
        inputs = await until_disconnected(request, services.chat.prompt(chat))
    except ServerError as exc:
        body.name_error(exc)
        raise
    return InputTokens(input_tokens=inputs.num_prompt_tokens)


# A stored response asked for by id: a 404 that says why (nothing is stored here).
@router.get("/v1/responses/{response_id}", tags=["responses"])
@router.delete("/v1/responses/{response_id}", tags=["responses"])
@router.post("/v1/responses/{response_id}/cancel", tags=["responses"])
@router.get("/v1/responses/{response_id}/input_items", tags=["responses"])
async def stored_response(response_id: str) -> None:
    raise ResponseNotFound(response_id)
