"""Webhooks: Standard Webhooks signatures checked with the reference library, retries with the
same webhook-id, 410 stops, a slow receiver holds back no one else, URLs that can never be reached
are refused at submit, deliveries survive a restart of the store."""

from __future__ import annotations

import asyncio
import base64
import datetime
import email.utils
import json
import secrets
import time
from pathlib import Path

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from server.cli import main
from server.jobs.sqlite import SqliteJobStore as JobStore
from server.jobs.webhooks import retry_after_s
from tests.helpers import data_uri, make_image, make_settings, start_client

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def wait_for(predicate, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)


def metric(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])


def settings(tiny_model_dir: Path, tmp_path: Path):
    return make_settings(
        tiny_model_dir,
        data_dir=tmp_path / "data",
        webhook_secret=SECRET,
        webhook_retry_delays=["0.05", "0.05", "0.05"],
    )


async def test_retried_until_delivered_with_the_same_signed_id(
    tiny_model_dir: Path, tmp_path: Path, webhook_receiver
) -> None:
    receiver = webhook_receiver([500, 503, 200])
    body = {"model": "tiny", "media_url": data_uri(make_image()), "webhook_url": receiver.url}
    async for client in start_client(settings(tiny_model_dir, tmp_path)):
        job = (await client.post("/v2/media/categories", json=body)).json()
        assert job["status"] == "queued"
        await wait_for(lambda: len(receiver.received) >= 3)
        for _ in range(100):
            delivery = (await client.get(job["status_url"])).json()["webhooks"][0]
            if delivery["status"] == "delivered":
                break
            await asyncio.sleep(0.05)
        metrics = (await client.get("/metrics")).text
        listed = (await client.get("/v2/media/jobs")).json()["data"]
    assert delivery["status"] == "delivered" and delivery["attempts"] == 3
    assert [j["webhooks"] for j in listed] == [[delivery]]  # the list shows them as status does
    assert listed[0]["result"]["id"] == "mcat-" + job["id"].removeprefix("job-")
    assert metric(metrics, 'vlm_webhook_attempts_total{outcome="retrying"}') == 2
    assert metric(metrics, 'vlm_webhook_attempts_total{outcome="delivered"}') == 1
    assert metric(metrics, 'vlm_webhook_deliveries{status="delivered"}') == 1
    verifier = Webhook(SECRET)
    ids = set()
    for headers, raw in receiver.received:
        event = verifier.verify(raw, headers)  # the reference library checks the signature
        ids.add(headers["webhook-id"])
        assert headers["user-agent"].startswith("vlm-server/")  # (a receiver can tell who)
        assert event["type"] == "media.completed"
        assert event["data"]["id"] == job["id"] and event["data"]["status"] == "completed"
        # Standard Webhooks' payload: type, timestamp, data; compact, as the API writes JSON
        assert list(event) == ["type", "timestamp", "data"]
        # (its own separators: a generated answer inside may hold '": ' in a string)
        assert raw.startswith(b'{"type":"media.completed","timestamp":"')
        sent = datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        assert abs(sent.timestamp() - time.time()) < 60 and event["data"]["progress"] == 1.0
    assert len(ids) == 1  # one webhook-id across retries
    with pytest.raises(WebhookVerificationError):  # and a wrong secret does not verify
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(
            *reversed(receiver.received[0])
        )


async def test_each_projects_webhooks_are_signed_with_its_own_secret(
    tiny_model_dir: Path, tmp_path: Path, webhook_receiver, capsys, monkeypatch
) -> None:
    """--webhook-secret-per-project: team-b's job pointed at team-a's receiver is signed with
    team-b's secret, which team-a's receiver (holding what `vlm-server webhook-secret
    --project team-a` printed) refuses; team-a's own job verifies there."""
    receiver = webhook_receiver([200, 200])
    config = make_settings(
        tiny_model_dir,
        data_dir=tmp_path / "data",
        webhook_secret=SECRET,
        api_keys=["sk-a team-a", "sk-b team-b"],
        webhook_secret_per_project=True,
    )
    body = {"model": "tiny", "media_url": data_uri(make_image()), "webhook_url": receiver.url}
    async for client in start_client(config):
        for key in ("sk-a", "sk-b"):
            headers = {"Authorization": f"Bearer {key}"}
            response = await client.post("/v2/media/categories", json=body, headers=headers)
            assert response.status_code == 202, response.text
            await wait_for(lambda n=len(receiver.received): len(receiver.received) > n)
    data_dir = str(tmp_path / "data")
    monkeypatch.setenv("VLM_API_KEYS", "sk-a team-a,sk-b team-b")  # (serve's keys, as it had them)
    printed = {}
    for project in ("team-a", "team-b", None):
        capsys.readouterr()
        args = ["webhook-secret", "--data-dir", data_dir]
        assert main([*args, "--project", project] if project else args) == 0
        printed[project] = capsys.readouterr().out.strip()
    assert printed[None] == SECRET and len(set(printed.values())) == 3
    (a_headers, a_raw), (b_headers, b_raw) = receiver.received
    assert Webhook(printed["team-a"]).verify(a_raw, a_headers)["type"] == "media.completed"
    assert Webhook(printed["team-b"]).verify(b_raw, b_headers)["type"] == "media.completed"
    for secret in (printed["team-a"], SECRET):  # team-a's receiver, or one on the shared key
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(b_raw, b_headers)


async def test_410_stops_retrying(tiny_model_dir: Path, tmp_path: Path, webhook_receiver) -> None:
    receiver = webhook_receiver([410])
    body = {"model": "tiny", "media_url": data_uri(make_image()), "webhook_url": receiver.url}
    async for client in start_client(settings(tiny_model_dir, tmp_path)):
        job = (await client.post("/v2/media/categories", json=body)).json()
        await wait_for(lambda: len(receiver.received) >= 1)
        await asyncio.sleep(0.5)  # longer than the whole retry schedule
        delivery = (await client.get(job["status_url"])).json()["webhooks"][0]
    assert len(receiver.received) == 1
    assert delivery["status"] == "failed" and delivery["last_status"] == 410


async def test_media_completions_job_is_delivered(
    tiny_model_dir: Path, tmp_path: Path, webhook_receiver
) -> None:
    receiver = webhook_receiver([200])
    body = {
        "model": "tiny",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(make_image())}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        "max_tokens": 8,
        "webhook_url": receiver.url,
    }
    key = {"Idempotency-Key": "order-17"}
    async for client in start_client(settings(tiny_model_dir, tmp_path)):
        response = await client.post("/v2/media/completions", json=body, headers=key)
        assert response.status_code == 202, response.text
        await wait_for(lambda: len(receiver.received) >= 1)
        status_url = response.json()["status_url"]
        while (shown := (await client.get(status_url)).json())["webhooks"][0]["status"] != (
            "delivered"  # (recorded just after the receiver answered)
        ):
            await asyncio.sleep(0.05)
        # The same request again: the job as its status URL shows it, its delivery included.
        again = await client.post("/v2/media/completions", json=body, headers=key)
    assert again.status_code == 202 and again.json() == shown
    assert [d["status"] for d in again.json()["webhooks"]] == ["delivered"]
    headers, raw = receiver.received[0]
    event = Webhook(SECRET).verify(raw, headers)
    assert event["type"] == "media.completed"
    assert event["data"]["kind"] == "completions"
    completion = event["data"]["result"]
    assert completion["object"] == "chat.completion"
    assert completion["usage"]["completion_tokens"] <= 8


async def test_a_slow_receiver_does_not_hold_back_the_others(
    tiny_model_dir: Path, tmp_path: Path, webhook_receiver
) -> None:
    slow = webhook_receiver([200], delay_s=3.0)
    fast = webhook_receiver([200])
    image = data_uri(make_image())
    async for client in start_client(settings(tiny_model_dir, tmp_path)):
        for receiver in (slow, fast):
            body = {"model": "tiny", "media_url": image, "webhook_url": receiver.url}
            assert (await client.post("/v2/media/categories", json=body)).status_code == 202
        await wait_for(lambda: fast.answered_at and slow.answered_at)
    assert fast.answered_at[0] < slow.answered_at[0]  # fast did not wait for slow's 3 s


async def test_a_receivers_answer_costs_no_memory_and_no_more_than_the_timeout(
    tiny_model_dir: Path, tmp_path: Path, webhook_receiver
) -> None:
    """Only the receiver's status is read: a 200 with a body that never ends is delivered,
    its body left unread; a receiver that trickles its headers a byte at a time is given up
    on after --webhook-timeout for the whole attempt (each byte reset httpx's own timeout)."""
    endless = webhook_receiver([200], answer="endless")
    trickle = webhook_receiver([200], answer="trickle")
    image = data_uri(make_image())
    configured = make_settings(
        tiny_model_dir,
        data_dir=tmp_path / "data",
        webhook_secret=SECRET,
        webhook_retry_delays=["60"],
        webhook_timeout=1.0,
    )
    async for client in start_client(configured):
        urls = {}
        for name, receiver in (("endless", endless), ("trickle", trickle)):
            body = {"model": "tiny", "media_url": image, "webhook_url": receiver.url}
            answer = await client.post("/v2/media/categories", json=body)
            assert answer.status_code == 202, answer.text
            urls[name] = answer.json()["status_url"]
        deadline = asyncio.get_running_loop().time() + 30
        while True:  # (a job's delivery exists once the job has ended)
            hooks = [(await client.get(urls[name])).json()["webhooks"] for name in urls]
            delivered, late = [found[0] if found else {} for found in hooks]
            if delivered.get("status") == "delivered" and late.get("attempts") == 1:
                break
            assert asyncio.get_running_loop().time() < deadline, hooks
            await asyncio.sleep(0.1)
    assert late["status"] == "pending" and "within 1 s" in late["last_error"]
    assert endless.body_bytes_sent < 64 * 2**20  # what the sockets' buffers took, no more


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://localhost:9/h", ["127.0.0.1"]),  # not on the allow-list
        ("https://example.com/h", ["127.0.0.1"]),
        ("http://10.1.2.3/h", []),  # a private literal without an allow-list
        ("http://[::1]:9/h", []),
        ("http://", []),  # no host
        ("http://[::1/h", []),  # malformed
        ("ftp://example.com/h", []),  # not http(s)
        ("http://localhost:9/h", []),  # a name that resolves to a loopback address
    ],
)
async def test_unreachable_webhook_url_is_refused_at_submit(
    tiny_model_dir: Path, tmp_path: Path, url: str, allowed: list[str]
) -> None:
    config = make_settings(
        tiny_model_dir, data_dir=tmp_path / "data", allowed_media_domains=allowed
    )
    image = data_uri(make_image())
    async for client in start_client(config):
        for path, body in (
            ("/v2/media/categories", {"model": "tiny", "media_url": image}),
            (
                "/v2/media/completions",
                {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
            ),
        ):
            response = await client.post(path, json={**body, "webhook_url": url})
            assert response.status_code == 400, (path, url, response.text)
            error = response.json()["error"]
            assert error["param"] == "webhook_url" and error["code"] == "invalid_webhook_url"
        assert not services_jobs(client)


def services_jobs(client) -> dict[str, int]:
    return client.app.state.services.jobs.count_by_status()


def test_retry_after_as_seconds_or_http_date() -> None:
    def response(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    assert retry_after_s(response("7")) == 7
    in_a_minute = email.utils.format_datetime(
        datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=60), usegmt=True
    )
    assert 55 <= retry_after_s(response(in_a_minute)) <= 61
    assert retry_after_s(response("soon")) is None
    # a receiver's wait is bounded (400 nines were an infinite one, stored, that broke the
    # job's status; a year-9999 date held its job past the retention)
    assert retry_after_s(response("9" * 400)) == 3600
    assert retry_after_s(response("Fri, 31 Dec 9999 23:59:59 GMT")) == 3600
    superscript = httpx.Response(503, headers=[(b"Retry-After", "²".encode("latin-1"))])
    assert retry_after_s(superscript) is None  # (a digit to Python, no number)


def test_pending_delivery_survives_reopening(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.create("categories", {"webhook_url": "http://example.invalid/h"}, None)
    job = store.claim(lease_s=60)
    assert job is not None and store.complete(job, {"ok": True})
    store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite3")
    (due,) = reopened.due_deliveries()
    assert due["job_id"] == job.id and json.loads(due["payload"])["type"] == "media.completed"


async def test_cancelling_a_running_job_stops_it_and_reports_once(
    tiny_model_dir: Path, tmp_path: Path, webhook_receiver
) -> None:
    """POST /v2/media/status/{id}/cancel on a job that is decoding: its sequence leaves the
    engine, the job ends `cancelled` (and stays so), cancelling again (or DELETE) answers the
    same, and the webhook reports `media.cancelled` exactly once."""
    receiver = webhook_receiver([200])
    content = [
        {"type": "image_url", "image_url": {"url": data_uri(make_image())}},
        {"type": "text", "text": "Describe it."},
    ]
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4000,
        "ignore_eos": True,  # a job that runs long enough to be cancelled mid-way
        "webhook_url": receiver.url,
    }
    async for client in start_client(settings(tiny_model_dir, tmp_path)):
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        job = (await client.post("/v2/media/completions", json=body)).json()
        await wait_for(lambda: engine.num_running == 1)  # noqa: B023  (awaited at once)
        cancelled = await client.post(f"/v2/media/status/{job['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        await wait_for(lambda: engine.num_running == 0, timeout=5)  # noqa: B023
        again = await client.delete(f"/v2/media/status/{job['id']}")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
        # its media.cancelled delivery, in the answer as at the status URL
        assert [w["url"] for w in again.json()["webhooks"]] == [receiver.url]
        await wait_for(lambda: len(receiver.received) >= 1)
        await asyncio.sleep(1.5)  # no second delivery, no late result
        status = (await client.get(job["status_url"])).json()
        missing = await client.post("/v2/media/status/job-nope/cancel")
    assert status["status"] == "cancelled" and status["result"] is None
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
    assert len(receiver.received) == 1
    event = Webhook(SECRET).verify(receiver.received[0][1], receiver.received[0][0])
    assert event["type"] == "media.cancelled" and event["data"]["id"] == job["id"]


async def test_a_finished_job_cannot_be_cancelled(tiny_model_dir: Path, tmp_path: Path) -> None:
    body = {"model": "tiny", "media_url": data_uri(make_image()), "async": True}
    async for client in start_client(settings(tiny_model_dir, tmp_path)):
        job = (await client.post("/v2/media/categories", json=body)).json()
        for _ in range(200):
            if (await client.get(job["status_url"])).json()["status"] == "completed":
                break
            await asyncio.sleep(0.05)
        response = await client.post(f"/v2/media/status/{job['id']}/cancel")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_not_cancellable"


async def test_jobs_are_listed_newest_first_in_pages(tiny_model_dir: Path, tmp_path: Path) -> None:
    body = {"model": "tiny", "media_url": data_uri(make_image()), "async": True}
    async for client in start_client(settings(tiny_model_dir, tmp_path)):
        ids = [
            (await client.post("/v2/media/categories", json=body)).json()["id"] for _ in range(3)
        ]
        first = (await client.get("/v2/media/jobs", params={"limit": 2})).json()
        rest = await client.get("/v2/media/jobs", params={"limit": 2, "after": first["last_id"]})
        for _ in range(200):
            done = (await client.get("/v2/media/jobs", params={"status": "completed"})).json()
            if len(done["data"]) == 3:
                break
            await asyncio.sleep(0.05)
        bad = await client.get("/v2/media/jobs", params={"status": "lost"})
        stale = await client.get("/v2/media/jobs", params={"after": "job-pruned-long-ago"})
    assert first["object"] == "list" and first["has_more"] is True
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["first_id"] == ids[2]
    assert [j["id"] for j in rest.json()["data"]] == ids[:1] and rest.json()["has_more"] is False
    assert {j["id"] for j in done["data"]} == set(ids)
    assert all(j["status"] == "completed" for j in done["data"])
    assert bad.status_code == 400
    assert stale.status_code == 400 and stale.json()["error"]["param"] == "after"


async def test_an_attempts_outcome_is_recorded_once_the_store_is_back(tmp_path: Path) -> None:
    """The receiver has the webhook: its outcome is not dropped for a store outage (an ERROR
    was logged, and the delivery, still pending, went out again), but written once the store
    answers."""
    from server.exceptions import JobStoreUnavailable
    from server.jobs.webhooks import WebhookSender

    store = JobStore(tmp_path / "jobs.sqlite3")
    store.create("categories", {"webhook_url": "http://h/"}, None)
    claimed = store.claim(lease_s=60)
    assert claimed is not None and store.complete(claimed, {})
    (due,) = store.due_deliveries()
    record, calls = store.record_attempt, []

    def down_twice(*args: object) -> bool:
        calls.append(args)
        if len(calls) <= 2:
            raise JobStoreUnavailable()
        return record(*args)  # type: ignore[arg-type]

    store.record_attempt = down_twice  # type: ignore[method-assign]
    sender = WebhookSender(store, "whsec_" + "A" * 32, (5.0,), 5.0, ())
    try:
        await asyncio.wait_for(sender._record(due["id"], 1, "delivered", 0.0, 200, None), 10)
    finally:
        await sender.client.aclose()
        store.close()
    assert len(calls) == 3
    reopened = JobStore(tmp_path / "jobs.sqlite3")
    assert reopened.deliveries_of(claimed.id)[0]["status"] == "delivered"
    reopened.close()


async def test_no_attempt_starts_once_the_drain_began_even_from_a_poll_under_way(
    tmp_path: Path, webhook_receiver
) -> None:
    """drain() while the store's poll for due deliveries runs: what it returns is not sent (it
    was, then cut off by the stop and sent again after the restart: a duplicate)."""
    import threading

    from server.jobs import webhooks

    store = JobStore(tmp_path / "jobs.sqlite3")
    receiver = webhook_receiver([200])
    store.create("categories", {"webhook_url": receiver.url}, None)
    job = store.claim(lease_s=60)
    assert job is not None and store.complete(job, {})
    polling, go_on = threading.Event(), threading.Event()
    poll = store.due_deliveries

    def slow_poll(*args: object) -> list:
        polling.set()
        assert go_on.wait(10)
        return poll(*args)  # type: ignore[arg-type]

    store.due_deliveries = slow_poll  # type: ignore[method-assign]
    sender = webhooks.WebhookSender(store, SECRET, (5.0,), 5.0, ("127.0.0.1",))
    sender.start()
    try:
        assert await asyncio.to_thread(polling.wait, 10)
        sender.drain()
        go_on.set()
        await asyncio.sleep(0.5)
        assert sender.in_flight == {} and receiver.received == []
    finally:
        go_on.set()
        await sender.stop()
        store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite3")
    assert [d["status"] for d in reopened.deliveries_of(job.id)] == ["pending"]
    reopened.close()


async def test_deliveries_start_when_they_can_not_at_the_next_poll(
    tmp_path: Path, webhook_receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is polled every second for others' deliveries; this server's own start at
    once: one queued here (a job ended), a retry as it comes due, and one left waiting for room
    when an attempt ends. With the poll made an hour long, each still goes out."""
    from server.jobs import webhooks

    monkeypatch.setattr(webhooks, "POLL_S", 3600.0)
    monkeypatch.setattr(webhooks, "MAX_IN_FLIGHT", 1)
    store = JobStore(tmp_path / "jobs.sqlite3")
    waiting = [webhook_receiver([200], delay_s=0.2) for _ in range(3)]

    def end_job(url: str) -> None:
        store.create("categories", {"webhook_url": url}, None)
        job = store.claim(lease_s=60)
        assert job is not None and store.complete(job, {})

    for receiver in waiting:  # (queued before the sender starts: its first poll finds them)
        end_job(receiver.url)
    sender = webhooks.WebhookSender(store, SECRET, (0.05,), 5.0, ("127.0.0.1",))
    sender.start()
    try:
        # one at a time (room for one): each attempt's end starts the next
        await wait_for(lambda: all(r.answered_at for r in waiting), timeout=20)
        retried = webhook_receiver([500, 200])
        await asyncio.to_thread(end_job, retried.url)  # (a job ending in the worker's thread)
        await wait_for(lambda: len(retried.answered_at) == 2, timeout=20)
    finally:
        await sender.stop()
        store.close()
    assert [len(r.received) for r in waiting] == [1, 1, 1]


async def test_a_watchers_trouble_is_not_the_ending_jobs(tmp_path: Path) -> None:
    """The store tells its watchers (this process's senders) after the commit that ended a job:
    one whose event loop is gone does not fail the job's end, and a sender's stop unwatches
    only its own."""
    from server.jobs import webhooks

    store = JobStore(tmp_path / "jobs.sqlite3")

    def gone() -> None:
        raise RuntimeError("Event loop is closed")

    store.watch_deliveries(gone)
    first = webhooks.WebhookSender(store, SECRET, (5.0,), 5.0, ())
    second = webhooks.WebhookSender(store, SECRET, (5.0,), 5.0, ())
    first.start()
    second.start()
    await first.stop()
    try:
        assert store.delivery_watchers == [gone, second.watcher]
        store.create("categories", {"webhook_url": "http://h/"}, None)
        job = store.claim(lease_s=60)
        assert job is not None and store.complete(job, {})  # (despite the watcher)
        assert store.deliveries_of(job.id)[0]["status"] == "pending"
    finally:
        await second.stop()
        store.close()
    assert store.delivery_watchers == [gone]
