"""A bounded load test on loopback: 200 concurrent requests against a small queue. Every answer
is a 200 or a 503 with Retry-After, memory stays bounded, and the server is healthy after."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import data_uri, make_image, server_process

pytestmark = pytest.mark.slow

NUM_REQUESTS = 200


def test_burst_gets_200_or_503(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = [
        "--model",
        str(tiny_model_dir),
        "--served-model-name",
        "tiny",
        "--max-num-seqs",
        "4",
        "--max-queued-requests",
        "8",
        "--log-level",
        "warning",
    ]
    image = data_uri(make_image(112, 112))
    with server_process(tmp_path / "server.log", *args) as (url, process):
        rss_before = psutil.Process(process.pid).memory_info().rss

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=NUM_REQUESTS)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

                async def one(i: int) -> httpx.Response:
                    content = [
                        {"type": "image_url", "image_url": {"url": image}},
                        {"type": "text", "text": f"Request {i}"},
                    ]
                    body = {
                        "model": "tiny",
                        "max_tokens": 8,
                        "messages": [{"role": "user", "content": content}],
                    }
                    return await client.post("/v1/chat/completions", json=body)

                return await asyncio.gather(*(one(i) for i in range(NUM_REQUESTS)))

        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        assert statuses.count(200) >= 12  # the slots and the queue were used
        assert statuses.count(503) > 0  # and the queue's bound refused what did not fit
        for refused in (r for r in responses if r.status_code == 503):
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "server_overloaded"
        rss_after = psutil.Process(process.pid).memory_info().rss
        assert rss_after - rss_before < 500 * 2**20
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["num_queued"] == 0
