"""A bounded number of requests at one stage of preparing their media (downloading it,
decoding it), counted: a request waiting for one of these slots is queued as surely as one in
the engine's queue, and /health and /metrics show both."""

from __future__ import annotations

import asyncio
from types import TracebackType

from server.exceptions import EngineOverloaded


class Slots:
    def __init__(self, size: int, timeout_s: float):
        self.timeout_s = timeout_s  # a request's wait for one (--queue-timeout)
        self.num_waiting = 0  # requests waiting for a slot
        self.num_held = 0  # slots taken
        self._free = asyncio.Semaphore(size)

    async def take(self) -> None:
        """A slot, waited for at most as long as a request may wait in the engine's queue,
        then the 503 a queue that waited too long answers (300 requests on a host that never
        answers each waited their turn: the 300th ~12 minutes)."""
        self.num_waiting += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._free.acquire()
        except TimeoutError:
            raise EngineOverloaded(
                f"The request waited more than {self.timeout_s:g} s for a slot to prepare its "
                "media (other requests' downloads and decodes); retry shortly.",
                retry_after_s=1,
                code="queue_timeout",
            ) from None
        finally:
            self.num_waiting -= 1
        self.num_held += 1

    def give_back(self) -> None:
        assert self.num_held > 0, "a slot given back that was not taken"
        self.num_held -= 1
        self._free.release()

    def counts(self) -> dict[str, int]:
        return {"held": self.num_held, "waiting": self.num_waiting}

    async def __aenter__(self) -> None:
        await self.take()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.give_back()
