"""Runs queued jobs in the background: claim with a lease, renew it while working, write the
result (or the error, in the OpenAI envelope's terms) only while still holding the job.

The worker claims a job only when the engine could start it now (a replica with no slot to
spare leaves the queue to the others) and at most `concurrency` at once. A store that cannot be
reached (the database is down) is waited for: claims pause, and a finished job's end is written
when it returns (if the lease ran out meanwhile, another attempt has the job and this one's
write is refused).

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

from server.exceptions import (
    EngineOverloaded,
    EngineStopped,
    JobStoreUnavailable,
    NoRoomToSpool,
    ServerError,
)
from server.jobs.owner import is_gone, new_owner
from server.jobs.project import project_var
from server.jobs.store import Job, JobStore
from server.log import request_id_var

logger = logging.getLogger(__name__)

LEASE_S = 30.0
IDLE_POLL_S = 1.0
STORE_RETRY_S = (0.5, 1.0, 2.0, 5.0)  # waits between tries while the store is unreachable
PROGRESS_FLUSH_S = 0.25
MAX_BUSY_BACKOFF_S = 30.0
PRUNE_INTERVAL_S = 600.0

Progress = Callable[[float], None]


class JobFailed(ServerError):
    """A job that fails with a list of reasons (a batch's invalid lines): kept in its error
    as `data`."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, details: list[dict[str, Any]], code: str | None = None):
        super().__init__(message, code=code)
        self.details = details


class JobInterrupted(ServerError):
    """A job whose attempts were cut short by their server stopping `max_attempts` times: a
    job that takes its server down (the host's OOM killer, a crash) would otherwise take
    every replica down in turn, for ever."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, times: int):
        super().__init__(
            f"The job's server stopped while running it {times} times (killed, crashed or cut "
            "off from the job store); it is not tried again.",
            code="job_interrupted",
        )


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
        lease_s: float | None = None,
        can_start: Callable[[tuple[str, ...]], bool] = lambda kinds: True,
        lanes: dict[tuple[str, ...], int] | None = None,
        max_attempts: int = 0,
    ):
        """lanes: {job kinds: how many loops claim only those} (a long batch then never holds
        the loop a media job needs); None: `concurrency` loops for every kind. can_start(a
        lane's kinds): whether one of its loops may claim a job now. max_attempts: a job
        taken over this many times (Job.takeovers) fails rather than runs again (0: never)."""
        self.store = store
        self.handlers = handlers
        self.lanes = lanes or {(): concurrency}
        laned = {kind for kinds in self.lanes for kind in kinds}
        if () not in self.lanes and (unclaimed := set(handlers) - laned):
            raise ValueError(f"no lane claims jobs of kind {sorted(unclaimed)}")
        self.retention_s = retention_s  # 0: finished jobs are kept forever
        self.lease_s = lease_s or LEASE_S
        self.can_start = can_start
        self.max_attempts = max_attempts
        self.owner = new_owner()
        self.wakeups = {kinds: asyncio.Event() for kinds in self.lanes}  # a lane's idle loops
        self.num_idle = 0
        self.tasks: list[asyncio.Task] = []
        self.running: dict[str, asyncio.Task] = {}  # job id -> its attempt's work, here
        self.held: dict[str, Job] = {}  # job id -> the attempt this process holds
        self.cancelled: set[str] = set()
        self.claim_failures = 0  # in a row: the store is unreachable while this grows
        self._stopped: asyncio.Future[tuple[int, int]] | None = None  # stop()'s work, once begun
        # Claims whose loop was stopped while the store's thread made them (_claim_in_thread)
        self.cut_claims: set[asyncio.Future[Job | None]] = set()

    def runs_any(self, kinds: tuple[str, ...]) -> bool:
        """Whether a job of these kinds (): of any kind) is running here."""
        return any(not kinds or job.kind in kinds for job in self.held.values())

    def start(self) -> None:
        self._take_over_from_gone_owners()
        loop = asyncio.get_running_loop()
        self.store.watch(lambda: loop.call_soon_threadsafe(self.notify))
        self.tasks = [
            asyncio.create_task(self._loop(kinds))
            for kinds, loops in self.lanes.items()
            for _ in range(loops)
        ]
        self.tasks.append(asyncio.create_task(self._poll_loop()))
        if self.retention_s > 0:
            self.tasks.append(asyncio.create_task(self._prune_loop()))

    def _take_over_from_gone_owners(self) -> None:
        """Jobs whose holder is provably gone (a crashed run of this server on this machine)
        need not wait out their leases; any other holder's are left alone."""
        try:
            gone = [owner for owner in self.store.lease_owners() if is_gone(owner)]
            expired = sum(self.store.expire_leases(owner) for owner in gone)
        except JobStoreUnavailable:
            return  # their leases expire by themselves
        if expired:
            logger.info("re-queued %d job(s) left unfinished by a stopped server", expired)

    async def stop(self) -> tuple[int, int]:
        """Jobs running here go back to the queue, for another replica or the next start
        (one that cannot be put back is taken over when its lease expires); no job is claimed
        after. Called twice (at SIGTERM, then by the lifespan), it does this once. Returns how
        many went back and how many could not."""
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._put_back())
        return await asyncio.shield(self._stopped)

    async def _put_back(self) -> tuple[int, int]:
        await cancel_and_wait(self.tasks)
        for claim in self.cut_claims:  # (their threads ran on: what they took goes back too)
            with contextlib.suppress(Exception):
                if (job := await claim) is not None:
                    self.held.setdefault(job.id, job)
        self.cut_claims.clear()
        back = not_back = 0
        for job in list(self.held.values()):
            try:
                await asyncio.to_thread(self.store.release, job)
                logger.info("job %s goes back to the queue (this server is stopping)", job.id)
                back += 1
            except Exception:
                logger.warning(
                    "job %s could not be put back in the queue; it is taken over when its "
                    "lease expires",
                    job.id,
                )
                not_back += 1
        self.held.clear()
        return back, not_back

    def notify(self) -> None:
        """A job was queued here (or may have been): every idle loop tries a claim."""
        self._wake(None)

    def _wake(self, lanes: list[tuple[str, ...]] | None) -> None:
        """The idle loops of these lanes (None: every lane)."""
        for kinds, wakeup in self.wakeups.items():
            if lanes is None or kinds in lanes:
                wakeup.set()

    def cancel_running(self, job_id: str) -> None:
        """The job was cancelled in the store: stop its work here now (its engine sequences
        are aborted as the work unwinds) rather than at the next lease renewal."""
        work = self.running.get(job_id)
        if work is not None:
            self.cancelled.add(job_id)
            work.cancel()

    async def _loop(self, kinds: tuple[str, ...]) -> None:
        """Claims while there is work; idle, waits to be woken: by a job queued here or (the
        store's watch) elsewhere, or by the poll finding one of its kinds claimable."""
        wakeup = self.wakeups[kinds]
        while True:
            wakeup.clear()  # (before the claim: a wake while it runs is not lost)
            job = await self._claim(kinds) if self.can_start(kinds) else None
            if job is None:
                self.num_idle += 1
                try:
                    await wakeup.wait()
                finally:
                    self.num_idle -= 1
                continue
            # (its own task, so its context, the log's request id among it, ends with it: the
            # claims after it were logged under the last job's id; held from here, so that a
            # stop before the task's first step still hands the job back)
            self.held[job.id] = job
            if not await asyncio.create_task(self._run(job)):
                return

    async def _claim(self, kinds: tuple[str, ...]) -> Job | None:
        """The next job of these kinds for this worker; None when there is none, or (after a
        wait) when the store is in trouble."""
        try:
            job = await self._claim_in_thread(kinds)
        except JobStoreUnavailable:
            self.claim_failures += 1
            await self._store_trouble("claiming a job", self.claim_failures)
            return None
        except Exception:  # the loop must outlive any one claim's trouble
            logger.exception("claiming a job failed")
            await asyncio.sleep(STORE_RETRY_S[-1])
            return None
        self.claim_failures = 0
        return job

    async def _claim_in_thread(self, kinds: tuple[str, ...]) -> Job | None:
        """store.claim on a thread, which a stop cannot cut short: a claim whose loop is
        stopped meanwhile is kept (cut_claims) for stop() to put its job back, not left
        under a lease no one renews (taken over only when it expires, counted as a takeover)."""
        claim = asyncio.ensure_future(
            asyncio.to_thread(self.store.claim, self.lease_s, self.owner, kinds)
        )
        self.cut_claims.add(claim)
        try:
            job = await asyncio.shield(claim)
        except asyncio.CancelledError:
            raise  # (kept in cut_claims)
        except BaseException:
            self.cut_claims.discard(claim)
            raise
        self.cut_claims.discard(claim)
        return job

    async def _poll_loop(self) -> None:
        """Once a second, while a loop is idle, one read for the lanes a claim would serve:
        jobs other processes queued (a store without a watch), leases run out, and work that
        waited for the engine to have room. A claim is a write: seven idle loops each trying
        one a second were seven write transactions a second on an idle server."""
        failures = 0
        while True:
            await asyncio.sleep(IDLE_POLL_S)
            if not self.num_idle:
                continue
            lanes = list(self.wakeups)
            try:
                claimable = await asyncio.to_thread(self.store.claimable, lanes)
            except JobStoreUnavailable:
                failures += 1
                await self._store_trouble("looking for jobs", failures)
                continue
            except Exception:  # the poll must outlive any one query's trouble
                logger.exception("looking for jobs failed")
                continue
            failures = 0
            self._wake([kinds for kinds, found in zip(lanes, claimable, strict=True) if found])

    async def _store_trouble(self, doing: str, failures: int) -> None:
        """Logs (once per outage, then every few minutes) and waits before the next try."""
        if failures == 1 or failures % 100 == 0:
            logger.warning("job store unreachable while %s; retrying", doing)
        await asyncio.sleep(STORE_RETRY_S[min(failures, len(STORE_RETRY_S)) - 1])

    async def _write_end(self, write: Callable[..., bool], *args: Any) -> bool:
        """A finished attempt's end is not dropped for a store outage: it is written once the
        store is back (and refused then if another attempt has taken the job)."""
        failures = 0
        while True:
            try:
                return await asyncio.to_thread(write, *args)
            except JobStoreUnavailable:
                failures += 1
                await self._store_trouble("writing a job's end", failures)

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
        project_var.set(job.project)  # what its requests' file ids may name
        if job.attempt > 1:  # earlier attempts were put back (an orderly stop) or taken over
            logger.info(
                "job %s: attempt %d (%d earlier put back, %d taken over)",
                job.id,
                job.attempt,
                job.attempt - 1 - job.takeovers,
                job.takeovers,
            )
        if self.max_attempts and job.takeovers >= self.max_attempts:
            await self._fail_interrupted(job)
            return True
        progress = ProgressWriter(self.store, job)
        work = asyncio.create_task(self._handle(job, progress.update))
        self.running[job.id] = work
        self.held[job.id] = job
        lease_lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(job, work, lease_lost))
        try:
            result = await work
        except EngineStopped:
            # Not the job's fault: leave it for the next start rather than fail it.
            await self._write_end(self.store.release, job)
            logger.info("engine stopped; job %s goes back to the queue", job.id)
            return False
        except JobStoreUnavailable:
            # Not the job's fault either: back to the queue once the store is there again.
            await self._write_end(self.store.release, job)
            logger.warning("job store unavailable under job %s; it goes back to the queue", job.id)
        except asyncio.CancelledError:
            if job.id in self.cancelled and not _being_cancelled():
                logger.info("job %s cancelled; its work stopped", job.id)
                return True
            # Cancelled by the lease keeper (lease lost), unless this task is being stopped.
            if lease_lost.is_set() and not _being_cancelled():
                await self._log_lost(job)
                return True
            raise
        except ServerError as exc:
            # Once, like an HTTP error's access line: its code and reason, never the input.
            logger.info(
                "job %s failed: %d %s: %s", job.id, exc.status_code, exc.code, exc.message[:300]
            )
            await self._write_end(self.store.fail, job, _error_object(exc))
        except Exception:
            logger.exception("job %s failed", job.id)
            await self._write_end(self.store.fail, job, INTERNAL_ERROR)
        else:
            try:
                written = await self._write_end(self.store.complete, job, result)
            except Exception:  # not an outage: the store refused it (too large?)
                logger.exception("job %s: its result could not be stored", job.id)
                written = await self._write_end(self.store.fail, job, INTERNAL_ERROR)
            if not written:
                await self._log_lost(job, "result")
        finally:
            if not _being_cancelled():  # a stopped worker puts back what it still holds
                self.held.pop(job.id, None)
            self.running.pop(job.id, None)
            self.cancelled.discard(job.id)
            keeper.cancel()
            work.cancel()
            await progress.close()
        return True

    async def _fail_interrupted(self, job: Job) -> None:
        """Fails a job taken over max_attempts times, without running it again; from then on it
        is not held here (a held job keeps runs_any() true, which a lane waits out)."""
        logger.warning("job %s failed: its server stopped under it %d times", job.id, job.takeovers)
        try:
            await self._write_end(
                self.store.fail, job, _error_object(JobInterrupted(job.takeovers))
            )
        finally:
            if not _being_cancelled():  # (a stop before the write puts it back instead)
                self.held.pop(job.id, None)

    async def _log_lost(self, job: Job, dropped: str = "work") -> None:
        """Why this attempt no longer holds its job: cancelled (by a request another replica
        served, or one that came as the result was written), its own end already written (the
        store's answer to the first write was lost, the write was tried again), or its lease
        lost (taken over: a fault worth a warning)."""
        with contextlib.suppress(Exception):
            now = await asyncio.to_thread(self.store.get, job.id)
            if now is not None and now.status == "cancelled":
                logger.info("job %s cancelled; its work stopped", job.id)
                return
            ended = now is not None and now.status in ("completed", "failed")
            if ended and now.attempt == job.attempt:
                logger.info(
                    "job %s %s (written before; the store's answer was lost)", job.id, now.status
                )
                return
        logger.warning("job %s attempt %d lost its lease; %s dropped", job.id, job.attempt, dropped)

    async def _handle(self, job: Job, progress: Progress) -> dict[str, Any]:
        """An accepted job is not failed for a busy engine (queue full or waited too long) or a
        disk with no room for its media now (the 503s a synchronous client would retry): it
        waits, backing off, and tries again."""
        delay = 0.0
        while True:
            try:
                return await self.handlers[job.kind](job, progress)
            except (EngineOverloaded, NoRoomToSpool) as busy:
                delay = min(max(delay * 2, busy.retry_after_s, 0.05), MAX_BUSY_BACKOFF_S)
                logger.info(
                    "job %s: server busy (%s); retrying in %.1f s", job.id, busy.code, delay
                )
                await asyncio.sleep(delay)

    async def _keep_lease(self, job: Job, work: asyncio.Task, lost: asyncio.Event) -> None:
        """Renews the lease while the work runs; if another attempt took the job meanwhile,
        cancels the work (its engine slots are better spent on the attempt that holds it).
        A failed renewal (a database error) is retried, not taken for a lost lease."""
        while True:
            try:
                if not await asyncio.to_thread(self.store.renew, job, self.lease_s):
                    break
            except Exception:
                logger.warning("job %s: renewing the lease failed; retrying", job.id)
            await asyncio.sleep(self.lease_s / 3)
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
            with contextlib.suppress(JobStoreUnavailable):  # a later save catches up
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
    error = {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}
    if isinstance(exc, JobFailed):
        error["data"] = exc.details
    return error
