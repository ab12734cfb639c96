"""The job store: durable, idempotent, and a stale attempt can never overwrite a newer one."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.exceptions import IdempotencyKeyReused
from server.jobs.store import JobStore


def test_create_claim_complete(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.create("categories", {"media_url": "x"}, None)
    assert job.status == "queued" and job.attempt == 0
    claimed = store.claim(lease_s=60)
    assert claimed is not None and claimed.id == job.id and claimed.attempt == 1
    assert store.claim(lease_s=60) is None  # leased: nobody else gets it
    assert store.set_progress(claimed, 0.5)
    assert store.complete(claimed, {"ok": True})
    done = store.get(job.id)
    assert done is not None and done.status == "completed" and done.result == {"ok": True}
    assert done.progress == 1


def test_idempotency_key_returns_the_same_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    first = store.create("categories", {"a": 1}, "key-1")
    assert store.create("categories", {"a": 1}, "key-1").id == first.id
    assert store.create("categories", {"a": 1}, "key-2").id != first.id
    with pytest.raises(IdempotencyKeyReused):  # the same key for other work
        store.create("categories", {"a": 2}, "key-1")
    with pytest.raises(IdempotencyKeyReused):
        store.create("completions", {"a": 1}, "key-1")


def test_stale_attempt_cannot_overwrite(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.create("categories", {}, None)
    stale = store.claim(lease_s=-1)  # its lease is already over
    assert stale is not None
    fresh = store.claim(lease_s=60)  # so the job is claimed again
    assert fresh is not None and fresh.attempt == stale.attempt + 1
    assert not store.complete(stale, {"from": "stale"})
    assert store.complete(fresh, {"from": "fresh"})
    final = store.get(fresh.id)
    assert final is not None and final.result == {"from": "fresh"}


def test_jobs_survive_reopening_and_processing_ones_are_requeued(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    job = store.create("categories", {"media_url": "x"}, None)
    assert store.claim(lease_s=600) is not None  # then the server dies
    store.close()
    reopened = JobStore(path)
    assert reopened.recover() == 1
    again = reopened.claim(lease_s=60)
    assert again is not None and again.id == job.id and again.attempt == 2
