"""Background responses (the Responses API's `background: true`): the response is stored as
queued, in the transaction that queues its durable job (kind `response`, the job's id the
response's), so it survives a restart and runs on whichever replica claims it. The job sends
the request through the app's own /v1/responses route (as a batch's lines go), a
conversation's items read at that moment as the start of its input, then writes the answer
into the stored response, which GET /v1/responses/{id} polls, and the response's items into
its conversation, in one transaction. A cancel or a delete wins over an answer that comes after
it (server/jobs/responses.py writes only while the response runs), and a run that fails for
any other reason than an engine stopping leaves the response failed, never running.

One asked to stream (`stream: true` too) is sent streamed (pipelines/loopback.py), and its
events are saved in the job store as they come, for clients to follow from any replica
(api/response_events.py); its last event is saved with the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from server.api.responses import event, response_error
from server.exceptions import ConversationNotFound, EngineStopped, JobStoreUnavailable
from server.jobs.responses import StoredTurn
from server.jobs.store import Job, JobStore
from server.jobs.worker import Handler, Progress
from server.pipelines.batch import Dispatch, send_until_served, wait_to_retry
from server.pipelines.conversation_lock import ConversationLock
from server.pipelines.loopback import StreamDispatch, sse_blocks

logger = logging.getLogger(__name__)

KIND = "response"
ANSWERED = ("completed", "incomplete")
# What a run that ended without an answer says (the server log has the reason).
NO_ANSWER = response_error(
    "server_error", "The background run failed; see the server log.", None, "server_error"
)


def background_response_handler(
    store: JobStore,
    dispatch: Dispatch,
    job_priority: int | None = None,
    open_stream: StreamDispatch | None = None,
) -> Handler:
    """What the job worker runs for a background response: its request, at the body's
    priority or else job_priority (None: priorities are not looked at); one that streams
    through `open_stream`, its events saved as they come."""

    async def handle(job: Job, progress: Progress) -> dict[str, Any]:
        stored = await asyncio.to_thread(store.get_response, job.id, job.project)
        if stored is None:
            return {"response_id": job.id}  # deleted before it ran
        conversation_id = (stored.response.get("conversation") or {}).get("id")
        if conversation_id is None:
            return await respond(job, stored)
        # Its turn in the conversation: queued (as it stays) until the turn before has ended.
        # (each attempt its own holder: an earlier one, cancelled late, releases only its own)
        lock = ConversationLock(store, conversation_id, f"{job.id}:{job.attempt}", job.project)
        with contextlib.suppress(ConversationNotFound):  # (the run then fails, saying so)
            await lock.take(wait=True)
        try:
            result = await respond(job, stored)
            await lock.release()
            return result
        finally:
            lock.release_soon()  # (failed or cancelled; nothing once released)

    async def respond(job: Job, stored: StoredTurn) -> dict[str, Any]:
        running = {**stored.response, "status": "in_progress"}
        if not await asyncio.to_thread(store.update_response, running, None, job.attempt):
            return {"response_id": job.id}  # cancelled before it ran (or not this attempt's)
        try:
            final, conversation, last_events = await run(job, stored, running)
        except (asyncio.CancelledError, EngineStopped, JobStoreUnavailable):
            raise  # cancelled (the cancel wrote its status), or back to the queue
        except Exception:
            logger.exception("background response %s failed", job.id)
            failed = {**running, "status": "failed", "error": NO_ANSWER}
            await asyncio.to_thread(store.update_response, failed, None, job.attempt)
            EVENTS_SAVED.notify(job.id)
            raise
        if final is None:  # a stream whose response ended elsewhere (cancelled, deleted)
            return {"response_id": job.id}
        await asyncio.to_thread(
            store.update_response, final, conversation, job.attempt, last_events
        )
        EVENTS_SAVED.notify(job.id)  # (its followers here: the end is in)
        return {"response_id": job.id, "status": final["status"]}

    async def run(
        job: Job, stored: StoredTurn, running: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, tuple[str, list[dict[str, Any]]] | None, Events]:
        """The answered response (None: it ended elsewhere while it streamed), (its
        conversation's id, the items to add to it), and a stream's last events (saved with
        the answer, so a client that reads the last one finds the answer stored)."""
        body = job.request["body"]
        conversation_id = (running.get("conversation") or {}).get("id")
        if conversation_id is not None:
            history = await asyncio.to_thread(
                store.conversation_items, conversation_id, job.project
            )
            if history is None:
                error = response_error(
                    "conversation_not_found",
                    "The conversation is gone.",
                    "conversation",
                    "invalid_request_error",
                )
                return {**running, "status": "failed", "error": error}, None, []
            body = {**body, "input": [*history, *stored.input]}
            body.pop("conversation", None)
        if job_priority is not None and body.get("priority") is None:
            body = {**body, "priority": job_priority}
        last_events: Events = []
        if body.get("stream") and open_stream is not None:
            status, answer, last_events = await stream_until_served(
                open_stream, body, job, running, store
            )
            if answer is None:
                return None, None, []
        else:
            status, answer = await send_until_served(dispatch, "/v1/responses", body, job.id)
        final = answered(running, status, answer)
        if conversation_id is None:
            return final, None, last_events
        if final["status"] not in ANSWERED:
            final["error"] = named_in_conversation(final["error"], history)
            return final, None, last_events
        return final, (conversation_id, [*stored.input, *final["output"]]), last_events

    return handle


Events = list[tuple[int, str]]  # a stream's events: (sequence number, the event as sent)
# The event that ends a response's stream, by how the response ended (a cancel: none).
END_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
}
SAVE_EVERY_S = 0.05  # a stream's events are saved in batches at most this far apart


async def stream_until_served(
    open_stream: StreamDispatch,
    body: dict[str, Any],
    job: Job,
    running: dict[str, Any],
    store: JobStore,
) -> tuple[int, dict[str, Any] | None, Events]:
    """A background response's request streamed, sent again while the engine is busy (as
    send_until_served): (status, the answer, the events still to save with it). The attempt
    starts with its in_progress event; the run's events after its own created and
    in_progress (the client had those) are saved as they come, numbered on. None for the
    answer when the response ended elsewhere meanwhile (cancelled, deleted, or another
    attempt holds the job)."""

    def in_progress(number: int) -> str:
        return event("response.in_progress", number, response=running)

    first = await asyncio.to_thread(store.start_events, job.id, job.attempt, in_progress)
    if first < 0:
        return 200, None, []
    EVENTS_SAVED.notify(job.id)
    retries = 0
    while True:
        async with open_stream("/v1/responses", body, job.id) as (status, chunks):
            if status == 200:
                saver = EventSaver(job, running, store, first)
                answer, last = await saver.save(sse_blocks(chunks))
                return status, answer, last
            try:
                answer = json.loads(b"".join([chunk async for chunk in chunks]))
            except ValueError:
                answer = {"error": {"message": "The response failed.", "type": "server_error"}}
        if status != 503:
            return status, answer, []
        await wait_to_retry(answer, retries)
        retries += 1


# The run's own first events: its attempt has sent them already (as the stored response's).
RUN_OPENING = ("response.created", "response.in_progress")


class EventSaver:
    """A streamed run's events saved in batches, at most SAVE_EVERY_S apart (a stall saves
    what came before it), each with the stored response in place of the run's own."""

    def __init__(self, job: Job, running: dict[str, Any], store: JobStore, first: int):
        self.job, self.running, self.store = job, running, store
        self.numbers = itertools.count(first)

    async def save(self, blocks: AsyncIterator[str]) -> tuple[dict[str, Any] | None, Events]:
        """(the answer, the events left to save with it), or (None, []) when the response
        ended elsewhere."""
        pending: Events = []
        saved_at = time.monotonic()
        coming = asyncio.ensure_future(anext(blocks, None))
        try:
            while True:
                wait = max(0.0, saved_at + SAVE_EVERY_S - time.monotonic()) if pending else None
                if not (await asyncio.wait({coming}, timeout=wait))[0]:  # a stall: save now
                    if not await self._saved(pending):
                        return None, []
                    pending, saved_at = [], time.monotonic()
                    continue
                if (block := coming.result()) is None:
                    raise RuntimeError("the response's stream ended without its last event")
                coming = asyncio.ensure_future(anext(blocks, None))
                kind, data = _parsed(block)
                if kind is None or kind in RUN_OPENING:
                    continue
                if isinstance(data.get("response"), dict):
                    data["response"] = answered(self.running, 200, data["response"])
                number = next(self.numbers)
                fields = {k: v for k, v in data.items() if k not in ("type", "sequence_number")}
                pending.append((number, event(kind, number, **fields)))
                if kind in END_EVENTS.values():
                    return data["response"], pending
                if time.monotonic() - saved_at >= SAVE_EVERY_S:
                    if not await self._saved(pending):
                        return None, []
                    pending, saved_at = [], time.monotonic()
        finally:
            if not coming.done():
                coming.cancel()
            elif not coming.cancelled():
                coming.exception()  # (retrieved: the stream's own failure, if any, is moot now)

    async def _saved(self, events: Events) -> bool:
        saved = await asyncio.to_thread(
            self.store.add_events, self.job.id, self.job.attempt, events
        )
        EVENTS_SAVED.notify(self.job.id)
        return saved


def _parsed(block: str) -> tuple[str | None, dict[str, Any]]:
    """One event's type and data (None: a block with no data, such as a comment)."""
    fields = dict(line.split(": ", 1) for line in block.strip().split("\n") if ": " in line)
    if "data" not in fields:
        return None, {}
    data = json.loads(fields["data"])
    return fields.get("event", data.get("type", "")), data


class Wakeups:
    """The clients following a response's events on this server, woken as soon as this
    server saves some (others look again after a while: see api/response_events.py)."""

    def __init__(self) -> None:
        self.waiting: dict[str, set[asyncio.Event]] = {}

    def notify(self, response_id: str) -> None:
        for waiter in self.waiting.get(response_id, ()):
            waiter.set()

    @contextlib.contextmanager
    def watching(self, response_id: str) -> Iterator[asyncio.Event]:
        """An event set at the response's next save here (registered before the caller
        looks at what is saved, so a save during the look is not missed)."""
        waiter = asyncio.Event()
        self.waiting.setdefault(response_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self.waiting[response_id]
            waiters.discard(waiter)
            if not waiters:
                del self.waiting[response_id]


EVENTS_SAVED = Wakeups()


def named_in_conversation(error: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """An error of the run, naming the conversation's items as the client knows them: the
    run's input[i] is the conversation's item i, then the request's own input."""

    def name(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if index < len(history):
            return f"conversation item {history[index].get('id')}"
        return f"input[{index - len(history)}]"

    return {**error, "message": INPUT_INDEX.sub(name, error.get("message", ""))}


INPUT_INDEX = re.compile(r"input\[(\d+)\]")


def answered(running: dict[str, Any], status: int, answer: dict[str, Any]) -> dict[str, Any]:
    """The stored response once its request was answered: the answer's output, usage and
    status, or failed with the error the request got."""
    if status != 200:
        error = answer.get("error") or {}
        message = error.get("message") or "The response failed."
        shown = response_error(error.get("code"), message, error.get("param"), error.get("type"))
        return {**running, "status": "failed", "error": shown}
    kept = ("status", "output", "usage", "completed_at", "incomplete_details", "error")
    return {**running, **{key: answer.get(key) for key in kept}}
