"""POST /v1/responses: OpenAI's Responses API, answered as a chat completion (see
server/api/responses.py). Answers are stored (`store`, the default) for previous_response_id
and GET /v1/responses/{id} (see server/jobs/responses.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from server.api.responses import (
    InputItemList,
    InputTokens,
    InputTokensRequest,
    ResponseDeleted,
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
from server.exceptions import InvalidRequest, ResponseNotFound
from server.jobs.responses import BrokenChain, StoredTurn
from server.pipelines.chat import ChatResult

logger = logging.getLogger(__name__)
router = APIRouter(responses={200: SSE_RESPONSE, **ERRORS})


@router.post("/v1/responses", response_model=ResponseObject, tags=["responses"])
async def create_response(
    body: ResponsesRequest, request: Request, services: Services = Depends(get_services)
) -> ResponseObject | StreamingResponse:
    rid = response_id()
    store = body.store is not False and services.store_responses
    await continue_conversation(body, services)
    started = await run_translated(body, request, services)
    if isinstance(started, ChatResult):
        response = completed(rid, body, started, store)
        if store:
            await keep(response, body, services)
        return response
    chat, run = started.chat, started.run
    logprobs = (run.seq, services.chat.texts(chat)) if body.wants_logprobs else None
    events = ResponseEvents(
        ResponseObject.start(rid, body, chat.sampling, store),
        chat.tools,
        run.seq.inputs.thinks,
        logprobs,
    )
    stream = event_stream(events, run, started.first, started.rest)
    if store:
        stream = kept_before_the_last_event(stream, events.response, body, services)
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)


async def continue_conversation(body: ResponsesRequest, services: Services) -> None:
    """previous_response_id: the stored conversation goes before the body's input (the
    previous instructions do not: each request's own apply)."""
    if body.previous_response_id is None:
        return
    if not services.store_responses:
        raise InvalidRequest(
            "This server keeps no responses (it runs with --no-store-responses): send the "
            "whole conversation as input.",
            param="previous_response_id",
            code="unsupported_parameter",
        )
    try:
        turns = await asyncio.to_thread(services.jobs.conversation, body.previous_response_id)
    except BrokenChain as missing:
        raise ResponseNotFound(missing.response_id, param="previous_response_id") from None
    body.continue_from([item for turn in turns for item in conversation_items(turn)])


def conversation_items(turn: StoredTurn) -> list[dict[str, Any]]:
    return [*turn.input, *turn.response["output"]]


async def keep(response: ResponseObject, body: ResponsesRequest, services: Services) -> None:
    """Stores a finished response. Its answer is not lost when the store cannot take it: it
    goes out as not stored (store: false)."""
    try:
        await asyncio.to_thread(
            services.jobs.save_response, response.model_dump(), body.own_items()
        )
    except Exception:
        logger.exception("response %s could not be stored", response.id)
        response.store = False


async def kept_before_the_last_event(
    stream: AsyncIterator[str],
    response: ResponseObject,
    body: ResponsesRequest,
    services: Services,
) -> AsyncIterator[str]:
    """The stream, its finished response stored before its last event goes out: a client
    that continues it as soon as it reads response.completed finds it stored."""
    last = None
    async for event in stream:
        if last is not None:
            yield last
        last = event
    if response.status in ("completed", "incomplete"):
        await keep(response, body, services)
        last = _with_store_false(last) if not response.store else last
    if last is not None:
        yield last


def _with_store_false(event: str) -> str:
    """The last event (response.completed / .incomplete) telling that it was not stored."""
    kind, data = event.strip().split("\n", 1)
    fields = json.loads(data.removeprefix("data: "))
    fields["response"]["store"] = False
    return f"{kind}\ndata: {json.dumps(fields, ensure_ascii=False)}\n\n"


@router.post("/v1/responses/input_tokens", response_model=InputTokens, tags=["responses"])
async def count_input_tokens(
    body: InputTokensRequest, request: Request, services: Services = Depends(get_services)
) -> InputTokens:
    """The tokens the input would take (`client.responses.input_tokens.count`): the prompt
    built as /v1/responses builds it (previous_response_id's conversation included), images
    and videos read, nothing run."""
    if body.model is None:  # optional here, as in OpenAI's
        body = body.model_copy(update={"model": services.served_model_names[0]})
    await continue_conversation(body, services)
    return InputTokens(input_tokens=await prompt_tokens(body, request, services))


async def stored(response_id: str, services: Services) -> StoredTurn:
    turn = await asyncio.to_thread(services.jobs.get_response, response_id)
    if turn is None:
        raise ResponseNotFound(response_id)
    return turn


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, tags=["responses"])
async def retrieve_response(
    response_id: str, services: Services = Depends(get_services)
) -> ResponseObject:
    return ResponseObject.model_validate((await stored(response_id, services)).response)


@router.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, tags=["responses"])
async def delete_response(
    response_id: str, services: Services = Depends(get_services)
) -> ResponseDeleted:
    """Deletes a stored response (a conversation continued from it, or from a later one,
    can then no longer be continued)."""
    if not await asyncio.to_thread(services.jobs.delete_response, response_id):
        raise ResponseNotFound(response_id)
    return ResponseDeleted(id=response_id)


@router.get(
    "/v1/responses/{response_id}/input_items", response_model=InputItemList, tags=["responses"]
)
async def list_input_items(
    response_id: str,
    limit: int = Query(default=20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = Query(default=None, max_length=200, description="the last id seen"),
    services: Services = Depends(get_services),
) -> InputItemList:
    """The input items the response's own request sent (not the earlier turns'), newest
    first unless order=asc."""
    items = (await stored(response_id, services)).input
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidRequest(
                f"No input item {after!r} in response {response_id}.",
                param="after",
                code="invalid_value",
            )
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
    return InputItemList(data=page, first_id=first, last_id=last, has_more=len(items) > limit)


@router.post("/v1/responses/{response_id}/cancel", tags=["responses"])
async def cancel_response(response_id: str, services: Services = Depends(get_services)) -> None:
    await stored(response_id, services)
    raise InvalidRequest(
        f"Response {response_id} has ended: only a response still running in the background "
        "can be cancelled (this server runs none in the background).",
        param="response_id",
        code="invalid_value",
    )
