"""Two real `vlm-server` replicas on one PostgreSQL job store: a job submitted to one is seen at
the other's status URL; the replica running it is SIGKILLed mid-job and the other takes it over
when the lease expires and completes it; its webhook arrives (once or more) always with one
webhook-id, signed with the secret the replicas share through the store. Then jobs submitted to
both replicas at once each run exactly once, and one Idempotency-Key is one job at either."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psycopg
import pytest
from standardwebhooks.webhooks import Webhook

from tests.e2e.test_job_durability import wait_until
from tests.helpers import data_uri, make_image, make_video, scene_video_job, server_process
from tests.jobs.pg import fresh_database

pytestmark = pytest.mark.slow

LEASE_S = 4


def holder_pid(database: str, job_id: str) -> int | None:
    """The pid of the replica whose lease the job is under (owner = BOOT:PIDNS:PID:RANDOM)."""
    with psycopg.connect(database) as connection:
        row = connection.execute(
            "SELECT owner FROM jobs WHERE id = %s AND status = 'processing'", (job_id,)
        ).fetchone()
    return int(row[0].split(":")[-2]) if row and row[0] else None


def job_row(database: str, job_id: str) -> tuple:
    with psycopg.connect(database) as connection:
        return connection.execute(
            "SELECT status, attempt FROM jobs WHERE id = %s", (job_id,)
        ).fetchone()


def test_two_replicas_share_jobs(tiny_model_dir: Path, tmp_path: Path, webhook_receiver) -> None:
    receiver = webhook_receiver([200])
    with fresh_database() as database, ExitStack() as stack:

        def replica(name: str) -> tuple[str, subprocess.Popen]:
            return stack.enter_context(
                server_process(
                    tmp_path / f"{name}.log",
                    *("--model", str(tiny_model_dir), "--served-model-name", "tiny"),
                    *("--data-dir", str(tmp_path / f"data-{name}")),
                    *("--allowed-media-domains", "127.0.0.1"),
                    *("--job-store", database, "--job-lease", str(LEASE_S)),
                    *("--max-num-seqs", "1"),  # frames one at a time: the job runs a while
                )
            )

        replicas = [replica("a"), replica("b")]
        body = scene_video_job(receiver.url)
        job = httpx.post(f"{replicas[0][0]}/v2/media/categories", json=body, timeout=60).json()

        def part_done() -> bool:
            now = httpx.get(f"{replicas[1][0]}{job['status_url']}", timeout=10).json()
            return now["status"] == "processing" and 0 < now["progress"] < 1

        wait_until(part_done, 120, "the job to be part done (read at the other replica)")
        pid = holder_pid(database, job["id"])
        (running,) = [r for r in replicas if r[1].pid == pid]
        (other,) = [r for r in replicas if r[1].pid != pid]
        running[1].send_signal(signal.SIGKILL)
        running[1].wait(timeout=30)
        killed_at = time.monotonic()

        wait_until(lambda: receiver.received, 180, "the webhook from the surviving replica")
        final = httpx.get(f"{other[0]}{job['status_url']}", timeout=10).json()
        assert final["status"] == "completed" and final["result"]["frames"]
        status, attempt = job_row(database, job["id"])
        assert status == "completed" and attempt >= 2  # taken over
        assert time.monotonic() - killed_at > LEASE_S - 1  # not before the lease expired

        with psycopg.connect(database) as connection:
            (secret,) = connection.execute(
                "SELECT value FROM shared_values WHERE name = 'webhook_secret'"
            ).fetchone()
        assert (tmp_path / "data-a" / "webhook_secret").read_text() == secret
        assert (tmp_path / "data-b" / "webhook_secret").read_text() == secret
        ids = {headers["webhook-id"] for headers, _ in receiver.received}
        assert len(ids) == 1
        for headers, raw in receiver.received:
            event = Webhook(secret).verify(raw, headers)
            assert event["type"] == "media.completed" and event["data"]["id"] == job["id"]

        # Both replicas up again; jobs submitted to both at once run exactly once each.
        replicas = [other, replica("c")]
        receiver.received.clear()
        image_body = {"model": "tiny", "media_url": data_uri(make_image()), "async": True}
        image_body["webhook_url"] = receiver.url

        def submit(n: int) -> str:
            url = replicas[n % 2][0]
            response = httpx.post(f"{url}/v2/media/categories", json=image_body, timeout=60)
            assert response.status_code == 202, response.text
            return response.json()["id"]

        with ThreadPoolExecutor(8) as pool:
            job_ids = list(pool.map(submit, range(12)))

        # One Idempotency-Key means one job at every replica; another body with it is a 409.
        keyed = [
            httpx.post(
                f"{url}/v2/media/categories",
                json=image_body,
                headers={"Idempotency-Key": "order-17"},
                timeout=60,
            )
            for url, _ in replicas
        ]
        assert [r.status_code for r in keyed] == [202, 202]
        assert keyed[0].json()["id"] == keyed[1].json()["id"]
        reused = httpx.post(
            f"{replicas[1][0]}/v2/media/categories",
            json={**image_body, "use_scenes": True},
            headers={"Idempotency-Key": "order-17"},
            timeout=60,
        )
        assert reused.status_code == 409
        assert reused.json()["error"]["code"] == "idempotency_key_reused"
        job_ids.append(keyed[0].json()["id"])

        def all_done() -> bool:
            return all(job_row(database, job_id)[0] == "completed" for job_id in job_ids)

        wait_until(all_done, 240, "every job to complete")
        with psycopg.connect(database) as connection:
            (ended,) = connection.execute(
                "SELECT COUNT(*) FROM deliveries WHERE job_id = ANY(%s)", (job_ids,)
            ).fetchone()
        assert ended == len(job_ids)  # one end (and one webhook) per job: completed once
        wait_until(lambda: len(receiver.received) >= len(job_ids), 60, "every webhook")
        events = [Webhook(secret).verify(raw, headers) for headers, raw in receiver.received]
        assert sorted(event["data"]["id"] for event in events) == sorted(job_ids)
        assert len({headers["webhook-id"] for headers, _ in receiver.received}) == len(job_ids)


class StalledVideo:
    """A video URL whose download sends its first half, then waits for `release` (so a job is
    surely mid-download, its video partly spooled, while a test does something else)."""

    def __init__(self, video: bytes):
        self.release = threading.Event()
        self.requested = threading.Event()  # its download began
        stalled = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                stalled.requested.set()
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Content-Length", str(len(video)))
                self.end_headers()
                self.wfile.write(video[: len(video) // 2])
                self.wfile.flush()
                stalled.release.wait(300)
                self.wfile.write(video[len(video) // 2 :])

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/clip.mp4"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_second_server_on_the_same_data_dir_does_not_take_a_running_job(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """SQLite: a second server started (by mistake) on the first one's data dir while the first
    is downloading a job's video leaves the job, and the spooled download, alone; the first
    completes the job in its one attempt."""
    args = [
        *("--model", str(tiny_model_dir), "--served-model-name", "tiny"),
        *("--data-dir", str(tmp_path / "data"), "--allowed-media-domains", "127.0.0.1"),
        *("--media-fetch-timeout", "300"),
    ]
    video = StalledVideo(make_video(seconds=10, fps=12, cuts=(3.0, 6.0)))
    body = {"model": "tiny", "media_url": video.url, "use_scenes": True, "async": True}
    try:
        with server_process(tmp_path / "first.log", *args) as (url, _):
            job = httpx.post(f"{url}/v2/media/categories", json=body, timeout=60).json()

            def status() -> dict:
                return httpx.get(f"{url}{job['status_url']}", timeout=10).json()

            wait_until(lambda: status()["status"] == "processing", 60, "the job to start")
            with server_process(tmp_path / "second.log", *args):
                assert status()["status"] == "processing"  # the download is still stalled
                video.release.set()
                wait_until(lambda: status()["status"] != "processing", 180, "the job to end")
            assert status()["status"] == "completed", status()
            database = sqlite3.connect(tmp_path / "data" / "jobs.sqlite3")
            (attempt,) = database.execute(
                "SELECT attempt FROM jobs WHERE id = ?", (job["id"],)
            ).fetchone()
            assert attempt == 1
        assert "lost its lease" not in (tmp_path / "first.log").read_text()
    finally:
        video.release.set()
        video.server.shutdown()
