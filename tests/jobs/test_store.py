"""The job store: durable, idempotent, and a stale attempt can never overwrite a newer one."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from server.exceptions import IdempotencyKeyReused
from server.jobs.store import SCHEMA, JobStore


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


def test_a_finished_job_drops_its_request_but_keeps_its_idempotency(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    request = {"media_url": "data:video/mp4;base64," + "A" * 100_000, "webhook_url": "http://h/"}
    job = store.create("categories", request, "key-1")
    claimed = store.claim(lease_s=60)
    assert claimed is not None and store.complete(claimed, {"ok": True})
    size = store.db.execute("SELECT length(request) FROM jobs WHERE id = ?", (job.id,)).fetchone()
    assert size[0] < 100
    assert store.create("categories", request, "key-1").id == job.id  # still the same job
    with pytest.raises(IdempotencyKeyReused):
        store.create("categories", {**request, "use_scenes": True}, "key-1")
    (delivery,) = store.due_deliveries()  # the webhook was taken from the request first
    assert delivery["url"] == "http://h/"


def test_prune_deletes_old_finished_jobs_only(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    finished = store.create("categories", {}, None)
    with_pending_webhook = store.create("categories", {"webhook_url": "http://h/"}, None)
    for _ in range(2):
        claimed = store.claim(lease_s=60)
        assert claimed is not None and store.complete(claimed, {"ok": True})
    waiting = store.create("categories", {}, None)
    assert store.prune(older_than_s=3600) == 0  # nothing is old yet
    assert store.prune(older_than_s=-1) == 1  # "older than a second in the future": all
    assert store.get(finished.id) is None
    assert store.get(with_pending_webhook.id) is not None  # its delivery is still pending
    assert store.get(waiting.id) is not None  # not finished


def test_a_data_dir_from_before_request_hashes_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA.replace("    request_hash TEXT", "    unused_column TEXT"))
    old.execute(
        "INSERT INTO jobs (id, kind, request, status, created_at, updated_at, idempotency_key)"
        " VALUES ('job-old', 'categories', '{\"a\": 1}', 'queued', 0, 0, 'k')"
    )
    old.commit()
    old.close()
    store = JobStore(path)
    claimed = store.claim(lease_s=60)  # it finishes (and drops its request) after the upgrade
    assert claimed is not None and store.complete(claimed, {"ok": True})
    assert store.create("categories", {"a": 1}, "k").id == "job-old"
    with pytest.raises(IdempotencyKeyReused):
        store.create("categories", {"a": 2}, "k")
