"""The job worker on a real store: a busy engine delays a job instead of failing it; errors are
kept in the envelope's terms; a finished job's webhook delivery is queued with it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.exceptions import EngineOverloaded, InvalidRequest
from server.jobs.store import Job, JobStore
from server.jobs.worker import JobWorker

pytestmark = pytest.mark.anyio


async def run_one(store: JobStore, handler) -> Job:
    job = store.create("test", {"webhook_url": "http://127.0.0.1:9/h"}, None)
    worker = JobWorker(store, {"test": handler}, concurrency=1)
    worker.start()
    try:
        for _ in range(400):
            current = store.get(job.id)
            assert current is not None
            if current.status in ("completed", "failed"):
                return current
            await asyncio.sleep(0.025)
        raise AssertionError("the job did not finish")
    finally:
        await worker.stop()


async def test_busy_engine_delays_the_job_instead_of_failing_it(tmp_path: Path) -> None:
    tries = 0

    async def handler(job: Job) -> dict:
        nonlocal tries
        tries += 1
        if tries < 3:
            raise EngineOverloaded("queue full", retry_after_s=0)
        return {"answer": tries}

    job = await run_one(JobStore(tmp_path / "jobs.sqlite3"), handler)
    assert job.status == "completed" and job.result == {"answer": 3}


async def test_request_errors_fail_the_job_with_the_error_object(tmp_path: Path) -> None:
    async def handler(job: Job) -> dict:
        raise InvalidRequest("bad media", param="media_url", code="invalid_media")

    store = JobStore(tmp_path / "jobs.sqlite3")
    job = await run_one(store, handler)
    assert job.status == "failed"
    assert job.error == {
        "message": "bad media",
        "type": "invalid_request_error",
        "param": "media_url",
        "code": "invalid_media",
    }
    (delivery,) = store.due_deliveries()  # the failure is announced too
    assert delivery["job_id"] == job.id


async def test_unexpected_errors_do_not_leak_details(tmp_path: Path) -> None:
    async def handler(job: Job) -> dict:
        raise RuntimeError("secret internal detail")

    job = await run_one(JobStore(tmp_path / "jobs.sqlite3"), handler)
    assert job.status == "failed" and job.error is not None
    assert "secret" not in job.error["message"] and job.error["type"] == "server_error"
