"""The job worker on a real store: a busy engine delays a job instead of failing it, a stopped
one puts it back in the queue; errors are kept in the envelope's terms; a finished job's webhook
delivery is queued with it; progress is saved in order; a lost lease stops the work; nothing is
claimed without an engine slot; a store outage pauses claims and delays (never drops) a job's
end; only the leases of provably gone processes are taken over at start."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from server.exceptions import (
    EngineOverloaded,
    EngineStopped,
    InvalidRequest,
    JobStoreUnavailable,
    NoRoomToSpool,
)
from server.jobs import worker as worker_module
from server.jobs.owner import is_gone, new_owner
from server.jobs.sqlite import SqliteJobStore as JobStore
from server.jobs.store import Job
from server.jobs.worker import JobWorker

pytestmark = pytest.mark.anyio


async def run_one(store: JobStore, handler, until=("completed", "failed")) -> Job:
    job = store.create("test", {"webhook_url": "http://127.0.0.1:9/h"}, None)
    worker = JobWorker(store, {"test": handler}, concurrency=1)
    worker.start()
    try:
        for _ in range(400):
            current = store.get(job.id)
            assert current is not None
            if current.status in until:
                return current
            await asyncio.sleep(0.025)
        raise AssertionError("the job did not finish")
    finally:
        await worker.stop()


@pytest.mark.parametrize("busy", ["engine", "disk"])
async def test_busy_engine_delays_the_job_instead_of_failing_it(
    tmp_path: Path, busy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(A disk with no room for the job's media now is waited out the same way: a 503 a
    client is told to retry must not fail an accepted job for good.)"""
    monkeypatch.setattr(worker_module, "MAX_BUSY_BACKOFF_S", 0.05)  # (30 s for a full disk)
    tries = 0

    async def handler(job: Job, progress) -> dict:
        nonlocal tries
        tries += 1
        if tries < 3:
            if busy == "disk":
                raise NoRoomToSpool("media_url")
            raise EngineOverloaded("queue full", retry_after_s=0)
        return {"answer": tries}

    job = await run_one(JobStore(tmp_path / "jobs.sqlite3"), handler)
    assert job.status == "completed" and job.result == {"answer": 3}


async def test_request_errors_fail_the_job_with_the_error_object(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(job: Job, progress) -> dict:
        raise InvalidRequest("bad media", param="media_url", code="invalid_media")

    store = JobStore(tmp_path / "jobs.sqlite3")
    with caplog.at_level(logging.INFO, logger="server.jobs.worker"):
        job = await run_one(store, handler)
    assert job.status == "failed"
    logged = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert logged == [f"job {job.id} failed: 400 invalid_media: bad media"]
    assert job.error == {
        "message": "bad media",
        "type": "invalid_request_error",
        "param": "media_url",
        "code": "invalid_media",
    }
    (delivery,) = store.due_deliveries()  # the failure is announced too
    assert delivery["job_id"] == job.id


async def test_unexpected_errors_do_not_leak_details(tmp_path: Path) -> None:
    async def handler(job: Job, progress) -> dict:
        raise RuntimeError("secret internal detail")

    job = await run_one(JobStore(tmp_path / "jobs.sqlite3"), handler)
    assert job.status == "failed" and job.error is not None
    assert "secret" not in job.error["message"] and job.error["type"] == "server_error"


async def test_progress_is_saved_in_order_and_never_moves_back(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    saved: list[float] = []
    set_progress = store.set_progress

    def recording(job: Job, value: float) -> bool:
        saved.append(value)
        return set_progress(job, value)

    store.set_progress = recording  # type: ignore[method-assign]

    async def handler(job: Job, progress) -> dict:
        for i in range(1, 61):  # 60 frames finishing in bursts
            progress(i / 60)
            if i % 10 == 0:
                await asyncio.sleep(0.3)
        progress(0.5)  # a late, smaller value is ignored
        return {}

    job = await run_one(store, handler)
    assert job.status == "completed" and job.progress == 1
    assert saved == sorted(saved) and len(saved) <= 12  # a few writes, not one per frame


async def test_a_lost_lease_cancels_the_work(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    cancelled = asyncio.Event()

    async def handler(job: Job, progress) -> dict:
        # Another attempt takes the job (as after this lease expired) ...
        with store.lock:
            store.db.execute("UPDATE jobs SET attempt = attempt + 1 WHERE id = ?", (job.id,))
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {"stale": True}

    worker_module.LEASE_S, saved_lease = 0.3, worker_module.LEASE_S
    try:
        job = store.create("test", {}, None)
        worker = JobWorker(store, {"test": handler}, concurrency=1)
        worker.start()
        await asyncio.wait_for(cancelled.wait(), 10)  # ... so this one stops working on it
        await worker.stop()
    finally:
        worker_module.LEASE_S = saved_lease
    current = store.get(job.id)
    assert current is not None and current.status == "processing" and current.result is None


async def test_a_cancel_that_comes_with_the_result_is_no_lost_lease(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled as its answer came (by a request another replica served): the result is not
    stored, and the log says cancelled, not the warning of a lease taken over."""
    store = JobStore(tmp_path / "jobs.sqlite3")

    async def handler(job: Job, progress) -> dict:
        store.cancel(job.id)
        return {"late": True}

    job = store.create("test", {}, None)
    worker = JobWorker(store, {"test": handler}, concurrency=1)
    with caplog.at_level(logging.INFO, logger="server.jobs.worker"):
        worker.start()
        try:
            for _ in range(400):  # until the attempt has ended (its line logged)
                if any(job.id in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.025)
        finally:
            await worker.stop()
    current = store.get(job.id)
    assert current is not None and current.status == "cancelled" and current.result is None
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert logged == [("INFO", f"job {job.id} cancelled; its work stopped")], logged


async def test_a_result_written_whose_answer_was_lost_is_no_lost_lease(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store wrote the result but its answer was lost (a COMMIT whose reply never came):
    the write is tried again and refused (the job has ended). The result is kept, and the log
    says so, not the warning of a lease taken over with the result dropped."""

    class LostAnswer(JobStore):
        lost = False

        def complete(self, job: Job, result: dict) -> bool:
            written = super().complete(job, result)
            if not self.lost:
                self.lost = True
                raise JobStoreUnavailable()
            return written

    store = LostAnswer(tmp_path / "jobs.sqlite3")

    async def handler(job: Job, progress) -> dict:
        return {"answer": 1}

    job = store.create("test", {}, None)
    worker = JobWorker(store, {"test": handler}, concurrency=1)
    with caplog.at_level(logging.INFO, logger="server.jobs.worker"):
        worker.start()
        try:
            for _ in range(400):  # until the retried write's line is logged
                if any("written before" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.025)
        finally:
            await worker.stop()
    ended = store.get(job.id)
    assert store.lost and ended is not None
    assert ended.status == "completed" and ended.result == {"answer": 1}
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if job.id in r.getMessage()]
    said = f"job {job.id} completed (written before; the store's answer was lost)"
    assert ("INFO", said) in logged
    assert not [message for level, message in logged if level == "WARNING"]


async def test_a_job_its_servers_kept_stopping_under_fails_instead_of_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Taken over max_attempts times (each attempt's lease ran out: its server killed under
    it, say by the host's OOM killer): the job fails `job_interrupted`, with its webhook, and
    is not run again to take this server down too. Failed, it is no longer held: it had kept
    runs_any() true for the life of the process (a media lane that waits for an idle engine
    then never claimed again), and a stop logged it as put back."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.create("test", {"webhook_url": "http://127.0.0.1:9/h"}, None)
    for _ in range(2):  # two attempts whose servers died (leases that ran out at once)
        assert store.claim(lease_s=-1) is not None
    ran = []

    async def handler(job: Job, progress) -> dict:
        ran.append(job.id)
        return {}

    worker = JobWorker(store, {"test": handler}, concurrency=1, max_attempts=2)
    with caplog.at_level(logging.INFO, logger="server.jobs.worker"):
        worker.start()
        try:
            for _ in range(400):
                if (current := store.get(job.id)) is not None and current.status == "failed":
                    break
                await asyncio.sleep(0.025)
            for _ in range(40):  # (its task ends just after the write)
                if not worker.runs_any(()):
                    break
                await asyncio.sleep(0.025)
            assert not worker.runs_any(()) and not worker.held
        finally:
            await worker.stop()
    said = f"job {job.id}: attempt 3 (0 earlier put back, 2 taken over)"
    messages = [r.getMessage() for r in caplog.records]
    assert said in messages
    assert not [m for m in messages if "goes back to the queue" in m]
    assert current is not None and current.status == "failed" and not ran
    assert current.error is not None and current.error["code"] == "job_interrupted"
    assert "stopped while running it 2 times" in current.error["message"]
    (delivery,) = store.due_deliveries()
    assert json.loads(delivery["payload"])["type"] == "media.failed"


async def test_a_stopped_engine_puts_the_job_back(tmp_path: Path) -> None:
    async def handler(job: Job, progress) -> dict:
        raise EngineStopped("The engine is not running.")

    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.create("test", {"webhook_url": "http://127.0.0.1:9/h"}, None)
    worker = JobWorker(store, {"test": handler}, concurrency=1)
    worker.start()
    try:
        for _ in range(400):  # (queued before its claim too: until it was tried)
            current = store.get(job.id)
            if current is not None and current.attempt == 1 and current.status == "queued":
                break
            await asyncio.sleep(0.025)
    finally:
        await worker.stop()
    current = store.get(job.id)
    assert current is not None and current.status == "queued" and current.attempt == 1
    assert current.error is None
    assert not store.due_deliveries()  # no failure announced


async def test_a_claim_cut_short_by_stop_puts_its_job_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop while the store's thread is claiming a job (a SIGTERM as a job is queued): the
    claim goes on in its thread, and the job it took goes back to the queue, not left under a
    lease no one renews; stop() twice (SIGTERM, then the lifespan) does it once."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    claiming = threading.Event()
    claim = store.claim

    def slow_claim(*args: Any) -> Job | None:
        claiming.set()
        time.sleep(0.3)
        return claim(*args)

    monkeypatch.setattr(store, "claim", slow_claim)
    worker = JobWorker(store, {"test": lambda job, progress: asyncio.sleep(60)}, concurrency=1)
    worker.start()
    job = store.create("test", {}, None)
    worker.notify()
    assert await asyncio.to_thread(claiming.wait, 5)
    await asyncio.gather(worker.stop(), worker.stop())
    await asyncio.sleep(0.5)  # (the claim's thread is done, whatever stop() waited for)
    current = store.get(job.id)
    assert current is not None and current.status == "queued", current
    assert not worker.cut_claims


async def test_a_store_outage_under_a_job_puts_it_back_and_the_lane_goes_on(
    tmp_path: Path,
) -> None:
    """A handler that meets the job store unreachable (a request that reads it) does not fail
    its job: the job goes back to the queue, and the same lane runs it again."""
    tries = 0

    async def handler(job: Job, progress) -> dict:
        nonlocal tries
        tries += 1
        if tries == 1:
            raise JobStoreUnavailable()
        return {"answer": tries}

    job = await run_one(JobStore(tmp_path / "jobs.sqlite3"), handler)
    assert job.status == "completed" and job.result == {"answer": 2}


async def test_stop_during_a_job_returns_and_leaves_the_rest_queued(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    started = asyncio.Event()

    async def handler(job: Job, progress) -> dict:
        started.set()
        for i in range(1000):
            progress(i / 1000)
            await asyncio.sleep(0.01)
        return {}

    jobs = [store.create("test", {}, None) for _ in range(3)]
    worker = JobWorker(store, {"test": handler}, concurrency=1)
    worker.start()
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.3)  # progress writes are under way
    await asyncio.wait_for(worker.stop(), 5)
    statuses = [store.get(j.id).status for j in jobs]  # type: ignore[union-attr]
    assert statuses == ["queued", "queued", "queued"]  # the running one was put back


async def test_nothing_is_claimed_without_an_engine_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Once the engine has room, the poll finds the job still queued: nothing else wakes
    the idle loops.)"""
    monkeypatch.setattr(worker_module, "IDLE_POLL_S", 0.1)
    store = JobStore(tmp_path / "jobs.sqlite3")
    free = False

    async def handler(job: Job, progress) -> dict:
        return {}

    job = store.create("test", {}, None)
    worker = JobWorker(store, {"test": handler}, concurrency=2, can_start=lambda kinds: free)
    worker.start()
    try:
        await asyncio.sleep(0.5)
        assert store.get(job.id).status == "queued"  # type: ignore[union-attr]  # left for others
        free = True
        for _ in range(200):
            if store.get(job.id).status == "completed":  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.025)
        assert store.get(job.id).status == "completed"  # type: ignore[union-attr]
    finally:
        await worker.stop()


async def test_a_lane_claims_while_none_of_its_kinds_runs_here(tmp_path: Path) -> None:
    """The server's rule with the engine full: a lane claims only while none of its own kinds
    runs here, so a batch that fills the engine for hours does not hold a media job back."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    release = asyncio.Event()

    async def long(job: Job, progress) -> dict:
        await release.wait()
        return {}

    async def short(job: Job, progress) -> dict:
        return {}

    worker = JobWorker(
        store,
        {"batch": long, "media": short},
        lanes={("batch",): 1, ("media",): 2},
        can_start=lambda kinds: not worker.runs_any(kinds),
    )
    batch = store.create("batch", {}, None)
    worker.start()
    try:
        for _ in range(200):
            if worker.runs_any(("batch",)):
                break
            await asyncio.sleep(0.025)
        assert (
            worker.runs_any(("batch",)) and worker.runs_any(()) and not worker.runs_any(("media",))
        )
        media = [store.create("media", {"n": n}, None) for n in range(2)]
        worker.notify()
        for _ in range(200):
            if all(store.get(j.id).status == "completed" for j in media):  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.025)
        assert [store.get(j.id).status for j in media] == ["completed"] * 2  # type: ignore[union-attr]
        assert store.get(batch.id).status == "processing"  # type: ignore[union-attr]
    finally:
        release.set()
        await worker.stop()


async def test_a_store_outage_delays_the_end_but_never_drops_it(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    outages = {"claim": 2, "complete": 3}
    for name in outages:
        real = getattr(store, name)

        def flaky(*args, _name=name, _real=real):
            if outages[_name] > 0:
                outages[_name] -= 1
                raise JobStoreUnavailable()
            return _real(*args)

        setattr(store, name, flaky)

    async def handler(job: Job, progress) -> dict:
        return {"answer": 42}

    worker_module.STORE_RETRY_S, saved = (0.01,), worker_module.STORE_RETRY_S
    try:
        job = await run_one(store, handler)
    finally:
        worker_module.STORE_RETRY_S = saved
    assert job.status == "completed" and job.result == {"answer": 42}
    assert outages == {"claim": 0, "complete": 0}


async def test_only_a_gone_owners_leases_are_taken_over_at_start(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.create("test", {"n": 1}, None)
    store.create("test", {"n": 2}, None)
    live = store.claim(lease_s=600, owner=new_owner())  # this process: alive
    gone_owner = new_owner().rsplit(":", 2)[0] + ":999999999:deadbeef"  # no such pid
    gone = store.claim(lease_s=600, owner=gone_owner)
    assert live is not None and gone is not None and is_gone(gone_owner)
    ran: list[int] = []

    async def handler(job: Job, progress) -> dict:
        ran.append(job.request["n"])
        return {}

    worker = JobWorker(store, {"test": handler}, concurrency=1)
    worker.start()
    try:
        for _ in range(200):
            if ran:
                break
            await asyncio.sleep(0.025)
        await asyncio.sleep(0.2)
    finally:
        await worker.stop()
    assert ran == [2]  # the live holder's job is left to it
    assert store.get(live.id).attempt == 1  # type: ignore[union-attr]


async def test_a_lane_per_kind_keeps_a_long_job_from_holding_the_others(tmp_path: Path) -> None:
    """Lanes: the loops of one kind claim only it, so a long batch (its own lane) never holds
    the loop a media job needs, and two long batches wait for the one batch loop."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    release = asyncio.Event()
    started: list[str] = []

    async def long(job: Job, progress) -> dict:
        started.append(job.id)
        await release.wait()
        return {}

    async def quick(job: Job, progress) -> dict:
        return {"done": True}

    batches = [store.create("batch", {"n": i}, None) for i in range(2)]
    worker = JobWorker(store, {"batch": long, "media": quick}, lanes={("media",): 1, ("batch",): 1})
    worker.start()
    try:
        async with asyncio.timeout(10):
            while not started:
                await asyncio.sleep(0.02)
        media = store.create("media", {}, None)  # while a long batch runs
        worker.notify()
        async with asyncio.timeout(10):
            while store.get(media.id).status != "completed":  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        assert started == [batches[0].id]  # one batch at a time; the second waits its turn
        release.set()
        async with asyncio.timeout(10):
            while store.get(batches[1].id).status != "completed":  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
    finally:
        release.set()
        await worker.stop()


async def test_idle_loops_claim_nothing_and_the_poll_wakes_only_the_lane_of_a_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim is a write: idle, the loops wait, and one read a poll finds what another
    process queued (no notify: a store without a watch) and wakes the lane of its kind."""
    monkeypatch.setattr(worker_module, "IDLE_POLL_S", 0.1)
    store = JobStore(tmp_path / "jobs.sqlite3")
    claims: list[tuple[str, ...]] = []
    real_claim = store.claim

    def counted(lease_s, owner="", kinds=()):
        claims.append(kinds)
        return real_claim(lease_s, owner, kinds)

    store.claim = counted  # type: ignore[method-assign]

    async def handler(job: Job, progress) -> dict:
        return {}

    worker = JobWorker(
        store, {"batch": handler, "media": handler}, lanes={("media",): 3, ("batch",): 2}
    )
    worker.start()
    try:
        await asyncio.sleep(1.0)  # ten polls
        assert len(claims) == 5  # each loop's first, at start; none since
        claims.clear()
        other_process = JobStore(tmp_path / "jobs.sqlite3")
        media = other_process.create("media", {}, None)
        async with asyncio.timeout(10):
            while store.get(media.id).status != "completed":  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        assert claims and set(claims) == {("media",)}  # the batch lane slept through it
        # a lease another process let run out is found by the poll too (a takeover)
        other_process.create("batch", {}, None)
        taken = other_process.claim(lease_s=0.3, owner="elsewhere", kinds=("batch",))
        assert taken is not None
        async with asyncio.timeout(10):
            while store.get(taken.id).status != "completed":  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        assert store.get(taken.id).takeovers == 1  # type: ignore[union-attr]
    finally:
        await worker.stop()
