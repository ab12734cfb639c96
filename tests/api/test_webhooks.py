"""Webhooks: Standard Webhooks signatures checked with the reference library, retries with the
same webhook-id, 410 stops, deliveries survive a restart of the store."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from server.jobs.store import JobStore
from tests.helpers import data_uri, make_image, make_settings, start_client

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Receiver:
    """A real HTTP receiver on loopback that answers with the scripted statuses in turn."""

    def __init__(self, statuses: list[int]):
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses[min(len(receiver.received), len(receiver.statuses)) - 1]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/vlm"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver_factory() -> Iterator:
    made: list[Receiver] = []

    def make(statuses: list[int]) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for receiver in made:
        receiver.server.shutdown()


async def wait_for(predicate, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)


def settings(tiny_model_dir: Path, tmp_path: Path):
    return make_settings(
        tiny_model_dir,
        data_dir=tmp_path / "data",
        webhook_secret=SECRET,
        webhook_retry_delays=["0.05", "0.05", "0.05"],
    )


async def test_retried_until_delivered_with_the_same_signed_id(
    tiny_model_dir: Path, tmp_path: Path, receiver_factory
) -> None:
    receiver = receiver_factory([500, 503, 200])
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
    assert delivery["status"] == "delivered" and delivery["attempts"] == 3
    verifier = Webhook(SECRET)
    ids = set()
    for headers, raw in receiver.received:
        event = verifier.verify(raw, headers)  # the reference library checks the signature
        ids.add(headers["webhook-id"])
        assert event["type"] == "media.completed"
        assert event["data"]["id"] == job["id"] and event["data"]["status"] == "completed"
    assert len(ids) == 1  # one webhook-id across retries
    with pytest.raises(WebhookVerificationError):  # and a wrong secret does not verify
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(
            *reversed(receiver.received[0])
        )


async def test_410_stops_retrying(tiny_model_dir: Path, tmp_path: Path, receiver_factory) -> None:
    receiver = receiver_factory([410])
    body = {"model": "tiny", "media_url": data_uri(make_image()), "webhook_url": receiver.url}
    async for client in start_client(settings(tiny_model_dir, tmp_path)):
        job = (await client.post("/v2/media/categories", json=body)).json()
        await wait_for(lambda: len(receiver.received) >= 1)
        await asyncio.sleep(0.5)  # longer than the whole retry schedule
        delivery = (await client.get(job["status_url"])).json()["webhooks"][0]
    assert len(receiver.received) == 1
    assert delivery["status"] == "failed" and delivery["last_status"] == 410


def test_pending_delivery_survives_reopening(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.create("categories", {"webhook_url": "http://example.invalid/h"}, None)
    job = store.claim(lease_s=60)
    assert job is not None and store.complete(job, {"ok": True})
    store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite3")
    (due,) = reopened.due_deliveries()
    assert due["job_id"] == job.id and json.loads(due["payload"])["type"] == "media.completed"
