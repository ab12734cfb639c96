"""Runs queued jobs in the background: claim with a lease, renew it while working, write the
result (or the error, in the OpenAI envelope's terms) only while still holding the job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from server.exceptions import EngineOverloaded, ServerError
from server.jobs.store import Job, JobStore
from server.log import request_id_var

logger = logging.getLogger(__name__)

LEASE_S = 60.0
IDLE_POLL_S = 1.0

Handler = Callable[[Job], Awaitable[dict[str, Any]]]


class JobWorker:
    def __init__(self, store: JobStore, handlers: dict[str, Handler], concurrency: int = 2):
        self.store = store
        self.handlers = handlers
        self.concurrency = concurrency
        self.wakeup = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        recovered = self.store.recover()
        if recovered:
            logger.info("re-queued %d job(s) left unfinished by the last run", recovered)
        self.tasks = [asyncio.create_task(self._loop()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        """Unfinished jobs stay `processing`; the next start re-queues them."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def notify(self) -> None:
        self.wakeup.set()

    async def _loop(self) -> None:
        while True:
            job = await asyncio.to_thread(self.store.claim, LEASE_S)
            if job is None:
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), IDLE_POLL_S)
                continue
            await self._run(job)

    async def _run(self, job: Job) -> None:
        request_id_var.set(job.id)
        renewer = asyncio.create_task(self._keep_lease(job))
        try:
            result = await self._handle(job)
        except ServerError as exc:
            error = {
                "message": exc.message,
                "type": exc.error_type,
                "param": exc.param,
                "code": exc.code,
            }
            await asyncio.to_thread(self.store.fail, job, error)
        except Exception:
            logger.exception("job %s failed", job.id)
            error = {
                "message": "Internal error while processing the job; see the server log.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
            await asyncio.to_thread(self.store.fail, job, error)
        else:
            if not await asyncio.to_thread(self.store.complete, job, result):
                logger.warning(
                    "job %s attempt %d lost its lease; result dropped", job.id, job.attempt
                )
        finally:
            renewer.cancel()

    async def _handle(self, job: Job) -> dict[str, Any]:
        """An accepted job is not failed for a busy engine (queue full or waited too long, the
        503s a synchronous client would retry): it waits and tries again, holding its lease."""
        while True:
            try:
                return await self.handlers[job.kind](job)
            except EngineOverloaded as busy:
                logger.info(
                    "job %s: engine busy (%s); retrying in %d s",
                    job.id,
                    busy.code,
                    busy.retry_after_s,
                )
                await asyncio.sleep(busy.retry_after_s)

    async def _keep_lease(self, job: Job) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            await asyncio.to_thread(self.store.renew, job, LEASE_S)
