"""A background response's events, as a client follows them: POST /v1/responses with
background and stream, and GET /v1/responses/{id}?stream=true&starting_after=n. The events are
in the job store (server/jobs/responses.py): its response.created and response.queued, saved
with it; then, a run that streams, each attempt's response.in_progress and the run's events
as they are saved (pipelines/background.py), the last written with the answer. A
client reads them from any replica, and goes on after a hang-up from the last it read."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from server.api.responses import event
from server.exceptions import JobStoreUnavailable, ResponseNotFound
from server.jobs.project import current_project
from server.jobs.responses import RUNNING, StoredEvents
from server.jobs.store import JobStore
from server.pipelines.background import END_EVENTS, EVENTS_SAVED

# A follower looks again at once when this server saves its response's events, else after a
# wait that doubles from FIRST_LOOK_S to LAST_LOOK_S while nothing comes (another replica's run,
# a queued one); it asks whether the run still runs every SETTLE_S.
FIRST_LOOK_S = 0.05
LAST_LOOK_S = 1.0
SETTLE_S = 2.0
KEEPALIVE_S = 15.0  # an SSE comment when nothing was sent for this long (clients skip them)
END_PREFIXES = tuple(f"event: {kind}\n" for kind in END_EVENTS.values())
IN_PROGRESS = "event: response.in_progress\n"
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
    """The response's events numbered after `after`, as they are saved, until its last (see
    Follower); a store outage or a drain ends the stream with an error event."""
    follower = Follower(jobs, response_id, after, settle, stopping)
    try:
        async for text in follower.events():
            yield text
    except JobStoreUnavailable:
        yield follower.error(STORE_DOWN)
    except ResponseNotFound:  # deleted meanwhile
        return


class Follower:
    """One client's stream of a response's events. One that ended with no last event saved
    (it did not stream, or failed before it could) gets one made from the stored response.
    A run that started over after the events the client read (its server stopped) ends the
    stream with an error: what was sent cannot be taken back. The errors it makes carry the
    number of the last event sent before them, so a client that goes on after the last
    number it read misses nothing. `settle` fails a run whose job is gone; `stopping`: this
    server drains."""

    def __init__(
        self,
        jobs: JobStore,
        response_id: str,
        after: int,
        settle: Callable[[], Awaitable[dict[str, Any]]],
        stopping: Callable[[], bool],
    ):
        self.jobs, self.response_id, self.after = jobs, response_id, after
        self.settle, self.stopping = settle, stopping

    def error(self, fields: dict[str, Any]) -> str:
        return event("error", self.after, **fields)

    async def events(self) -> AsyncIterator[str]:
        seen: int | None = None  # the job attempt whose events were sent (0: the opening ones)
        # whether that attempt sent more than its in_progress (a run that said nothing else,
        # stopped during a long prefill say, is followed by the next one without an error)
        said = False
        wait_s, settled_at, sent_at, first = FIRST_LOOK_S, time.monotonic(), time.monotonic(), True
        while True:
            with EVENTS_SAVED.watching(self.response_id) as saved:  # (a save during the look)
                look = await asyncio.to_thread(self.jobs.events_after, self.response_id, self.after)
                if look.status is None:  # deleted
                    return
                if first:  # (a client going on after a run's event: it may have said more)
                    first, seen, said = False, look.attempt_at or None, bool(look.attempt_at)
                    if look.attempt_at is None and 0 <= self.after <= look.last_number:
                        yield self.error(RESTARTED)  # (it resumes after an event now gone)
                        return
                for number, attempt, text in look.events:
                    if attempt and seen not in (None, attempt) and said:
                        yield self.error(RESTARTED)
                        return
                    if attempt and attempt != seen:  # (a run that said nothing yet is replaced)
                        said = False
                    said = said or (bool(attempt) and not text.startswith(IN_PROGRESS))
                    seen, self.after, sent_at = attempt or seen, number, time.monotonic()
                    yield text
                    if text.startswith(END_PREFIXES):
                        return
                if not look.events and look.status not in RUNNING:
                    if (end := await self._made_end(look)) is not None:
                        yield end
                    return
                if self.stopping():
                    yield self.error(SHUTTING_DOWN)
                    return
                if time.monotonic() - sent_at >= KEEPALIVE_S:  # (proxies cut idle streams)
                    sent_at = time.monotonic()
                    yield ": keepalive\n\n"
                wait_s = FIRST_LOOK_S if look.events else min(2 * wait_s, LAST_LOOK_S)
                if time.monotonic() - settled_at >= SETTLE_S:
                    settled_at = time.monotonic()
                    await self.settle()  # (a run whose job is gone is failed: the next look)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(saved.wait(), wait_s)

    async def _made_end(self, look: StoredEvents) -> str | None:
        """The end of a response that ended without one saved, made from it, unless this
        client got it before (it was numbered past the last saved event)."""
        if look.status not in END_EVENTS or look.last_event.startswith(END_PREFIXES):
            return None
        if self.after > look.last_number:
            return None
        turn = await asyncio.to_thread(self.jobs.get_response, self.response_id, current_project())
        if turn is None:
            return None
        return event(END_EVENTS[look.status], look.last_number + 1, response=turn.response)
