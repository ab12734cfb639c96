"""Runs queued jobs in the background: claim with a lease, renew it while working, write the
result (or the error, in the OpenAI envelope's terms) only while still holding the job.

A handler gets the job and a progress callback (0..1, called on the event loop, never blocks);
one writer per job saves the latest value a few times a second, so progress only moves forward
and a 60-frame video costs a handful of database writes, not 60.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from server.exceptions import EngineOverloaded, EngineStopped, ServerError
from server.jobs.store import Job, JobStore
from server.log import request_id_var

logger = logging.getLogger(__name__)

LEASE_S = 60.0
IDLE_POLL_S = 1.0
PROGRESS_FLUSH_S = 0.25
MAX_BUSY_BACKOFF_S = 30.0
PRUNE_INTERVAL_S = 600.0

Progress = Callable[[float], None]
Handler = Callable[[Job, Progress], Awaitable[dict[str, Any]]]


async def cancel_and_wait(tasks: list[asyncio.Task]) -> None:
    """Cancels background tasks and waits until they have ended. (asyncio.wait, not `await
    task`: a cancellation of the caller itself, e.g. a worker being stopped, must not be
    swallowed as if it were the task's.)"""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


def engine_request_id(job: Job) -> str:
    """The id a job's sequences carry in the engine: unique per try, since a retried try (a
    busy engine, a re-run after a restart) must not meet its predecessor's ids there."""
    return f"{job.id}-{uuid.uuid4().hex[:8]}"


class JobWorker:
    def __init__(
        self,
        store: JobStore,
        handlers: dict[str, Handler],
        concurrency: int = 2,
        retention_s: float = 0.0,
    ):
        self.store = store
        self.handlers = handlers
        self.concurrency = concurrency
        self.retention_s = retention_s  # 0: finished jobs are kept forever
        self.wakeup = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.running: dict[str, asyncio.Task] = {}  # job id -> its attempt's work, here
        self.cancelled: set[str] = set()

    def start(self) -> None:
        recovered = self.store.recover()
        if recovered:
            logger.info("re-queued %d job(s) left unfinished by the last run", recovered)
        self.tasks = [asyncio.create_task(self._loop()) for _ in range(self.concurrency)]
        if self.retention_s > 0:
            self.tasks.append(asyncio.create_task(self._prune_loop()))

    async def stop(self) -> None:
        """Unfinished jobs stay `processing`; the next start re-queues them."""
        await cancel_and_wait(self.tasks)

    def notify(self) -> None:
        self.wakeup.set()

    def cancel_running(self, job_id: str) -> None:
        """The job was cancelled in the store: stop its work here now (its engine sequences
        are aborted as the work unwinds) rather than at the next lease renewal."""
        work = self.running.get(job_id)
        if work is not None:
            self.cancelled.add(job_id)
            work.cancel()

    async def _loop(self) -> None:
        while True:
            job = await asyncio.to_thread(self.store.claim, LEASE_S)
            if job is None:
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), IDLE_POLL_S)
                continue
            if not await self._run(job):
                return

    async def _prune_loop(self) -> None:
        while True:
            try:
                pruned = await asyncio.to_thread(self.store.prune, self.retention_s)
                if pruned:
                    logger.info("deleted %d finished job(s) past the retention time", pruned)
            except Exception:  # a failed clean-up must not stop the next one
                logger.exception("pruning finished jobs failed")
            await asyncio.sleep(PRUNE_INTERVAL_S)

    async def _run(self, job: Job) -> bool:
        """Runs one attempt; False when the engine has stopped (no job can run any more)."""
        request_id_var.set(job.id)
        progress = ProgressWriter(self.store, job)
        work = asyncio.create_task(self._handle(job, progress.update))
        self.running[job.id] = work
        lease_lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(job, work, lease_lost))
        try:
            result = await work
        except EngineStopped:
            # Not the job's fault: leave it for the next start rather than fail it.
            await asyncio.to_thread(self.store.release, job)
            logger.error("engine stopped; job %s goes back to the queue", job.id)
            return False
        except asyncio.CancelledError:
            if job.id in self.cancelled and not _being_cancelled():
                logger.info("job %s cancelled; its work stopped", job.id)
                return True
            # Cancelled by the lease keeper (lease lost), unless this task is being stopped.
            if lease_lost.is_set() and not _being_cancelled():
                logger.warning(
                    "job %s attempt %d lost its lease; work dropped", job.id, job.attempt
                )
                return True
            raise
        except ServerError as exc:
            await asyncio.to_thread(self.store.fail, job, _error_object(exc))
        except Exception:
            logger.exception("job %s failed", job.id)
            await asyncio.to_thread(self.store.fail, job, INTERNAL_ERROR)
        else:
            if not await asyncio.to_thread(self.store.complete, job, result):
                logger.warning(
                    "job %s attempt %d lost its lease; result dropped", job.id, job.attempt
                )
        finally:
            self.running.pop(job.id, None)
            self.cancelled.discard(job.id)
            keeper.cancel()
            work.cancel()
            await progress.close()
        return True

    async def _handle(self, job: Job, progress: Progress) -> dict[str, Any]:
        """An accepted job is not failed for a busy engine (queue full or waited too long, the
        503s a synchronous client would retry): it waits, backing off, and tries again."""
        delay = 0.0
        while True:
            try:
                return await self.handlers[job.kind](job, progress)
            except EngineOverloaded as busy:
                delay = min(max(delay * 2, busy.retry_after_s, 0.05), MAX_BUSY_BACKOFF_S)
                logger.info(
                    "job %s: engine busy (%s); retrying in %.1f s", job.id, busy.code, delay
                )
                await asyncio.sleep(delay)

    async def _keep_lease(self, job: Job, work: asyncio.Task, lost: asyncio.Event) -> None:
        """Renews the lease while the work runs; if another attempt took the job meanwhile,
        cancels the work (its engine slots are better spent on the attempt that holds it).
        A failed renewal (a database error) is retried, not taken for a lost lease."""
        while True:
            try:
                if not await asyncio.to_thread(self.store.renew, job, LEASE_S):
                    break
            except Exception:
                logger.exception("job %s: renewing the lease failed; retrying", job.id)
            await asyncio.sleep(LEASE_S / 3)
        lost.set()
        work.cancel()


class ProgressWriter:
    """Keeps the newest fraction on the event loop; one task writes it when it changed."""

    def __init__(self, store: JobStore, job: Job):
        self.store = store
        self.job = job
        self.latest = 0.0
        self.saved = 0.0
        self.task: asyncio.Task | None = None
        self.closed = False

    def update(self, fraction: float) -> None:
        self.latest = max(self.latest, min(fraction, 1.0))
        if self.task is None and not self.closed:
            self.task = asyncio.create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await self._save()
            await asyncio.sleep(PROGRESS_FLUSH_S)

    async def _save(self) -> None:
        if self.latest > self.saved:
            value = self.latest
            await asyncio.to_thread(self.store.set_progress, self.job, value)
            self.saved = value

    async def close(self) -> None:
        self.closed = True
        if self.task is not None:
            await cancel_and_wait([self.task])


INTERNAL_ERROR = {
    "message": "Internal error while processing the job; see the server log.",
    "type": "server_error",
    "param": None,
    "code": None,
}


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _error_object(exc: ServerError) -> dict[str, Any]:
    return {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}
