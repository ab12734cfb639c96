"""Asynchronous categories jobs through the API: 202, status, idempotency, unknown ids."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest

from server.pipelines.categories import METADATA_KEYS
from tests.helpers import data_uri, make_image, make_video

pytestmark = pytest.mark.anyio


async def wait_done(client: httpx.AsyncClient, url: str, timeout: float = 60) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = (await client.get(url)).json()
        if status["status"] in ("completed", "failed"):
            return status
        assert asyncio.get_running_loop().time() < deadline, status
        await asyncio.sleep(0.05)


async def test_async_image_job(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "media_url": data_uri(make_image()), "async": True}
    response = await client.post("/v2/media/categories", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["status_url"] == f"/v2/media/status/{job['id']}"
    done = await wait_done(client, job["status_url"])
    assert done["status"] == "completed" and done["progress"] == 1
    assert tuple(done["result"]["result"]) == METADATA_KEYS


async def test_async_video_job_reports_progress(client: httpx.AsyncClient) -> None:
    video = make_video(seconds=10, cuts=(3.0, 6.0))
    body = {
        "model": "tiny",
        "media_url": "data:video/mp4;base64," + base64.b64encode(video).decode(),
        "metadata": ["tags"],
        "use_scenes": True,
        "async": True,
    }
    job = (await client.post("/v2/media/categories", json=body)).json()
    done = await wait_done(client, job["status_url"])
    assert done["status"] == "completed", done
    assert len(done["result"]["frames"]) == 3 and done["progress"] == 1


async def test_failed_job_keeps_the_error(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "media_url": "data:image/png;base64,AAAA", "async": True}
    job = (await client.post("/v2/media/categories", json=body)).json()
    done = await wait_done(client, job["status_url"])
    assert done["status"] == "failed"
    assert set(done["error"]) == {"message", "type", "param", "code"}
    assert done["error"]["code"] == "invalid_media"


async def test_idempotency_key(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "media_url": data_uri(make_image(seed=3)), "async": True}
    headers = {"Idempotency-Key": "order-17"}
    first = await client.post("/v2/media/categories", json=body, headers=headers)
    second = await client.post("/v2/media/categories", json=body, headers=headers)
    assert first.json()["id"] == second.json()["id"]


async def test_job_states_in_metrics(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "media_url": data_uri(make_image(seed=9)), "async": True}
    job = (await client.post("/v2/media/categories", json=body)).json()
    await wait_done(client, job["status_url"])
    text = (await client.get("/metrics")).text
    prefix = 'vlm_jobs{status="completed"}'
    completed = next(line for line in text.splitlines() if line.startswith(prefix))
    assert float(completed.split()[-1]) >= 1


async def test_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/media/status/job-nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"
