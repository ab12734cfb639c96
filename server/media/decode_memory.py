"""How much memory images being decoded may take together, across all requests.

A PNG of 0.5 MB can decode to half a gigabyte; the per-request byte caps do not see that, and
a handful of such requests at once would take the host's memory. Each decode first takes its
share (reckoned from the image's header) and gives it back when its thread is done, even if
the request that wanted it has gone meanwhile (a thread cannot be stopped: its memory is in
use until it ends). Waiters are served in order; a share larger than the whole budget is cut
to it, so that image is decoded alone. (asyncio's Semaphore counts one per holder; this
counts bytes, hence the few lines here.)
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where the C library is glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """An image's decode frees hundreds of MB in blocks glibc keeps for reuse (in each
    thread's arena): without handing them back, the budget bounds what is in use but not the
    process's memory (measured: 3.2 GB over its start for 2 GB of images against 1.4 GB
    with this; scripts/bench_image_memory.py)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


class DecodeMemory:
    def __init__(self, total_bytes: int):
        self.total = total_bytes
        self.free = total_bytes
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        # Its own threads: a decode's job must be known to have started or not (see run).
        self._pool = ThreadPoolExecutor(thread_name_prefix="image-decode")

    async def run(self, num_bytes: int, fn: Callable[[], T]) -> T:
        """fn() in a worker thread once num_bytes of the budget are free."""
        share = await self._take(min(num_bytes, self.total))
        loop = asyncio.get_running_loop()

        def decode() -> T:
            try:
                return fn()
            finally:
                return_freed_memory()
                loop.call_soon_threadsafe(self._give_back, share)

        job = self._pool.submit(contextvars.copy_context().run, decode)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            if job.cancel():  # never started (so never will): decode's finally will not run
                self._give_back(share)
            raise

    async def _take(self, share: int) -> int:
        if not self._waiters and share <= self.free:
            self.free -= share
            return share
        waiter = asyncio.get_running_loop().create_future()
        entry = (share, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted as it was cancelled
                self._give_back(share)
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._wake()  # it may have held back smaller ones behind it
            raise
        return share

    def _give_back(self, share: int) -> None:
        self.free += share
        self._wake()

    def _wake(self) -> None:
        """Grant shares in order while they fit."""
        while self._waiters and self._waiters[0][0] <= self.free:
            share, waiter = self._waiters.popleft()
            if waiter.done():  # (cancelled: its task removes nothing more)
                continue
            self.free -= share
            waiter.set_result(None)
