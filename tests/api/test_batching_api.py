"""The batching engine behind the HTTP API: concurrent requests, cancellation, backpressure."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.helpers import data_uri, make_image, make_settings, serve_in_thread

pytestmark = pytest.mark.anyio


def body(i: int, **extra: object) -> dict:
    """Mixed requests: images of different sizes, text-only, different prompt lengths."""
    content: list[dict] = [{"type": "text", "text": "Describe it. " * (1 + i % 4)}]
    if i % 3 != 1:
        size = (64 + 40 * i, 48 + 24 * (i % 5))
        content.append(
            {"type": "image_url", "image_url": {"url": data_uri(make_image(*size, seed=i))}}
        )
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8 + 3 * i,
        "temperature": 0,
        **extra,
    }


async def content(client: httpx.AsyncClient, payload: dict) -> str:
    response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


async def wait_for(client: httpx.AsyncClient, key: str, value: int, timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await client.get("/health")).json()[key] != value:
        assert asyncio.get_running_loop().time() < deadline, f"{key} never reached {value}"
        await asyncio.sleep(0.01)


async def test_concurrent_requests_match_sequential(client: httpx.AsyncClient) -> None:
    payloads = [body(i) for i in range(8)]
    sequential = [await content(client, p) for p in payloads]
    concurrent = await asyncio.gather(*(content(client, p) for p in payloads))
    assert list(concurrent) == sequential


async def test_penalties_are_accepted(client: httpx.AsyncClient) -> None:
    extra = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2}
    assert isinstance(await content(client, body(0, **extra)), str)
    response = await client.post("/v1/chat/completions", json=body(0, min_tokens=50, max_tokens=5))
    assert response.status_code == 400 and response.json()["error"]["param"] == "min_tokens"
    text = {"model": "tiny", "prompt": "Hi", "min_tokens": 50, "max_tokens": 5}
    response = await client.post("/v1/completions", json=text)
    assert response.status_code == 400 and response.json()["error"]["param"] == "min_tokens"


async def test_ignore_eos_generates_exactly_max_tokens(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions", json=body(2, max_tokens=40, ignore_eos=True)
    )
    assert response.json()["usage"]["completion_tokens"] == 40
    assert response.json()["choices"][0]["finish_reason"] == "length"


async def test_cancelled_request_frees_its_slot(client: httpx.AsyncClient) -> None:
    task = asyncio.create_task(
        client.post("/v1/chat/completions", json=body(1, max_tokens=2000, ignore_eos=True))
    )
    await wait_for(client, "num_running", 1)
    task.cancel()
    await wait_for(client, "num_running", 0)
    assert isinstance(await content(client, body(1)), str)


async def test_disconnected_clients_free_their_slots(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """...and the access line of a stream the client cut short says so (its 200 alone read as
    an answer sent whole)."""
    long = body(1, max_tokens=3000, ignore_eos=True)
    caplog.set_level("INFO", logger="server.access")
    with serve_in_thread(make_settings(tiny_model_dir)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            # Non-streaming: the client gives up waiting.
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/chat/completions", json=long, timeout=0.5)
            await wait_for(client, "num_running", 0)
            # Streaming: the client reads a little and hangs up.
            async with client.stream("POST", "/v1/chat/completions", json={**long, "stream": True}):
                await wait_for(client, "num_running", 1)
            await wait_for(client, "num_running", 0)
    lines = [r.getMessage() for r in caplog.records if "/v1/chat/completions 200" in r.getMessage()]
    assert any("cut short" in line for line in lines), lines


async def test_full_queue_answers_503_with_retry_after(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    settings = make_settings(tiny_model_dir, max_num_seqs=1, max_queued_requests=1)
    long = body(1, max_tokens=3000, ignore_eos=True, stream=True)
    with serve_in_thread(settings) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with client.stream("POST", "/v1/chat/completions", json=long) as running:
                assert running.status_code == 200
                queued = asyncio.create_task(client.post("/v1/chat/completions", json=body(0)))
                await wait_for(client, "num_queued", 1)
                refused = await client.post("/v1/chat/completions", json=body(0))
                assert refused.status_code == 503
                assert int(refused.headers["retry-after"]) >= 1
                assert refused.json()["error"]["code"] == "server_overloaded"
                # a request that can never run is a 400 even now, not a 503 to retry
                invalid = await client.post("/v1/chat/completions", json=body(0, priority=1))
                assert invalid.status_code == 400, invalid.text
                assert invalid.json()["error"]["param"] == "priority"
            # Closing the stream aborted the long request; the queued one gets the slot.
            assert (await queued).status_code == 200
    # in the log once: its access line, a warning with the code
    (line,) = [r for r in caplog.records if "server_overloaded" in r.getMessage()]
    assert line.name == "server.access" and line.levelname == "WARNING"


async def test_queue_timeout_answers_503(tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir, max_num_seqs=1, queue_timeout=0.1)
    long = body(1, max_tokens=3000, ignore_eos=True, stream=True)
    with serve_in_thread(settings) as url:
        async with (
            httpx.AsyncClient(base_url=url, timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=long) as running,
        ):
            assert running.status_code == 200
            for stream in (False, True):
                late = await client.post("/v1/chat/completions", json=body(0, stream=stream))
                assert late.status_code == 503, late.text
                assert late.json()["error"]["code"] == "queue_timeout"
                text = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "stream": stream}
                late = await client.post("/v1/completions", json=text)
                assert late.status_code == 503, late.text
                assert late.json()["error"]["code"] == "queue_timeout"
