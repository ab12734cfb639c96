"""vLLM's priority scheduling through the API: `priority` on chat and text completions (lower
first) under --scheduling-policy priority, a request that outranks the running one preempting
it (whose answer is then the same as without the preemption), async jobs at --job-priority,
and a non-zero priority refused under fcfs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from server.api.routes.chat import completions_job_handler
from server.api.routes.media import categories_job_handler
from server.engine.engine import AsyncEngine
from server.engine.sequence import Sequence
from server.jobs.store import Job
from tests.api.test_errors import assert_error
from tests.helpers import data_uri, make_image, make_settings, start_client

pytestmark = pytest.mark.anyio


def chat(max_tokens: int, **extra: object) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


async def test_a_higher_priority_request_overtakes_a_running_one(tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir, scheduling_policy="priority", max_num_seqs=1)
    async for client in start_client(settings):
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        alone = await client.post("/v1/chat/completions", json=chat(300))
        assert alone.status_code == 200, alone.text
        low = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(300, priority=5)))
        while engine.num_running == 0:  # the low one is decoding
            await asyncio.sleep(0.005)
        body = {**chat(4, priority=-1), "messages": [{"role": "user", "content": "Hi"}]}
        high = await client.post("/v1/chat/completions", json=body)
        assert high.status_code == 200, high.text
        assert not low.done()  # it waits, preempted, while the high one runs
        assert engine.scheduler.num_preemptions >= 1
        answer = (await low).json()["choices"][0]["message"]["content"]
        # recomputed after the preemption: the same greedy answer as without it
        assert answer == alone.json()["choices"][0]["message"]["content"]
        text = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "priority": 3}
        assert (await client.post("/v1/completions", json=text)).status_code == 200


async def test_priority_under_fcfs_is_a_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat(2, priority=1))
    assert_error(response, 400, "priority")
    text = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "priority": -1}
    assert_error(await client.post("/v1/completions", json=text), 400, "priority")
    media = {**chat(2, priority=2), "model": "tiny"}
    assert_error(await client.post("/v2/media/completions", json=media), 400, "priority")
    responses = {"model": "tiny", "input": "Hi", "max_output_tokens": 2, "priority": 4}
    assert_error(await client.post("/v1/responses", json=responses), 400, "priority")
    assert (await client.post("/v1/chat/completions", json=chat(2, priority=0))).status_code == 200
    response = await client.post("/v1/chat/completions", json=chat(2, priority=2**40))
    assert_error(response, 400, "priority")


def job(kind: str, request: dict) -> Job:
    return Job("job-1", kind, request, "processing", 0.0, None, None, 0.0, 0.0, 1)


@pytest.mark.parametrize(
    ("job_priority", "body_priority", "expected"),
    [(7, None, 7), (7, 2, 2), (None, None, 0)],  # None: the fcfs policy
)
async def test_jobs_run_at_their_own_priority_or_the_job_priority(
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    job_priority: int | None,
    body_priority: int | None,
    expected: int,
) -> None:
    """The job handlers run the real pipelines; every sequence they add to the engine carries
    the priority."""
    seen: list[int] = []
    new_sequence = AsyncEngine._new_sequence

    def spied(engine: AsyncEngine, request_id: str, inputs, sampling) -> Sequence:
        seen.append(sampling.priority)
        return new_sequence(engine, request_id, inputs, sampling)

    monkeypatch.setattr(AsyncEngine, "_new_sequence", spied)
    policy = "fcfs" if job_priority is None else "priority"
    async for client in start_client(make_settings(tiny_model_dir, scheduling_policy=policy)):
        services = client.app.state.services  # type: ignore[attr-defined]
        handle = completions_job_handler(services.chat, job_priority)
        answer = await handle(job("completions", chat(2, priority=body_priority)), lambda _: None)
        assert answer["object"] == "chat.completion" and seen == [expected]
        seen.clear()
        handle = categories_job_handler(services.categories, job_priority)
        body = {"media_url": data_uri(make_image(64, 64)), "model": "tiny"}
        answer = await handle(job("categories", body), lambda _: None)
        assert answer["object"] == "media.categories", answer
        assert seen and set(seen) == {job_priority or 0}


async def test_choices_waiting_for_their_prefill_hold_no_preprocessing_slot(
    tiny_model_dir: Path,
) -> None:
    """A request with n choices queues its first, then waits for its prompt's prefill to
    queue the others (a long wait when the batch is full). It held a preprocessing slot
    meanwhile: eight such requests kept every other client's request from being queued at
    all, whatever the scheduling policy (here one slot and one such request)."""
    settings = make_settings(tiny_model_dir, max_num_seqs=1, max_concurrent_preprocessing=1)
    async for client in start_client(settings):
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        busy = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(3000)))
        while engine.num_running == 0:  # the batch (of one) is full
            await asyncio.sleep(0.005)
        choices = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(4, n=2)))
        while engine.num_queued == 0:  # its first choice waits for the busy one
            await asyncio.sleep(0.005)
        other = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(4)))
        async with asyncio.timeout(10):  # queued too, not held behind the choices' slot
            while engine.num_queued < 2:
                await asyncio.sleep(0.005)
        assert not busy.done()
        for request in (busy, choices, other):
            request.cancel()
        await asyncio.gather(busy, choices, other, return_exceptions=True)
