"""SIGTERM, and Ctrl-C as a terminal sends it (SIGINT to the whole process group, decode workers
included), on a real server process: in-flight requests finish, new ones are answered 503
`shutting_down` while the listener stays up, the process exits cleanly with no traceback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.helpers import data_uri, make_image, make_video, server_process

pytestmark = pytest.mark.slow

BODY = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 600,
    "ignore_eos": True,
    "stream": True,
}


def drain_while_streaming(url: str, stop: Callable[[], None]) -> list[str]:
    """Starts a long stream, calls stop() once it flows, checks a new request gets a 503;
    returns the stream's finish reasons once it has ended."""
    finish_reasons: list[str] = []
    done = threading.Event()
    first_chunk = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=BODY, timeout=120) as r:
            for line in r.iter_lines():
                first_chunk.set()
                if line == "data: [DONE]":
                    done.set()
                elif line.startswith("data: "):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0].get("finish_reason"):
                        finish_reasons.append(choices[0]["finish_reason"])

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(60)
    stop()
    # The listener is still up while the stream finishes: answered, not refused.
    refused = httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=10)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["retry-after"]
    # Prometheus still scrapes a replica that drains (its last requests are counted).
    assert httpx.get(f"{url}/health", timeout=10).status_code == 503
    scraped = httpx.get(f"{url}/metrics", timeout=10)
    assert scraped.status_code == 200 and "vlm_running_sequences" in scraped.text
    reader.join(timeout=120)
    assert done.is_set()
    return finish_reasons


def assert_clean_exit(process: object, log_path: Path) -> None:
    # uvicorn re-raises the signal after its clean shutdown: -SIGTERM, or 130 after Ctrl-C.
    assert process.wait(timeout=60) in (0, -signal.SIGTERM, 130)  # type: ignore[attr-defined]
    log = log_path.read_text()
    assert "Application shutdown complete" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log


def test_sigterm_drains_in_flight_requests(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny"]
    # named in the summary, whatever VLM_*
    args += ["--enforce-eager", "--no-async-scheduling", "--fused-decoder"]
    log_path = tmp_path / "server.log"
    with server_process(log_path, *args, "--shutdown-timeout", "60") as (url, process):
        # a proxy on this host (--forwarded-allow-ips' default) names the client it saw
        forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Request-ID": "via-proxy"}
        assert httpx.get(f"{url}/health", headers=forwarded).status_code == 200
        reasons = drain_while_streaming(url, lambda: process.send_signal(signal.SIGTERM))
        assert reasons == ["length"]
        assert_clean_exit(process, log_path)
    (summary,) = [line for line in log_path.read_text().splitlines() if "ready: " in line]
    parts = ("serving tiny (qwen2-vl", "device cpu", "KV cache", "auth off", f"open {url}/")
    parts += ("images without a detail: at most 1280 tokens (--auto-image-tokens 0",)
    parts += (f"(jobs: sqlite {tmp_path.resolve()}/",)  # the file, absolute
    for part in (*parts, "decode: fused decoder, reference attention, eager, sync scheduling"):
        assert part in summary, summary
    (access,) = [line for line in log_path.read_text().splitlines() if "[via-proxy]" in line]
    assert access.endswith(" ms from 203.0.113.7"), access


def test_sigterm_puts_running_jobs_back_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A job running when SIGTERM comes goes back to the queue at once, while the drain still
    waits on an in-flight request (not when it ends: an orchestrator's SIGKILL may come
    first); the request still finishes and the server exits cleanly."""
    from tests.e2e.test_job_durability import wait_until
    from tests.e2e.test_replicas import StalledVideo

    data = tmp_path / "data"
    args = [
        *("--model", str(tiny_model_dir), "--served-model-name", "tiny"),
        *("--data-dir", str(data), "--allowed-media-domains", "127.0.0.1"),
        *("--media-fetch-timeout", "300", "--shutdown-timeout", "120"),
    ]
    for_job, for_request = (StalledVideo(make_video()) for _ in range(2))
    log_path = tmp_path / "server.log"

    def status(job_id: str) -> str:
        with contextlib.closing(sqlite3.connect(data / "jobs.sqlite3")) as database:
            return database.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    try:
        with server_process(log_path, *args) as (url, process):
            body = {"model": "tiny", "media_url": for_job.url, "async": True}
            job = httpx.post(f"{url}/v2/media/categories", json=body, timeout=60).json()
            wait_until(lambda: status(job["id"]) == "processing", 60, "the job to start")
            video = {"type": "video_url", "video_url": {"url": for_request.url}}
            chat = {
                "model": "tiny",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": [video]}],
            }
            answers: list[int] = []
            request = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120).status_code
                )
            )
            request.start()
            assert for_request.requested.wait(60)  # the request's download is under way
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: status(job["id"]) == "queued", 20, "the job to be put back")
            assert process.poll() is None and request.is_alive()  # the drain goes on
            for_request.release.set()
            request.join(timeout=120)
            assert answers == [200]
            assert_clean_exit(process, log_path)
        assert "goes back to the queue (this server is stopping)" in log_path.read_text()
    finally:
        for stalled in (for_job, for_request):
            stalled.release.set()
            stalled.server.shutdown()


def test_the_drain_waits_for_webhook_attempts_in_flight(
    tiny_model_dir: Path, tmp_path: Path, webhook_receiver
) -> None:
    """A webhook attempt in flight when the stop comes is waited for like a request: its
    receiver's 200 is recorded (it had been cut off and sent again after the restart, a
    duplicate). Stopped by Ctrl-C as a script's background job (SIGINT came in ignored),
    the server still exits 130, not 0."""
    receiver = webhook_receiver([200], delay_s=3.0)
    data = tmp_path / "data"
    args = [
        *("--model", str(tiny_model_dir), "--served-model-name", "tiny"),
        *("--data-dir", str(data), "--allowed-media-domains", "127.0.0.1"),
    ]
    log_path = tmp_path / "server.log"
    with server_process(log_path, *args, ignore_sigint=True) as (url, process):
        body = {"model": "tiny", "media_url": data_uri(make_image()), "webhook_url": receiver.url}
        assert httpx.post(f"{url}/v2/media/categories", json=body, timeout=60).status_code == 202
        deadline = time.monotonic() + 60
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.received and not receiver.answered_at  # the attempt is in flight
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    assert receiver.answered_at
    with contextlib.closing(sqlite3.connect(data / "jobs.sqlite3")) as database:
        rows = database.execute("SELECT status, attempts FROM deliveries").fetchall()
    assert rows == [("delivered", 1)]
    log = log_path.read_text()
    assert "cut off" not in log and "Traceback" not in log, log


def test_a_sigterm_during_start_up_still_waits_for_webhook_attempts(
    tiny_model_dir: Path, tmp_path: Path, webhook_receiver
) -> None:
    """SIGTERM while the app starts (on a GPU: the memory profile, CUDA graphs' capture): the
    deliveries the store had waiting are either sent and recorded, or left for the next start;
    none is cut off to be sent twice (three were), and no "ready" line follows "draining"."""
    import subprocess
    import sys

    from server.jobs.store import open_job_store

    receiver = webhook_receiver([200] * 3, delay_s=2.0)
    data = tmp_path / "data"
    store = open_job_store(None, data)
    for _ in range(3):
        store.create("categories", {"webhook_url": receiver.url}, None)
        job = store.claim(lease_s=60)
        assert job is not None and store.complete(job, {})
    store.close()
    log_path = tmp_path / "server.log"
    args = ["--model", str(tiny_model_dir), "--data-dir", str(data), "--port", "0"]
    args += ["--allowed-media-domains", "127.0.0.1"]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        deadline = time.monotonic() + 120
        while "Waiting for application startup" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        assert_clean_exit(process, log_path)
    with contextlib.closing(sqlite3.connect(data / "jobs.sqlite3")) as database:
        rows = database.execute("SELECT status, attempts FROM deliveries").fetchall()
    sent = sorted(rows).count(("delivered", 1))
    assert sent == len(receiver.answered_at) == len(receiver.received), rows
    assert sorted(rows) == [("delivered", 1)] * sent + [("pending", 0)] * (3 - sent)
    log = log_path.read_text()
    assert "cut off" not in log and "ready:" not in log, log


def test_ctrl_c_drains_like_sigterm_and_workers_keep_decoding(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny"]
    log_path = tmp_path / "server.log"
    proxies = ["--forwarded-allow-ips", "10.0.0.0/8"]  # not this host: its headers are not believed
    with server_process(log_path, *args, *proxies, new_session=True) as (url, process):
        forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Request-ID": "not-a-proxy"}
        assert httpx.get(f"{url}/health", headers=forwarded).status_code == 200
        video = {"type": "video_url", "video_url": {"url": data_uri(make_video(), "video/mp4")}}
        question = {"type": "text", "text": "Describe it."}
        messages = [{"role": "user", "content": [video, question]}]
        body = {"model": "tiny", "max_tokens": 4, "messages": messages}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        # The terminal's Ctrl-C: SIGINT to the server and its decode workers at once.
        reasons = drain_while_streaming(url, lambda: os.killpg(process.pid, signal.SIGINT))
        assert reasons == ["length"]
        assert_clean_exit(process, log_path)
    (access,) = [line for line in log_path.read_text().splitlines() if "[not-a-proxy]" in line]
    assert access.endswith(" ms from 127.0.0.1"), access


def test_requests_past_the_shutdown_timeout_are_cut_off_cleanly(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Still running when --shutdown-timeout is up: a request not yet answered gets a 503
    shutting_down (a load balancer retries it elsewhere), a stream an error event (the SDK
    raises, rather than take what came as the whole answer) and its body's end; the log
    says so in one line each, no traceback."""
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny"]
    log_path = tmp_path / "server.log"
    long = {**BODY, "max_tokens": 3000, "stream": False}
    answers: dict[str, object] = {}

    def ask(name: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
                answers[name] = (r.status_code, r.read())
        except httpx.HTTPError as exc:
            answers[name] = exc

    with server_process(log_path, *args, "--shutdown-timeout", "1") as (url, process):
        threads = [
            threading.Thread(target=ask, args=("whole", long)),
            threading.Thread(target=ask, args=("stream", {**long, "stream": True})),
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while "2.0" not in _running(url) and time.monotonic() < deadline:
            time.sleep(0.05)  # (both are in the batch)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        assert_clean_exit(process, log_path)
    status, body = answers["whole"]  # type: ignore[misc]
    assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down", body
    status, body = answers["stream"]  # type: ignore[misc]
    assert status == 200 and b"data: " in body  # what was sent, then an error event
    *_, error, done = body.decode().strip().split("\n\n")
    assert json.loads(error.removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert done == "data: [DONE]"  # (as after any error mid-stream)
    log = log_path.read_text()
    assert log.count("still running when --shutdown-timeout was up") == 2, log
    assert "Exception in ASGI application" not in log
    # uvicorn's own line of it: what the flag asks for, a warning (not an ERROR alert)
    (cancel,) = [line for line in log.splitlines() if "graceful shutdown exceeded" in line]
    assert "WARNING" in cancel and "ERROR" not in cancel, cancel


def test_a_second_ctrl_c_stops_at_once_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The first Ctrl-C drains; a second stops now (uvicorn skips the app's shutdown): exit
    130, and the log says so in one warning, not the lifespan's cancelled traceback. Its lines
    tell what happened: the request was cut off by the second Ctrl-C (not by a timeout a
    second in), and the job running here went back to the queue at the first (not at its
    lease's end)."""
    from tests.e2e.test_job_durability import wait_until
    from tests.e2e.test_replicas import StalledVideo

    data = tmp_path / "data"
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--data-dir", str(data)]
    args += ["--allowed-media-domains", "127.0.0.1", "--media-fetch-timeout", "300"]
    log_path = tmp_path / "server.log"
    long = {**BODY, "max_tokens": 3000, "stream": False}
    stalled = StalledVideo(make_video())

    def ask() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/v1/chat/completions", json=long, timeout=120)

    def status(job_id: str) -> str:
        with contextlib.closing(sqlite3.connect(data / "jobs.sqlite3")) as database:
            return database.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    try:
        with server_process(log_path, *args, "--shutdown-timeout", "60") as (url, process):
            body = {"model": "tiny", "media_url": stalled.url, "async": True}
            job = httpx.post(f"{url}/v2/media/categories", json=body, timeout=60).json()
            wait_until(lambda: status(job["id"]) == "processing", 60, "the job to start")
            asker = threading.Thread(target=ask)
            asker.start()
            deadline = time.monotonic() + 60
            while "1.0" not in _running(url) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "1.0" in _running(url)  # (running: 3000 tokens take longer than the second)
            process.send_signal(signal.SIGINT)
            wait_until(lambda: status(job["id"]) == "queued", 20, "the job to be put back")
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 130
            asker.join(timeout=60)
    finally:
        stalled.release.set()
        stalled.server.shutdown()
    log = log_path.read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log
    (stopped,) = [line for line in log.splitlines() if "stopped at once" in line]
    assert "WARNING" in stopped, stopped
    assert stopped.endswith(
        "and the 1 job(s) this server was running went back to the queue at the first signal"
    ), stopped
    assert "--shutdown-timeout was up" not in log, log
    cut = [line for line in log.splitlines() if "request cut off" in line]
    assert all("a second Ctrl-C stopped the server" in line for line in cut), cut


def _running(url: str) -> str:
    """The metrics line of the sequences in the batch."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return next((line for line in text.splitlines() if line.startswith("vlm_running")), "")


def test_a_cut_off_stream_ends_with_an_error_in_its_apis_form() -> None:
    """Anthropic's error event; the Responses API's, numbered after the last event sent; the
    chat and completions streams' error chunk."""
    from server.api.middleware import cut_off_event

    def sent(path: str, last: bytes = b"", headers: list | None = None) -> tuple[str, dict]:
        scope = {"type": "http", "path": path, "headers": headers or []}
        event = cut_off_event(scope, last).decode()
        head, _, data = event.strip().rpartition("data: ")
        return head, json.loads(data)

    head, data = sent("/v1/messages")
    assert head == "event: error\n" and data["error"]["type"] == "overloaded_error"
    last = b'event: response.output_text.delta\ndata: {"type": "x", "sequence_number": 41}\n\n'
    head, data = sent("/v1/responses", last)
    assert head == "event: error\n" and data["sequence_number"] == 42
    assert data["type"] == "error" and data["code"] == "server_shutting_down"
    scope = {"type": "http", "path": "/v1/chat/completions", "headers": []}
    error, done = cut_off_event(scope, b"").decode().strip().split("\n\n")
    assert json.loads(error.removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert done == "data: [DONE]"
