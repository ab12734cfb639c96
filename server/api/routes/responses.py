"""POST /v1/responses: OpenAI's Responses API, answered as a chat completion (see
server/api/responses.py). Answers are stored (`store`, the default) for previous_response_id
and GET /v1/responses/{id} (see server/jobs/responses.py)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from server.api.body import ThreadParsedRoute
from server.api.fields import check_metadata
from server.api.response_events import followed, opening_events
from server.api.responses import (
    InputItemList,
    InputTokens,
    InputTokensRequest,
    ResponseDeleted,
    ResponseEvents,
    ResponseObject,
    ResponsesRequest,
    completed,
    holder_of,
    response_id,
)
from server.api.routes.chat import ERRORS
from server.api.services import Services, get_services
from server.api.sse import SSE_RESPONSE, EventStream, named_event
from server.api.translated import fitted, prompt_tokens, run_translated
from server.exceptions import (
    ConversationNotFound,
    InvalidRequest,
    ItemNotFound,
    JobStoreUnavailable,
    KeepsNothing,
    PreviousResponseNotFound,
    ResponseNotFound,
)
from server.jobs import responses as response_store
from server.jobs.deliveries import Execute
from server.jobs.project import current_project
from server.jobs.responses import (
    MAX_CHAIN,
    RUNNING,
    BrokenChain,
    ConversationTooLong,
    StoredTurn,
    insert_events,
    insert_response,
)
from server.log import INTERNAL, request_id_var
from server.pipelines.background import EVENTS_SAVED, NO_ANSWER
from server.pipelines.background import KIND as BACKGROUND
from server.pipelines.chat import ChatRequest, ChatResult
from server.pipelines.conversation_lock import ConversationLock

logger = logging.getLogger(__name__)
router = APIRouter(route_class=ThreadParsedRoute, responses={200: SSE_RESPONSE, **ERRORS})


@router.post("/v1/responses", response_model=ResponseObject, tags=["responses"])
async def create_response(
    body: ResponsesRequest,
    request: Request,
    idempotency_key: str | None = Header(
        default=None, max_length=200, description="background: the same response for the same key"
    ),
    services: Services = Depends(get_services),
) -> ResponseObject | StreamingResponse:
    check_metadata(body.metadata)
    if body.background:
        response = await start_in_background(body, services, idempotency_key)
        return following(response.id, -1, request, services) if body.stream else response
    rid = _run_id(request)
    store = body.store is not False and services.store_responses
    lock = await taken_conversation(body, services, rid, bool(request.scope.get(INTERNAL)))
    try:
        return await _respond(rid, store, body, request, services, lock)
    except BaseException:
        if lock is not None:
            lock.release_soon()
        raise


def _run_id(request: Request) -> str:
    """A new response's id. A background response's run (the server's own request, with its
    job's id, the stored response's, as its request id) answers as that response: its items'
    ids name it (item_reference)."""
    given = request_id_var.get()
    if request.scope.get(INTERNAL) and given.startswith("resp_"):
        return given
    return response_id()


async def taken_conversation(
    body: ResponsesRequest, services: Services, holder: str, wait: bool
) -> ConversationLock | None:
    """The conversation the response continues, held for its turn (None: it continues none).
    wait: the server's own request (a batch's line) queues for its turn, without a limit."""
    if body.conversation_id is None or not services.store_responses:
        return None  # (without a store, continue_conversation's 400)
    _check_ids(body)
    lock = ConversationLock(services.jobs, body.conversation_id, holder, current_project())
    await lock.take(wait)
    return lock


async def _respond(
    rid: str,
    store: bool,
    body: ResponsesRequest,
    request: Request,
    services: Services,
    lock: ConversationLock | None,
) -> ResponseObject | StreamingResponse:
    await continue_conversation(body, services)
    await resolve_references(body, services)
    started = await run_translated(body, request, services)
    if isinstance(started, ChatResult):
        response = completed(rid, body, started, store)
        await record(response, body, services)
        if lock is not None:
            await lock.release()
        return response
    chat, run = started.chat, started.run
    logprobs = (run.seq, services.chat.texts(chat)) if body.wants_logprobs else None
    events = ResponseEvents(
        ResponseObject.start(rid, body, chat.sampling, store),
        chat.tools,
        run.seq.inputs.thinks,
        logprobs,
        run.think_close_id if run.seq.inputs.thinks else None,
        body.namespaced,
        body.reasoning_shown,
    )
    if store:  # visible (in_progress) while it streams; not stored if the store cannot take it
        events.response.store = await asyncio.to_thread(
            _kept,
            services.jobs.save_response,
            rid,
            events.response.model_dump(),
            body.own_items(rid),
            current_project(),
        )
    stream = started.events(events, body)
    if store or body.conversation_id is not None:
        if lock is not None:
            lock.pause()  # the stream renews and releases it
        stream = recorded_as_it_ends(stream, events.response, body, services, lock)
    return EventStream(stream)


async def start_in_background(
    body: ResponsesRequest, services: Services, idempotency_key: str | None = None
) -> ResponseObject:
    """background: the response stored as queued and run as a durable job; the client polls
    GET /v1/responses/{id} and may cancel it. A retry with the same Idempotency-Key (and
    body) gets the same response, as it stands. The checks a request gets before it runs are
    made here, so a bad request is still a 4xx (text and max_output_tokens past the context
    too); what only running finds (media that cannot be read, images past the context) makes
    the response failed."""
    if body.store is False or not services.store_responses:
        raise InvalidRequest(
            "background needs its response stored (store: true, on a server that stores "
            "responses): it is read back with GET /v1/responses/{id}.",
            param="background",
            code="invalid_value",
        )
    await continue_conversation(body, services)
    await resolve_references(body, services)

    async def checked(chat: ChatRequest) -> ChatRequest:
        # known without running: the grammar compiles, the text and max tokens fit (shortened
        # by truncation "auto" as the job's run will shorten it)
        await services.chat.check_for_job(chat)
        return chat

    chat = await fitted(body, services, checked)
    response = ResponseObject.start(response_id(), body, chat.sampling, store=True)
    response.status, response.background = "queued", True
    request = body.model_dump(mode="json", by_alias=True, exclude_none=True, warnings=False)
    request |= {"background": False, "store": False, "stream": bool(body.stream)}
    jobs, items, queued = services.jobs, body.own_items(response.id), response.model_dump()
    project = current_project()

    def stored_with_it(execute: Execute) -> None:
        insert_response(execute, jobs.now(), queued, items, project)
        insert_events(execute, response.id, 0, opening_events(queued))

    job = await asyncio.to_thread(
        jobs.create,
        BACKGROUND,
        {"body": request},
        idempotency_key,
        job_id=response.id,
        also=stored_with_it,
        project=project,
    )
    services.job_worker.notify()
    if job.id != response.id:  # the key's earlier response
        return ResponseObject.model_validate(await settled(job.id, services))
    return response


async def continue_conversation(body: ResponsesRequest, services: Services) -> None:
    """previous_response_id's stored conversation, or the conversation's items, go before the
    body's input (the previous instructions do not: each request's own apply)."""
    _check_ids(body)
    if body.conversation_id is not None:
        if not services.store_responses:
            raise KeepsNothing("conversation")
        items = await asyncio.to_thread(
            services.jobs.conversation_items, body.conversation_id, current_project()
        )
        if items is None:
            raise ConversationNotFound(body.conversation_id, param="conversation")
        body.continue_from(items)
        return
    if body.previous_response_id is None:
        return
    if not services.store_responses:
        raise KeepsNothing("previous_response_id")
    try:
        turns = await asyncio.to_thread(
            services.jobs.conversation, body.previous_response_id, current_project()
        )
    except BrokenChain as missing:
        raise PreviousResponseNotFound(missing.response_id) from None
    except ConversationTooLong:
        raise InvalidRequest(
            f"The conversation of previous_response_id has more than {MAX_CHAIN} turns: send "
            "what it needs as input instead.",
            param="previous_response_id",
            code="invalid_value",
        ) from None
    for turn in turns:
        status = turn.response["status"]
        if status in RUNNING:  # (a background run whose job ended without writing: failed)
            status = (await settled(turn.response["id"], services))["status"]
        if status not in ("completed", "incomplete"):
            raise InvalidRequest(
                f"Previous response {turn.response['id']} is {status}: only a completed (or "
                "incomplete) response can be continued.",
                param="previous_response_id",
                code="invalid_value",
            )
    body.continue_from([item for turn in turns for item in turn_items(turn)])


async def resolve_references(body: ResponsesRequest, services: Services) -> None:
    """Each item_reference in the input replaced by the stored item it names: an item of a
    stored response of this project, its input's or its output's (the Vercel AI SDK sends
    an earlier answer so when its responses are stored). An unknown one: 404."""
    references = body.references()
    if not references:
        return
    if not services.store_responses:
        raise KeepsNothing(f"input[{references[0][0]}]")
    turns: dict[str, StoredTurn | None] = {}
    for index, item_id in references:
        holder = holder_of(item_id)
        if holder is not None and holder not in turns:
            turns[holder] = await asyncio.to_thread(
                services.jobs.get_response, holder, current_project()
            )
        turn = turns.get(holder) if holder is not None else None
        items = turn_items(turn) if turn is not None else []
        found = next((item for item in items if item.get("id") == item_id), None)
        if found is None:
            raise ItemNotFound(item_id, param=f"input[{index}]")
        body.resolve(index, found)


def _check_ids(body: ResponsesRequest) -> None:
    """The ids' shapes, and not both (a 400 before either is looked up or locked)."""
    if body.conversation_id is not None and body.previous_response_id is not None:
        raise InvalidRequest(
            "conversation and previous_response_id both set: a response continues one of them.",
            param="conversation",
            code="invalid_value",
        )
    for param, given, prefix in (
        ("previous_response_id", body.previous_response_id, "resp"),
        ("conversation", body.conversation_id, "conv"),
    ):
        if given is not None and not given.startswith(prefix):  # (OpenAI's 400, not a 404)
            raise InvalidRequest(
                f"Invalid '{param}': '{given}'. Expected an ID that begins with '{prefix}'.",
                param=param,
                code="invalid_value",
            )


def turn_items(turn: StoredTurn) -> list[dict[str, Any]]:
    """A stored turn's items: its request's, then its answer's."""
    return [*turn.input, *turn.response["output"]]


async def record(
    response: ResponseObject, body: ResponsesRequest, services: Services, started: bool = False
) -> None:
    """A finished response stored (store; started: its row, saved as it began, updated), and
    its input and output items added to its conversation. Its answer is not lost when the
    store cannot take it: it goes out as not stored (store: false); its conversation goes
    without it (the log says so)."""
    project = current_project()
    if response.store:
        jobs, stored = services.jobs, response.model_dump()
        if started:
            response.store = await asyncio.to_thread(
                _kept, jobs.update_response, response.id, stored
            )
        else:
            response.store = await asyncio.to_thread(
                _kept, jobs.save_response, response.id, stored, body.own_items(response.id), project
            )
    if body.conversation_id is not None:
        items = body.own_items(response.id) + list(response.output)
        try:
            added = await asyncio.to_thread(
                services.jobs.add_items, body.conversation_id, items, project
            )
            if not added:
                logger.warning("response %s: its conversation is gone", response.id)
        except Exception:
            logger.exception("response %s: its conversation could not take it", response.id)


# The event that ends a stream whose answer is in, and the one that ends a stream that failed.
FINAL_EVENTS = ("event: response.completed\n", "event: response.incomplete\n")
FAILED_EVENT = "event: response.failed\n"


async def recorded_as_it_ends(
    stream: AsyncIterator[str],
    response: ResponseObject,
    body: ResponsesRequest,
    services: Services,
    lock: ConversationLock | None = None,
) -> AsyncIterator[str]:
    """The stream as it comes, its end recorded (and its conversation's lock released) before
    its final event goes out (a client that continues it as soon as it reads
    response.completed finds it): answered, failed, or cancelled when the client went away
    (its row, saved as it began, is not left in_progress)."""
    started, ended = response.store, False
    renewing = asyncio.create_task(_renewed(response.id, services)) if started else None
    if lock is not None:
        lock.renew()
    try:
        async for event in stream:
            if event.startswith(FINAL_EVENTS):
                ended, stored = True, response.store
                await _landing(record(response, body, services, started))
                event = event if response.store == stored else _with_store_false(event)
            elif event.startswith(FAILED_EVENT) and started:
                ended = True
                failed = response.model_dump()
                update = services.jobs.update_response
                await _landing(asyncio.to_thread(_kept, update, response.id, failed))
            if lock is not None and event.startswith((*FINAL_EVENTS, FAILED_EVENT)):
                await lock.release()
            yield event
    finally:
        if lock is not None:
            lock.release_soon()  # (the client went away: nothing if released already)
        if renewing is not None:
            renewing.cancel()
        if started and not ended:  # (no await here: this task may be being cancelled)
            cancelled = response.model_copy(update={"status": "cancelled"}).model_dump()
            asyncio.get_running_loop().run_in_executor(
                None, _kept, services.jobs.update_response, response.id, cancelled
            )


async def _landing(write: Awaitable[object]) -> None:
    """A stream's end written even if its client goes away meanwhile (Starlette then cancels
    the stream): in a task of its own. Cancelled while it waited for a thread, the write
    never ran, and the row, its end being written, was not marked cancelled either: it stayed
    in_progress for good."""
    await asyncio.shield(asyncio.ensure_future(write))


async def _renewed(response_id: str, services: Services) -> None:
    """A stream's stored row renewed while it runs, so that a row that is not (its server
    stopped) is known by its age (`settled`). A renewal the store cannot take is logged; the
    next one may."""
    while True:
        await asyncio.sleep(response_store.STREAM_LEASE_S / 4)
        try:
            await asyncio.to_thread(services.jobs.renew_response, response_id)
        except Exception as exc:
            logger.warning("response %s: its stream's lease was not renewed: %s", response_id, exc)


def _kept(write: Callable[..., object], response_id: str, *args: Any) -> bool:
    """A write of a response's to the store; False (logged) when the store cannot take it:
    the answer still goes out, as not stored."""
    try:
        write(*args)
    except JobStoreUnavailable:  # (an outage: one line, not a traceback per response)
        logger.warning("response %s not stored: the job store is unavailable", response_id)
        return False
    except Exception:
        logger.exception("response %s could not be stored", response_id)
        return False
    return True


def _with_store_false(event: str) -> str:
    """The last event (response.completed / .incomplete) telling that it was not stored."""
    kind, data = event.strip().split("\n", 1)
    fields = json.loads(data.removeprefix("data: "))
    fields["response"]["store"] = False
    return named_event(kind.removeprefix("event: "), fields)


@router.post("/v1/responses/compact", tags=["responses"])
async def compact_response() -> None:
    """OpenAI's compaction (`client.responses.compact`), named rather than a bare 405 from the
    path of a response's id: it is not served."""
    raise InvalidRequest(
        "Compaction (POST /v1/responses/compact) is not supported by this server: send the "
        "conversation as it is (previous_response_id, a conversation, or truncation: auto).",
        code="unsupported_endpoint",
    )


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
    await resolve_references(body, services)
    return InputTokens(input_tokens=await prompt_tokens(body, request, services))


async def stored(response_id: str, services: Services) -> StoredTurn:
    turn = await asyncio.to_thread(services.jobs.get_response, response_id, current_project())
    if turn is None:
        raise ResponseNotFound(response_id)
    return turn


# The error of a stream whose server stopped before it ended (its lease ran out).
STREAM_LOST = {
    "code": "server_error",
    "message": "The server streaming this response stopped before the response ended.",
}


async def settled(response_id: str, services: Services) -> dict[str, Any]:
    """A stored response as it stands. One still running that will never end is failed: a
    background one whose job has ended (its last write lost to a store outage) or is gone,
    a stream whose lease ran out (its server stopped before writing the end)."""
    turn = await stored(response_id, services)
    response = turn.response
    if response["status"] not in RUNNING or not await _abandoned(turn, services):
        return response
    error = NO_ANSWER if response.get("background") else STREAM_LOST
    failed = {**response, "status": "failed", "error": error}
    # (a stream only if it was not renewed meanwhile: a slow server's stream still runs)
    unused_since = None if response.get("background") else turn.used_at + 1e-6
    update = functools.partial(services.jobs.update_response, unused_since=unused_since)
    if await asyncio.to_thread(update, failed):
        return failed
    return (await stored(response_id, services)).response  # it ended (or was renewed)


async def _abandoned(turn: StoredTurn, services: Services) -> bool:
    """A running response that nothing runs any more."""
    if not turn.response.get("background"):
        return services.jobs.now() - turn.used_at > response_store.STREAM_LEASE_S
    job = await asyncio.to_thread(services.jobs.get, turn.response["id"])
    return job is None or job.status not in ("queued", "processing")


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, tags=["responses"])
async def retrieve_response(
    response_id: str,
    request: Request,
    stream: bool = Query(default=False, description="a background response's events"),
    starting_after: int = Query(
        default=-1, ge=-1, lt=2**63, description="stream: after this event"
    ),
    services: Services = Depends(get_services),
) -> ResponseObject | StreamingResponse:
    """A stored response; a background one as it stands (queued, in_progress, then its end),
    or (stream) its events, from after `starting_after` on, as the run saves them."""
    response = await settled(response_id, services)
    if not stream:
        return ResponseObject.model_validate(response)
    if not response.get("background"):
        raise InvalidRequest(
            f"Response {response_id} was not made in the background: only a background "
            "response's events can be streamed (GET it whole instead).",
            param="stream",
            code="invalid_value",
        )
    return following(response_id, starting_after, request, services)


def following(
    response_id: str, after: int, request: Request, services: Services
) -> StreamingResponse:
    """A background response's events after `after`, followed as they are saved."""
    events = followed(
        services.jobs,
        response_id,
        after,
        functools.partial(settled, response_id, services),
        lambda: bool(request.app.state.draining),
    )
    return EventStream(events)


@router.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, tags=["responses"])
async def delete_response(
    response_id: str, services: Services = Depends(get_services)
) -> ResponseDeleted:
    """Deletes a stored response (a conversation continued from it, or from a later one,
    can then no longer be continued); a background one still running is stopped."""
    if not await asyncio.to_thread(services.jobs.delete_response, response_id, current_project()):
        raise ResponseNotFound(response_id)
    await stop_background(response_id, services)
    return ResponseDeleted(id=response_id)


async def stop_background(response_id: str, services: Services) -> None:
    """Its job (if it has one still running) cancelled in the store, where every replica's
    worker sees it, and stopped at once if it runs here."""
    await asyncio.to_thread(services.jobs.cancel, response_id)
    services.job_worker.cancel_running(response_id)
    EVENTS_SAVED.notify(response_id)  # (its followers here end now)


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
    """The items the response was made from, newest first unless order=asc: the earlier
    turns' inputs and outputs (as far as they are stored), then its own request's."""
    try:
        turns = await asyncio.to_thread(
            services.jobs.conversation, response_id, current_project(), False
        )
    except BrokenChain:
        raise ResponseNotFound(response_id) from None
    except ConversationTooLong:
        turns = [await stored(response_id, services)]  # (its own items, at least)
    items = [item for turn in turns[:-1] for item in turn_items(turn)]
    items += turns[-1].input
    return InputItemList.page(items, limit, order, after, f"response {response_id}")


@router.post(
    "/v1/responses/{response_id}/cancel", response_model=ResponseObject, tags=["responses"]
)
async def cancel_response(
    response_id: str, services: Services = Depends(get_services)
) -> ResponseObject:
    """A background response stopped (cancelled); one that has ended is answered as it is."""
    response = await settled(response_id, services)
    if not response.get("background"):
        raise InvalidRequest(
            f"Response {response_id} was not made in the background: only a background "
            "response can be cancelled.",
            param="response_id",
            code="invalid_value",
        )
    cancelled = {**response, "status": "cancelled"}
    if await asyncio.to_thread(services.jobs.update_response, cancelled):
        await stop_background(response_id, services)
        response = cancelled
    else:  # it ended meanwhile (or was never running): as it stands
        response = (await stored(response_id, services)).response
    return ResponseObject.model_validate(response)
