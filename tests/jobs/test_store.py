"""The job store's contract, on both backends (SQLite and the real PostgreSQL): durable,
idempotent across processes, leases with fencing (a stale attempt never overwrites a newer one,
a live lease is never taken over), progress only forward, the webhook row in the job's end
transaction, retention, values every process shares. A second `open_store()` is another
process's view of the same data."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from server.exceptions import (
    FileStorageFull,
    IdempotencyKeyReused,
    JobStoreUnavailable,
    JobStoreUnconfirmed,
)
from server.jobs import responses
from server.jobs import store as store_module
from server.jobs.deliveries import Execute
from server.jobs.project import ALL
from server.jobs.responses import BrokenChain, ConversationTooLong
from server.jobs.store import JobStore

OpenStore = Callable[[], JobStore]


def test_create_claim_complete(store: JobStore) -> None:
    job = store.create("categories", {"media_url": "x"}, None)
    assert job.status == "queued" and job.attempt == 0
    claimed = store.claim(lease_s=60, owner="a")
    assert claimed is not None and claimed.id == job.id and claimed.attempt == 1
    assert claimed.request == {"media_url": "x"} and claimed.owner == "a"
    assert store.claim(lease_s=60) is None  # leased: nobody else gets it
    assert store.set_progress(claimed, 0.5)
    assert store.complete(claimed, {"ok": True})
    done = store.get(job.id)
    assert done is not None and done.status == "completed" and done.result == {"ok": True}
    assert done.progress == 1
    assert store.get("job-none") is None


def test_idempotency_key_returns_the_same_job(store: JobStore) -> None:
    first = store.create("categories", {"a": 1}, "key-1")
    assert store.create("categories", {"a": 1}, "key-1").id == first.id
    assert store.create("categories", {"a": 1}, "key-2").id != first.id
    with pytest.raises(IdempotencyKeyReused):  # the same key for other work
        store.create("categories", {"a": 2}, "key-1")
    with pytest.raises(IdempotencyKeyReused):
        store.create("completions", {"a": 1}, "key-1")


def test_the_tables_holding_keyed_objects_are_named(store: JobStore) -> None:
    """What a server started without keys warns of (every client would see them)."""
    assert store.keyed_tables() == []
    store.create("completions", {"a": 1}, None)
    assert store.keyed_tables() == []  # (made without keys: everyone's anyway)
    store.create("completions", {"a": 1}, None, project="key-a")
    assert store.keyed_tables() == ["jobs"]


def test_a_key_used_before_projects_finds_its_job_after(store: JobStore) -> None:
    """A job made before the server kept projects (or before it had API keys) is in ALL,
    under the bare key: a project's retry with that key and request finds it (it sees ALL's
    jobs), not a second job; another request under that key is the project's own, and one
    project's keyed job is never another's."""
    legacy = store.create("completions", {"a": 1}, "order-17")  # (ALL: stored as "order-17")
    assert store.create("completions", {"a": 1}, "order-17", project="key-a").id == legacy.id
    other = store.create("completions", {"a": 2}, "order-17", project="key-a")
    assert other.id != legacy.id and other.project == "key-a"
    assert store.create("completions", {"a": 2}, "order-17", project="key-a").id == other.id
    assert store.create("completions", {"a": 2}, "order-17", project="key-b").id != other.id


def test_idempotency_key_is_one_job_across_processes(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]
    ids: list[str] = []
    refused: list[Exception] = []

    def submit(store: JobStore, body: dict) -> None:
        try:
            ids.append(store.create("categories", body, "shared-key").id)
        except IdempotencyKeyReused as exc:
            refused.append(exc)

    threads = [
        threading.Thread(target=submit, args=(stores[i % 2], {"a": 1})) for i in range(8)
    ] + [threading.Thread(target=submit, args=(stores[0], {"a": 2}))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1 and len(ids) + len(refused) == 9
    assert len(refused) <= 1  # the other body is refused, unless it came first


def test_stale_attempt_cannot_overwrite(store: JobStore) -> None:
    store.create("categories", {}, None)
    stale = store.claim(lease_s=-1)  # its lease is already over
    assert stale is not None
    fresh = store.claim(lease_s=60)  # so the job is claimed again
    assert fresh is not None and fresh.attempt == stale.attempt + 1
    assert not store.renew(stale, 60) and not store.set_progress(stale, 0.9)
    assert not store.complete(stale, {"from": "stale"})
    assert not store.fail(stale, {"message": "stale"}) and not store.release(stale)
    assert store.complete(fresh, {"from": "fresh"})
    final = store.get(fresh.id)
    assert final is not None and final.result == {"from": "fresh"} and final.progress == 1


def test_a_live_lease_is_never_taken_over_by_another_process(open_store: OpenStore) -> None:
    """A second server on the same store (started by mistake, or a replica) leaves a job whose
    lease is live alone; once it expires, it is taken over as a new attempt."""
    first, second = open_store(), open_store()
    job = first.create("categories", {"x": 1}, None)
    held = first.claim(lease_s=60, owner="first")
    assert held is not None
    assert second.claim(lease_s=60, owner="second") is None
    assert first.renew(held, lease_s=-1)  # as if the holder stopped renewing and time passed
    taken = second.claim(lease_s=60, owner="second")
    assert taken is not None and taken.id == job.id and taken.attempt == 2
    assert taken.request == {"x": 1}  # the whole request, for any process to run
    assert not first.complete(held, {"from": "first"})


def test_expired_leases_of_a_gone_owner(store: JobStore) -> None:
    store.create("categories", {}, None)
    held = store.claim(lease_s=600, owner="gone")
    assert held is not None and store.lease_owners() == ["gone"]
    assert store.claim(lease_s=60) is None
    assert store.expire_leases("other") == 0
    assert store.expire_leases("gone") == 1
    again = store.claim(lease_s=60, owner="new")
    assert again is not None and again.attempt == 2


def test_concurrent_claims_take_each_job_once(open_store: OpenStore) -> None:
    stores = [open_store() for _ in range(3)]
    created = {stores[0].create("test", {"n": n}, None).id for n in range(30)}
    claimed: list[str] = []

    def drain(store: JobStore) -> None:
        while (job := store.claim(lease_s=60)) is not None:
            claimed.append(job.id)
            assert store.complete(job, {})

    threads = [threading.Thread(target=drain, args=(s,)) for s in stores for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(created)


def test_progress_only_moves_forward(store: JobStore) -> None:
    store.create("categories", {}, None)
    first = store.claim(lease_s=-1)
    assert first is not None and store.set_progress(first, 0.6)
    assert store.set_progress(first, 0.2)  # written, but the larger value stays
    second = store.claim(lease_s=60)
    assert second is not None and store.set_progress(second, 0.3)
    current = store.get(second.id)
    assert current is not None and current.progress == 0.6


def test_a_finished_job_drops_its_request_but_keeps_its_idempotency(store: JobStore) -> None:
    request = {"media_url": "data:video/mp4;base64," + "A" * 100_000, "webhook_url": "http://h/"}
    job = store.create("categories", request, "key-1")
    claimed = store.claim(lease_s=60)
    assert claimed is not None and store.complete(claimed, {"ok": True})
    with store.transaction(write=False) as execute:
        row = execute("SELECT length(request) AS n FROM jobs WHERE id = ?", (job.id,)).fetchone()
    assert row["n"] < 100
    assert store.create("categories", request, "key-1").id == job.id  # still the same job
    with pytest.raises(IdempotencyKeyReused):
        store.create("categories", {**request, "use_scenes": True}, "key-1")
    (delivery,) = store.due_deliveries()  # the webhook was taken from the request first
    assert delivery["url"] == "http://h/"


@pytest.mark.parametrize("end", ["complete", "fail", "cancel"])
def test_the_webhook_row_is_written_with_the_end(store: JobStore, end: str) -> None:
    job = store.create("categories", {"webhook_url": "http://h/"}, None, project="team")
    claimed = store.claim(lease_s=60)
    assert claimed is not None and store.due_deliveries() == []
    if end == "complete":
        assert store.complete(claimed, {"ok": True})
    elif end == "fail":
        assert store.fail(claimed, {"message": "bad"})
    else:
        cancelled = store.cancel(job.id)
        assert cancelled is not None and cancelled.status == "cancelled"
        assert not store.complete(claimed, {"late": True})  # the running attempt is fenced off
    (delivery,) = store.due_deliveries()
    assert delivery["job_id"] == job.id and delivery["project"] == "team"  # (its secret's)
    event = {"complete": "completed", "fail": "failed", "cancel": "cancelled"}[end]
    assert json.loads(delivery["payload"])["type"] == f"media.{event}"
    assert store.cancel(job.id).status == event  # type: ignore[union-attr]  # ended: unchanged
    assert len(store.deliveries_of(job.id)) == 1
    # a page of jobs' deliveries in one query: each job's own, none for one without
    many = store.deliveries_of_jobs([job.id, "job-without-any"])
    assert many == {job.id: store.deliveries_of(job.id), "job-without-any": []}


def test_a_held_delivery_is_not_handed_to_another_process(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    first.create("categories", {"webhook_url": "http://h/"}, None)
    claimed = first.claim(lease_s=60)
    assert claimed is not None and first.complete(claimed, {})
    (taken,) = first.due_deliveries(hold_s=60)
    assert second.due_deliveries(hold_s=60) == []  # in flight at the first
    assert second.record_attempt(taken["id"], 1, "pending", 0.0, 500, None)
    assert not first.record_attempt(taken["id"], 1, "delivered", 0.0, 200, None)  # a duplicate
    (again,) = second.due_deliveries(hold_s=-1)  # ... and dies mid-attempt: its hold runs out
    assert again["id"] == taken["id"] and again["attempts"] == 1
    (after_death,) = first.due_deliveries(hold_s=60)  # so a live process sends it, same id
    assert after_death["id"] == taken["id"]


def test_prune_deletes_old_finished_jobs_only(store: JobStore) -> None:
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


def test_list_newest_first_with_a_cursor(store: JobStore) -> None:
    ids = [store.create("categories", {"n": n}, None).id for n in range(5)]
    page, more = store.list(None, 2, None)
    assert [job.id for job in page] == ids[:2:-1] and more
    rest, more = store.list(None, 10, page[-1].id)
    assert [job.id for job in rest] == ids[2::-1] and not more
    assert store.list("completed", 10, None) == ([], False)
    with pytest.raises(KeyError):
        store.list(None, 10, "job-gone")


def test_a_shared_value_is_the_first_one_stored(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    assert first.shared_value("webhook_secret", "whsec_a") == "whsec_a"
    assert second.shared_value("webhook_secret", "whsec_b") == "whsec_a"
    assert first.count_by_status() == {} and second.count_deliveries_by_status() == {}


def test_jobs_survive_reopening(open_store: OpenStore) -> None:
    job = open_store().create("categories", {"webhook_url": "http://h/"}, "k")
    reopened = open_store()
    assert reopened.get(job.id) is not None
    assert reopened.count_by_status() == {"queued": 1}


def test_files_round_trip(store: JobStore) -> None:
    """The Files API's store, on both backends: bytes in and out, newest first or oldest
    first with a cursor, deleted."""
    made = [
        store.add_file("batch", f"f{i}.jsonl", bytes([i, 0, 255]) * 10, project="")
        for i in range(3)
    ]
    assert store.get_file(made[1].id, project="") == made[1] and made[1].bytes == 30
    assert store.file_content(made[2].id, project="") == bytes([2, 0, 255]) * 10
    newest, more = store.list_files("batch", 2, None, newest_first=True, project="")
    assert [f.id for f in newest] == [made[2].id, made[1].id] and more
    rest, more = store.list_files("batch", 2, newest[-1].id, newest_first=True, project="")
    assert [f.id for f in rest] == [made[0].id] and not more
    oldest, _ = store.list_files(None, 10, made[0].id, newest_first=False, project="")
    assert [f.id for f in oldest] == [made[1].id, made[2].id]
    assert store.list_files("batch_output", 10, None, True, project="") == ([], False)
    with pytest.raises(KeyError):
        store.list_files(None, 10, "file-nope", True, project="")
    assert store.delete_file(made[0].id, project="") and not store.delete_file(
        made[0].id, project=""
    )
    assert (
        store.get_file(made[0].id, project="") is None
        and store.file_content(made[0].id, project="") is None
    )


def test_a_projects_files_are_bounded_together(store: JobStore) -> None:
    """max_total bounds what one project's files hold, on both backends (another project's
    files do not count; without keys, ALL, every file does); a deleted file frees its room,
    one a batch still reads does not."""
    first = store.add_file("batch", "a.jsonl", b"x" * 60, project="p", max_total=100)
    store.add_file("batch", "b.jsonl", b"x" * 40, project="p", max_total=100)
    store.add_file("batch", "c.jsonl", b"x" * 90, project="q", max_total=100)
    with pytest.raises(FileStorageFull, match="past 100 bytes") as refused:
        store.add_file("batch", "d.jsonl", b"x", project="p", max_total=100)
    assert refused.value.code == "storage_limit_exceeded" and "100 bytes are stored" in str(
        refused.value
    )
    assert store.list_files(None, 10, None, True, "p")[0][0].bytes == 40  # (not added)
    with pytest.raises(FileStorageFull):
        store.add_file("batch", "e.jsonl", b"x" * 100, project=ALL, max_total=280)
    store.add_file("batch", "f.jsonl", b"x" * 100, project=ALL, max_total=0)  # (no bound)
    store.create("batch", {"input_file_id": first.id}, None, "batch_", project="p")
    assert store.delete_file(first.id, "p")  # (held for its batch: still stored)
    with pytest.raises(FileStorageFull):
        store.add_file("batch", "g.jsonl", b"x", project="p", max_total=100)
    held = store.claim(lease_s=60, kinds=("batch",))
    assert held is not None and store.cancel(held.id) is not None  # (no batch reads it now)
    assert store.add_file("batch", "h.jsonl", b"x" * 60, project="p", max_total=100).bytes == 60


def test_uploads_landing_together_cannot_both_pass_the_bound(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two uploads of one project at once (each INSERT slow, as a big file's is): one is
    stored, the other refused, on both backends (PostgreSQL's READ COMMITTED let both count
    the same total and both land: 160 of 100 bytes)."""
    from server.jobs import files

    insert = files.insert_file

    def slow_insert(*args: object) -> object:
        time.sleep(0.3)
        return insert(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(files, "insert_file", slow_insert)
    outcomes: list[str] = []

    def upload(name: str) -> None:
        try:
            store.add_file("batch", name, b"x" * 80, project="p", max_total=100)
            outcomes.append("stored")
        except FileStorageFull:
            outcomes.append("refused")

    threads = [threading.Thread(target=upload, args=(f"{i}.jsonl",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused", "stored"]
    assert [f.bytes for f in store.list_files(None, 10, None, True, "p")[0]] == [80]


def test_an_input_file_deleted_under_its_batch_is_kept_for_it(store: JobStore) -> None:
    """Deleted while a batch that reads it is unfinished: gone from the API at once, its
    content kept for the batch (one that runs again after a restart reads it again) until
    no such batch is left; a file no batch reads is deleted at once."""
    kept = store.add_file("batch", "in.jsonl", b"lines", project="p")
    other = store.add_file("batch", "other.jsonl", b"x", project="p")
    store.create("batch", {"input_file_id": kept.id}, None, "batch_", project="p")
    store.create("batch", {"input_file_id": kept.id}, None, "batch_", project="p")
    first = store.claim(lease_s=60, kinds=("batch",))
    assert first is not None
    assert store.delete_file(kept.id, "p") and store.delete_file(other.id, "p")
    assert not store.delete_file(kept.id, "p")  # (gone from the API)
    assert store.get_file(kept.id, "p") is None and store.file_content(kept.id, "p") is None
    assert store.list_files(None, 10, None, True, "p") == ([], False)
    assert store.file_content(kept.id, "p", held=True) == b"lines"  # for its batches
    assert store.file_content(other.id, "p", held=True) is None  # no batch read it
    assert store.complete(first, {})
    assert store.file_content(kept.id, "p", held=True) == b"lines"  # the queued one
    second = store.claim(lease_s=60, kinds=("batch",))
    assert second is not None and store.cancel(second.id) is not None
    assert store.file_content(kept.id, "p", held=True) is None  # no batch left to read it


def test_a_result_and_its_files_are_stored_together_or_not_at_all(store: JobStore) -> None:
    store.create("batch", {}, None, "batch_", {"endpoint": "/v1/completions"})
    job = store.claim(lease_s=60, kinds=("batch",))
    assert job is not None and job.id.startswith("batch_")
    assert job.description == {"endpoint": "/v1/completions"}
    stale = job
    job = store.claim(lease_s=60, kinds=("batch",))  # nothing else queued of that kind
    assert job is None
    assert store.save_answers(stale.id, stale.attempt, [(0, 200, "{}")])
    assert store.set_partial_result(stale, {"request_counts": {"total": 1}})
    store.expire_leases(stale.owner or "")
    retried = store.claim(lease_s=60)
    assert retried is not None and retried.attempt == 2
    assert not store.complete(stale, {"request_counts": {"total": 1}})  # lease lost
    assert store.list_files("batch_output", 10, None, True, project="") == (
        [],
        False,
    )  # no stray file
    assert store.answers(retried.id) == [(0, 200, "{}")]  # kept for the attempt that holds it
    assert store.complete(retried, {"request_counts": {"total": 1}})
    done = store.get(retried.id)
    assert done is not None and done.status == "completed" and done.result is not None
    assert store.file_content(done.result["output_file_id"], project="") == b"{}\n"
    assert "error_file_id" not in done.result  # no failed answer: no error file
    assert not store.set_partial_result(retried, {"late": True})  # ended: nothing more


def test_claim_takes_only_the_kinds_asked_for(store: JobStore) -> None:
    store.create("batch", {}, None)
    media = store.create("categories", {}, None)
    claimed = store.claim(lease_s=60, kinds=("completions", "categories"))
    assert claimed is not None and claimed.id == media.id
    assert store.claim(lease_s=60, kinds=("completions", "categories")) is None


def test_the_idle_polls_are_reads(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an idle server asks every second (the worker's claimable lanes, the webhook
    sender's due deliveries) opens no write transaction while there is nothing to do."""
    writes: list[bool] = []
    real = store.transaction

    def counted(write: bool = True):  # noqa: ANN202
        writes.append(write)
        return real(write)

    monkeypatch.setattr(store, "transaction", counted)
    lanes = [("batch",), ("categories", "completions"), ()]
    assert store.claimable(lanes) == [False] * 3 and store.due_deliveries() == []
    assert writes == [False, False]
    job = store.create("batch", {}, None)
    store.create("categories", {}, None)
    assert store.claimable(lanes) == [True] * 3
    store.claim(lease_s=0.001, kinds=("categories",))
    claimed = store.claim(lease_s=60, kinds=("batch",))
    assert claimed is not None and claimed.id == job.id
    time.sleep(0.01)
    assert store.claimable(lanes) == [False, True, True]  # its lease ran out: a takeover


def test_a_cancelled_batch_keeps_its_saved_answers_as_files(store: JobStore) -> None:
    store.create("batch", {}, None, "batch_")
    job = store.claim(lease_s=60)
    assert job is not None
    assert store.set_partial_result(job, {"request_counts": {"total": 5, "completed": 9}})
    rows = [(1, 200, '{"b": 1}'), (0, 200, '{"a": 0}'), (3, 400, '{"c": 3}')]
    assert store.save_answers(job.id, job.attempt, rows)
    cancelled = store.cancel(job.id)
    assert cancelled is not None and cancelled.result is not None
    # the counts are the files' (not what the last partial save said)
    assert cancelled.result["request_counts"] == {"total": 5, "completed": 2, "failed": 1}
    assert (
        store.file_content(cancelled.result["output_file_id"], project="")
        == b'{"a": 0}\n{"b": 1}\n'
    )
    assert store.file_content(cancelled.result["error_file_id"], project="") == b'{"c": 3}\n'
    assert store.answers(job.id) == []
    assert not store.save_answers(job.id, job.attempt, [(4, 200, "{}")])  # ended: refused


def test_a_conversation_is_its_chain_of_stored_responses(store: JobStore) -> None:
    def save(rid: str, previous: str | None) -> None:
        response = {"id": rid, "previous_response_id": previous, "output": [{"o": rid}]}
        store.save_response(response, [{"i": rid}], project="")

    save("resp_a", None)
    save("resp_b", "resp_a")
    save("resp_c", "resp_b")
    save("resp_x", "resp_a")  # a branch from the first answer
    turns = store.conversation("resp_c", project="")
    assert [t.input for t in turns] == [[{"i": "resp_a"}], [{"i": "resp_b"}], [{"i": "resp_c"}]]
    assert [t.response["id"] for t in store.conversation("resp_x", project="")] == [
        "resp_a",
        "resp_x",
    ]
    stored = store.get_response("resp_b", project="")
    assert stored is not None and stored.response["output"] == [{"o": "resp_b"}]
    with pytest.raises(BrokenChain) as missing:
        store.conversation("resp_none", project="")
    assert missing.value.response_id == "resp_none"
    assert store.delete_response("resp_b", project="") and not store.delete_response(
        "resp_b", project=""
    )
    with pytest.raises(BrokenChain) as broken:  # its middle is gone
        store.conversation("resp_c", project="")
    assert broken.value.response_id == "resp_b"
    assert (
        store.prune(older_than_s=3600) == 0 and store.get_response("resp_a", project="") is not None
    )
    store.prune(older_than_s=-1)  # past retention: gone
    assert (
        store.get_response("resp_a", project="") is None
        and store.get_response("resp_c", project="") is None
    )


def test_a_background_response_is_updated_only_while_it_runs(store: JobStore) -> None:
    queued = {"id": "resp_bg", "previous_response_id": None, "status": "queued", "output": []}
    store.save_response(queued, [], project="")
    assert store.update_response({**queued, "status": "in_progress"})
    assert store.update_response({**queued, "status": "cancelled"})
    assert not store.update_response({**queued, "status": "completed"})  # ended: kept
    stored = store.get_response("resp_bg", project="")
    assert stored is not None and stored.response["status"] == "cancelled"
    assert not store.update_response({**queued, "id": "resp_none"})


def test_a_conversation_is_kept_while_it_is_continued(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention counts from a turn's last use: a new turn renews the turns before it (those
    not renewed within the hour: a long conversation is not rewritten at every turn)."""
    clock = [0.0]
    monkeypatch.setattr(store, "now", lambda: clock[0])

    def save(rid: str, previous: str | None, at: float) -> None:
        clock[0] = at
        store.save_response(
            {"id": rid, "previous_response_id": previous, "output": []}, [], project=""
        )

    save("resp_1", None, 1000)
    save("resp_lone", None, 1000)
    save("resp_2", "resp_1", 6000)  # renews resp_1
    save("resp_3", "resp_2", 6100)  # (renews nothing: both were used within the hour)
    clock[0] = 7000.0
    store.prune(older_than_s=1500)  # what was not used since 5500 goes
    assert store.get_response("resp_lone", project="") is None
    turns = store.conversation("resp_3", project="")
    assert [t.response["id"] for t in turns] == ["resp_1", "resp_2", "resp_3"]


def test_a_conversation_past_the_longest_is_refused(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(responses, "MAX_CHAIN", 3)
    previous = None
    for n in range(4):
        store.save_response({"id": f"resp_{n}", "previous_response_id": previous}, [], project="")
        previous = f"resp_{n}"
    assert len(store.conversation("resp_2", project="")) == 3
    with pytest.raises(ConversationTooLong):
        store.conversation("resp_3", project="")
    store.delete_response("resp_0", project="")
    assert [t.response["id"] for t in store.conversation("resp_2", whole=False, project="")] == [
        "resp_1",
        "resp_2",
    ]


def test_a_conversation_holds_its_items_in_order(
    open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, other = open_store(), open_store()  # (another process's view)
    made = store.create_conversation(
        "conv_1", {"topic": "a"}, [{"id": "msg_1", "n": 1}], project=""
    )
    assert made["object"] == "conversation" and made["metadata"] == {"topic": "a"}
    threads = [
        threading.Thread(
            target=lambda n=n: (store if n % 2 else other).add_items(
                "conv_1", [{"id": f"msg_{n}a"}, {"id": f"msg_{n}b"}], project=""
            )
        )
        for n in range(2, 8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    items = other.conversation_items("conv_1", project="")
    assert items is not None and len(items) == 13 and items[0] == {"id": "msg_1", "n": 1}
    pairs = {items[i]["id"][:-1]: items[i + 1]["id"][:-1] for i in range(1, 13, 2)}
    assert all(a == b for a, b in pairs.items())  # each answer's items stay together
    assert not store.add_items("conv_none", [{"id": "x"}], project="")
    assert store.conversation_items("conv_none", project="") is None
    assert store.delete_item("conv_1", "msg_1", project="") and not store.delete_item(
        "conv_1", "msg_1", project=""
    )
    assert store.update_conversation("conv_1", {"topic": "b"}, project="")["metadata"] == {
        "topic": "b"
    }  # type: ignore[index]
    monkeypatch.setattr(store, "now", lambda: 0.0)
    store.create_conversation("conv_old", {}, [], project="")
    monkeypatch.undo()
    store.prune(older_than_s=3600)
    assert store.get_conversation("conv_old", project="") is None
    assert store.get_conversation("conv_1", project="") is not None
    assert (
        store.delete_conversation("conv_1", project="")
        and store.conversation_items("conv_1", project="") is None
    )


def test_prune_sweeps_items_whose_conversation_is_gone(store: JobStore) -> None:
    store.create_conversation("conv_1", {}, [{"id": "msg_1"}], project="")
    with store.transaction() as execute:  # (as a delete racing an add could once leave them)
        execute(
            "INSERT INTO conversation_items (conversation_id, position, id, item)"
            " VALUES ('conv_gone', 0, 'msg_x', '{}')",
            (),
        )
    store.prune(older_than_s=3600)
    with store.transaction(write=False) as execute:
        rows = execute("SELECT conversation_id FROM conversation_items", ()).fetchall()
    assert [row["conversation_id"] for row in rows] == ["conv_1"]


def test_a_stale_attempt_never_writes_a_background_response(store: JobStore) -> None:
    queued = {"id": "resp_bg", "previous_response_id": None, "status": "queued", "output": []}
    store.save_response(queued, [], project="")
    store.create("response", {}, None, job_id="resp_bg")
    first = store.claim(lease_s=60, owner="a")
    assert first is not None and first.attempt == 1
    store.release(first)  # (its lease gone: another attempt takes the job)
    second = store.claim(lease_s=60, owner="b")
    assert second is not None and second.attempt == 2
    assert not store.update_response({**queued, "status": "failed"}, None, first.attempt)
    assert store.update_response({**queued, "status": "in_progress"}, None, second.attempt)
    stored = store.get_response("resp_bg", project="")
    assert stored is not None and stored.response["status"] == "in_progress"


def test_a_conversation_is_locked_for_one_turn_at_a_time(open_store: OpenStore) -> None:
    """One response's turn at a time (every process sharing the store sees the lock); the
    holder renews it; released, or its lease run out, another takes it."""
    store, other = open_store(), open_store()
    store.create_conversation("conv_l", {}, [], project="p")
    assert store.lock_conversation("conv_l", "p", "resp_a", lease_s=60) is True
    assert other.lock_conversation("conv_l", "p", "resp_b", lease_s=60) is False
    assert other.lock_conversation("conv_l", "p", "resp_a", lease_s=60) is True  # renewed
    assert other.lock_conversation("conv_l", "q", "resp_b", lease_s=60) is None  # not q's
    assert store.lock_conversation("conv_none", "p", "resp_a", lease_s=60) is None
    other.unlock_conversation("conv_l", "resp_b")  # not its lock: nothing
    assert store.lock_conversation("conv_l", "p", "resp_b", lease_s=60) is False
    assert other.renew_conversation_lock("conv_l", "resp_a", lease_s=60)
    assert not other.renew_conversation_lock("conv_l", "resp_b", lease_s=60)  # not its lock
    store.unlock_conversation("conv_l", "resp_a")
    # a renewal still writing as the turn ended does not put the lease back
    assert not other.renew_conversation_lock("conv_l", "resp_a", lease_s=60)
    assert store.lock_conversation("conv_l", "p", "resp_e", lease_s=60) is True
    store.unlock_conversation("conv_l", "resp_e")
    assert other.lock_conversation("conv_l", "p", "resp_b", lease_s=-1) is True  # (expired)
    assert store.lock_conversation("conv_l", "p", "resp_c", lease_s=60) is True
    assert store.delete_conversation("conv_l", "p")  # (its lock goes with it)
    store.create_conversation("conv_l", {}, [], project="p")
    assert other.lock_conversation("conv_l", "p", "resp_d", lease_s=60) is True


def test_a_retry_is_scheduled_by_the_stores_clock(store: JobStore) -> None:
    """Every replica's retries go by the store's clock (the machines' own need not agree):
    a delivery pending again is due retry_in_s after the store's now, not the sender's."""
    store.create("categories", {"webhook_url": "http://h/"}, None)
    claimed = store.claim(lease_s=60)
    assert claimed is not None and store.complete(claimed, {})
    (due,) = store.due_deliveries()
    store.now = lambda: 1_000_000.0  # type: ignore[method-assign]  # (the store's clock)
    assert store.record_attempt(due["id"], 1, "pending", 30.0, 500, None)
    (delivery,) = store.deliveries_of(claimed.id)
    assert delivery["next_attempt_at"] == 1_000_030.0
    # an earlier version stored a receiver's infinite Retry-After: the job still reads
    assert store.record_attempt(due["id"], 2, "pending", float("inf"), 503, None)
    (delivery,) = store.deliveries_of(claimed.id)
    assert delivery["status"] == "pending" and delivery["next_attempt_at"] is None
    (again,) = store.due_deliveries()  # ... and is sent now, not never
    assert again["id"] == due["id"]


def test_sqlite_gives_the_space_of_finished_requests_back(tmp_path, caplog) -> None:  # noqa: ANN001
    """A burst of large async requests grew the file to 1.4 GB that stayed (99.8 % free
    pages): prune gives the freed pages back to the disk, a few at a time (the WAL, cut back
    to its limit, never holds them all). A file an older version made is not rebuilt when
    opened (that needs its size again in free disk and holds off a server still using it):
    the log says how to, and its prune leaves it as it is."""
    import sqlite3

    from server.jobs.sqlite import GIVE_BACK_PAGES, SqliteJobStore

    def burst(store: SqliteJobStore) -> None:
        for _ in range(6):  # (all held at once, as a burst of queued jobs is)
            store.create("categories", {"media": "x" * 4_000_000}, None)
        for _ in range(6):
            claimed = store.claim(lease_s=60)
            assert claimed is not None and store.complete(claimed, {"ok": True})

    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    try:
        burst(store)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        grown = path.stat().st_size
        assert grown > 2 * GIVE_BACK_PAGES * 4096  # (the requests: several steps to give back)
        assert store.prune(older_than_s=-1) == 6
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert path.stat().st_size < 1_000_000, (grown, path.stat().st_size)
    finally:
        store.close()
    older = tmp_path / "older.sqlite3"
    made = sqlite3.connect(older)  # as an older server made it: no auto_vacuum
    made.execute("CREATE TABLE early (x)")
    made.close()
    with caplog.at_level("INFO", logger="server.jobs.sqlite"):
        store = SqliteJobStore(older)
    try:
        assert caplog.text.count("keeps its largest size") == 1
        assert store.db.execute("PRAGMA auto_vacuum").fetchone()["auto_vacuum"] == 0
        burst(store)
        assert store.prune(older_than_s=-1) == 6  # (and returns: nothing given back)
    finally:
        store.close()
    with caplog.at_level("INFO", logger="server.jobs.sqlite"):  # (start: checked, then served)
        SqliteJobStore(older).close()
    assert caplog.text.count("keeps its largest size") == 1


class LostAnswers:
    """The store's transactions as a network fault makes them: `lost` COMMITs done but their
    answer lost, then `down` transactions refused (the store unreachable)."""

    def __init__(self, store: JobStore, lost: int, down: int) -> None:
        self.transaction, self.lost, self.down = store.transaction, lost, down

    @contextlib.contextmanager
    def __call__(self, write: bool = True) -> Iterator[Execute]:
        if self.down and not self.lost:
            self.down -= 1
            raise JobStoreUnavailable()
        with self.transaction(write) as execute:
            yield execute
        if write and self.lost:
            self.lost -= 1
            raise JobStoreUnavailable()


@pytest.mark.parametrize("down", [0, 3])
def test_a_job_whose_commit_went_unanswered_is_looked_up(
    store: JobStore, down: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The INSERT's COMMIT reached the database but its answer was lost: the job was made, and
    the client gets it (a 503 would have it send the request again: a second job)."""
    monkeypatch.setattr(store_module, "SETTLE_RETRY_S", 0.01)
    monkeypatch.setattr(store, "transaction", LostAnswers(store, lost=1, down=down))
    job = store.create("categories", {"a": 1}, None)
    monkeypatch.undo()
    assert store.get(job.id) is not None
    assert [j.id for j in store.list(None, 10, None)[0]] == [job.id]


def test_a_job_the_store_never_confirmed_is_named_not_refused(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No answer after the COMMIT, nor while SETTLE_S lasts: a 504 naming the id the job may
    have (it does: the COMMIT had reached the database)."""
    monkeypatch.setattr(store_module, "SETTLE_S", 0.05)
    monkeypatch.setattr(store_module, "SETTLE_RETRY_S", 0.01)
    monkeypatch.setattr(store, "transaction", LostAnswers(store, lost=1, down=10**6))
    with pytest.raises(JobStoreUnconfirmed) as raised:
        store.create("categories", {"a": 1}, None)
    monkeypatch.undo()
    assert raised.value.status_code == 504 and raised.value.code == "job_store_unconfirmed"
    (job,) = store.list(None, 10, None)[0]
    assert f"`{job.id}`" in raised.value.message


def test_a_job_refused_before_its_commit_was_not_made(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unreachable from the start: a 503, nothing done (no look-up needed)."""
    monkeypatch.setattr(store, "transaction", LostAnswers(store, lost=0, down=1))
    with pytest.raises(JobStoreUnavailable):
        store.create("categories", {"a": 1}, None)
    monkeypatch.undo()
    assert store.list(None, 10, None)[0] == []


def test_takeovers_count_only_attempts_whose_lease_ran_out(store: JobStore) -> None:
    """An orderly release (SIGTERM) is not a takeover; a claim of a job whose lease ran out
    (its server killed, crashed or cut off) is."""
    job = store.create("categories", {}, None)
    first = store.claim(lease_s=60, owner="a")
    assert first is not None and first.takeovers == 0 and store.release(first)
    second = store.claim(lease_s=-1, owner="b")  # (a lease that has run out at once)
    assert second is not None and second.takeovers == 0
    third = store.claim(lease_s=60, owner="c")
    assert third is not None and third.id == job.id
    assert (third.attempt, third.takeovers) == (3, 1)
    assert store.get(job.id).takeovers == 1


def test_failed_webhooks_are_queued_again_on_request(store: JobStore) -> None:
    """`vlm-server redeliver-webhooks`: a delivery whose retries ran out (the receiver was
    down for longer than the schedule) is pending again, with a whole new schedule and its
    webhook-id; by job, or made since a time; delivered and pending ones are left alone."""
    ended = []
    for _ in range(2):
        job = store.create("categories", {"webhook_url": "http://h/"}, None)
        claimed = store.claim(lease_s=60)
        assert claimed is not None and store.complete(claimed, {"ok": True})
        ended.append(job.id)
    first, second = sorted(store.due_deliveries(), key=lambda d: ended.index(d["job_id"]))
    assert store.record_attempt(first["id"], 1, "failed", 0.0, 500, "HTTP 500")
    assert store.record_attempt(second["id"], 1, "delivered", 0.0, 200, None)
    assert store.redeliver(["job-none"]) == 0
    assert store.redeliver(since=store.now() + 60) == 0
    assert store.redeliver([ended[0]], since=store.now() - 60) == 1
    (again,) = store.due_deliveries()
    assert again["id"] == first["id"] and again["attempts"] == 0
    assert again["payload"] == first["payload"]
    assert store.redeliver() == 0  # (pending now: nothing failed)
