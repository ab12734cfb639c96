"""The job store's database goes away under a running server (real PostgreSQL behind a proxy
that is cut): async submit and status answer 503 with Retry-After in the OpenAI envelope,
synchronous chat and /health keep working, and once the database is back submissions are
accepted and jobs run again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.helpers import data_uri, make_image, make_settings, start_client
from tests.jobs.pg import TcpProxy, fresh_database

pytestmark = pytest.mark.anyio


async def wait_for_status(client: httpx.AsyncClient, url: str, want: str) -> dict:
    for _ in range(600):
        response = await client.get(url)
        if response.status_code == 200 and response.json()["status"] == want:
            return response.json()
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became {want}")


async def test_database_outage(tiny_model_dir: Path) -> None:
    image = {"type": "image_url", "image_url": {"url": data_uri(make_image())}}
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]}],
        "max_tokens": 4,
    }
    job_body = {"model": "tiny", "media_url": data_uri(make_image()), "async": True}
    proxy = TcpProxy()
    try:
        with fresh_database() as url:
            settings = make_settings(tiny_model_dir, job_store=proxy.url(url))
            async for client in start_client(settings):
                proxy.cut()
                refused = await client.post("/v2/media/categories", json=job_body)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
                error = refused.json()["error"]
                assert error["code"] == "job_store_unavailable" and error["type"] == "server_error"
                assert set(error) == {"message", "type", "param", "code"}
                status = await client.get("/v2/media/status/job-x")
                assert status.status_code == 503 and "retry-after" in status.headers
                answer = await client.post("/v1/chat/completions", json=chat)
                assert answer.status_code == 200, answer.text  # needs no store
                health = await client.get("/health")  # (a 200: chat is served) that says so
                assert health.status_code == 200 and health.json()["job_store"] == "unreachable"
                metrics = (await client.get("/metrics")).text
                assert "vlm_job_store_up 0.0" in metrics

                proxy.restore()
                accepted = None
                for _ in range(100):  # the pool reconnects within a few seconds
                    response = await client.post("/v2/media/categories", json=job_body)
                    if response.status_code == 202:
                        accepted = response.json()
                        break
                    await asyncio.sleep(0.2)
                assert accepted is not None, "submissions did not resume"
                done = await wait_for_status(client, accepted["status_url"], "completed")
                assert done["progress"] == 1
                assert (await client.get("/health")).json()["job_store"] == "ok"
                assert "vlm_job_store_up 1.0" in (await client.get("/metrics")).text
    finally:
        proxy.close()
