"""A server killed with SIGKILL mid-job: after a restart on the same data dir the job is
re-queued and completes."""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import make_video, server_process

pytestmark = pytest.mark.slow


def test_job_survives_sigkill(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = [
        "--model",
        str(tiny_model_dir),
        "--served-model-name",
        "tiny",
        "--data-dir",
        str(tmp_path / "data"),
    ]
    video = make_video(seconds=20, fps=12, cuts=(4.0, 8.0, 12.0, 16.0))
    body = {
        "model": "tiny",
        "media_url": "data:video/mp4;base64," + base64.b64encode(video).decode(),
        "use_scenes": True,
        "async": True,
    }
    with server_process(tmp_path / "first.log", *args) as (url, process):
        job = httpx.post(f"{url}/v2/media/categories", json=body, timeout=60).json()
        process.send_signal(signal.SIGKILL)  # no shutdown: whatever was running just stops
        process.wait(timeout=30)
    with server_process(tmp_path / "second.log", *args) as (url, _):
        deadline = time.monotonic() + 120
        while True:
            status = httpx.get(f"{url}{job['status_url']}", timeout=10).json()
            if status["status"] in ("completed", "failed"):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
    assert status["status"] == "completed", status
    assert status["result"]["frames"]  # the restarted server ran the whole job
