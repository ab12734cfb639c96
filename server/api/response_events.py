"""A background response's events, as a client follows them: POST /v1/responses with
background and stream, and GET /v1/responses/{id}?stream=true&starting_after=n. The events are
in the job store (server/jobs/responses.py): its response.created and response.queued, saved
with it; each attempt of its job's response.in_progress, then (a run that streams) the run's
events as they are saved (pipelines/background.py), the last written with the answer. A
client reads them from any replica, and goes on after a hang-up from the last it read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from server.api.responses import event
from server.exceptions import JobStoreUnavailable, ResponseNotFound
from server.jobs.responses import RUNNING
from server.jobs.store import JobStore
from server.pipelines.background import EVENTS_SAVED

# A follower looks again at once when this server saves its response's events, else after a
# wait that doubles from FIRST_LOOK_S to LAST_LOOK_S while nothing comes (another replica's run,
# a queued one); it asks whether the run still runs every SETTLE_S.
FIRST_LOOK_S = 0.05
LAST_LOOK_S = 1.0
SETTLE_S = 2.0
# The event that ends a followed stream, by how its response ended (a cancelled one just ends).
END_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
}
END_PREFIXES = tuple(f"event: {kind}\n" for kind in END_EVENTS.values())
RESTARTED = {
    "code": "server_error",
    "message": "The background run started over (its server stopped): stream the response "
    "again from the start, or GET it once it ends.",
    "param": None,
}
SHUTTING_DOWN = {
    "code": "server_shutting_down",
    "message": "This server is shutting down: go on from the last event read (starting_after) "
    "on another server, or once it is back; the response runs on.",
    "param": None,
}
STORE_DOWN = {
    "code": "job_store_unavailable",
    "message": "The job store cannot be read: go on from the last event read (starting_after).",
    "param": None,
}


def opening_events(response: dict[str, Any]) -> list[tuple[int, str]]:
    """A queued background response's first events, saved with it (job attempt 0)."""
    return [
        (0, event("response.created", 0, response=response)),
        (1, event("response.queued", 1, response=response)),
    ]


async def followed(
    jobs: JobStore,
    response_id: str,
    after: int,
    settle: Callable[[], Awaitable[dict[str, Any]]],
    stopping: Callable[[], bool],
) -> AsyncIterator[str]:
    """The response's events numbered after `after`, as they are saved, until its last. One
    that ended with no last event saved (it did not stream, or failed before it could) gets
    one made from the stored response. A run that started over after the events a client
    read (its server stopped) ends that client's stream with an error: what was sent cannot
    be taken back. `settle` fails a run whose job is gone; `stopping`: this server drains."""
    seen: int | None = None  # the job attempt whose events were sent (0: the opening ones)
    wait_s, settled_at, first = FIRST_LOOK_S, time.monotonic(), True
    while True:
        try:
            look = await asyncio.to_thread(jobs.events_after, response_id, after)
        except JobStoreUnavailable:
            yield event("error", after + 1, **STORE_DOWN)
            return
        if look.status is None:  # deleted
            return
        if first:
            first, seen = False, look.attempt_at or None
            if look.attempt_at is None and 0 <= after <= look.last_number:  # (its run's: gone)
                yield event("error", after + 1, **RESTARTED)
                return
        for number, attempt, text in look.events:
            if attempt and seen not in (None, attempt):
                yield event("error", after + 1, **RESTARTED)
                return
            seen, after = attempt or seen, number
            yield text
            if text.startswith(END_PREFIXES):
                return
        if not look.events and look.status not in RUNNING:
            # An end to make: it ended without one saved, and this client did not get the
            # one made before (numbered past the last saved event).
            unsaved = look.status in END_EVENTS and not look.last_event.startswith(END_PREFIXES)
            response = await _stored(jobs, response_id) if unsaved else None
            if response is not None and after <= look.last_number:
                yield event(END_EVENTS[look.status], look.last_number + 1, response=response)
            return
        if stopping():
            yield event("error", after + 1, **SHUTTING_DOWN)
            return
        wait_s = FIRST_LOOK_S if look.events else min(2 * wait_s, LAST_LOOK_S)
        if time.monotonic() - settled_at >= SETTLE_S:
            settled_at = time.monotonic()
            try:
                await settle()  # (a run whose job is gone is failed: the next look ends it)
            except ResponseNotFound:
                return
            except JobStoreUnavailable:
                yield event("error", after + 1, **STORE_DOWN)
                return
        await EVENTS_SAVED.wait(response_id, wait_s)


async def _stored(jobs: JobStore, response_id: str) -> dict[str, Any] | None:
    turn = await asyncio.to_thread(jobs.get_response, response_id)
    return turn.response if turn is not None else None
