"""SIGKILL, twice: a real server killed mid-job resumes the job after a restart on the same data
dir, and a webhook whose first attempt failed is still delivered (same webhook-id) after the
server is killed again while the retry is pending. Signatures are checked with the
`standardwebhooks` reference library, keyed with the secret the server generated in its data dir."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.helpers import scene_video_job, server_process

pytestmark = pytest.mark.slow


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)  # no shutdown: whatever was running just stops
    process.wait(timeout=30)


def test_job_and_its_webhook_survive_sigkill(
    tiny_model_dir: Path, tmp_path: Path, webhook_receiver
) -> None:
    data_dir = tmp_path / "data"
    args = [
        *("--model", str(tiny_model_dir), "--served-model-name", "tiny"),
        *("--data-dir", str(data_dir), "--allowed-media-domains", "127.0.0.1"),
        *("--webhook-retry-delays", "4"),  # long enough to kill the server while it waits
        *("--max-num-seqs", "1"),  # frames one at a time: the job is part done for a while
    ]
    receiver = webhook_receiver([500, 200])
    body = scene_video_job(receiver.url)
    with server_process(tmp_path / "first.log", *args) as (url, process):
        job = httpx.post(f"{url}/v2/media/categories", json=body, timeout=60).json()

        def some_frames_done() -> bool:
            now = httpx.get(f"{url}{job['status_url']}", timeout=10).json()
            return now["status"] == "processing" and 0 < now["progress"] < 1

        wait_until(some_frames_done, 60, "the job to be part done")
        kill(process)  # mid-job
    assert not receiver.received

    with server_process(tmp_path / "second.log", *args) as (url, process):
        wait_until(lambda: receiver.received, 120, "the first webhook attempt")
        kill(process)  # the first attempt failed (500): the retry is pending

    with server_process(tmp_path / "third.log", *args) as (url, _):
        wait_until(lambda: len(receiver.received) >= 2, 60, "the retried webhook")

        def delivered() -> dict | None:
            job_now = httpx.get(f"{url}{job['status_url']}", timeout=10).json()
            return job_now if job_now["webhooks"][0]["status"] == "delivered" else None

        wait_until(delivered, 10, "the delivery to be recorded")
        final = delivered()
    assert final is not None and final["status"] == "completed"
    assert final["result"]["frames"]  # a restarted server ran the whole job

    verifier = Webhook((data_dir / "webhook_secret").read_text().strip())
    ids = {headers["webhook-id"] for headers, _ in receiver.received}
    assert len(ids) == 1 and final["webhooks"][0]["id"] in ids
    for headers, raw in receiver.received:
        event = verifier.verify(raw, headers)
        assert event["type"] == "media.completed" and event["data"]["id"] == job["id"]
        assert event["data"]["result"] == final["result"]
