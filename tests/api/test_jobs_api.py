"""Asynchronous jobs through the API (categories and media completions): 202, status, progress,
idempotency, refusals at submit time, unknown ids."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import pytest

from server.api.routes.chat import completions_job_handler
from server.pipelines.categories import METADATA_KEYS
from tests.helpers import data_uri, make_image, make_settings, make_video, start_client

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
    # unix seconds, whole, as every other object's times
    assert all(type(done[key]) is int for key in ("created_at", "updated_at")), done
    assert done["created_at"] <= done["updated_at"]


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
    # (a video is read when the job runs; an inline image at once, below)
    body = {"model": "tiny", "media_url": "data:video/mp4;base64,AAAA", "async": True}
    job = (await client.post("/v2/media/categories", json=body)).json()
    done = await wait_done(client, job["status_url"])
    assert done["status"] == "failed"
    assert set(done["error"]) == {"message", "type", "param", "code"}
    assert done["error"]["code"] == "invalid_media"


async def test_an_unreadable_inline_image_is_refused_before_the_job(
    client: httpx.AsyncClient,
) -> None:
    """As media completions refuse theirs: no job is stored for an image that cannot be read,
    nor for one sent as a data: URI that names no type (its bytes say it is an image: a
    truncated PNG, an AVIF), in categories and in a media completion's image_url alike."""
    before = (await client.get("/v2/media/jobs")).json()["data"]
    png = make_image(seed=4, fmt="PNG")
    avif = b"\x00\x00\x00\x1cftypavif" + bytes(64)
    for url in (
        "data:image/png;base64,AAAA",
        "data:;base64," + base64.b64encode(png[:60]).decode(),
        "data:application/octet-stream;base64," + base64.b64encode(avif).decode(),
    ):
        body = {"model": "tiny", "media_url": url, "async": True}
        response = await client.post("/v2/media/categories", json=body)
        assert response.status_code == 400, (url[:40], response.text)
        assert response.json()["error"]["param"] == "media_url"
        part = {"type": "image_url", "image_url": {"url": url}}
        response = await client.post(
            "/v2/media/completions", json=chat_body([part], **{"async": True})
        )
        assert response.status_code == 400, (url[:40], response.text)
        assert response.json()["error"]["param"].startswith("messages[0].content[0]")
    assert (await client.get("/v2/media/jobs")).json()["data"] == before
    # a whole image, or a video, so sent is taken (the video is read when the job runs)
    for media in (png, make_video(seconds=1)):
        url = "data:;base64," + base64.b64encode(media).decode()
        body = {"model": "tiny", "media_url": url, "async": True}
        accepted = await client.post("/v2/media/categories", json=body)
        assert accepted.status_code == 202, accepted.text
        assert (await wait_done(client, accepted.json()["status_url"]))["status"] == "completed"


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


def chat_body(media: list[dict], **extra: object) -> dict:
    content = [*media, {"type": "text", "text": "Describe it."}]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def image_part(seed: int = 0) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(make_image(seed=seed))}}


def video_part(video: bytes) -> dict:
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    return {"type": "video_url", "video_url": {"url": url}}


async def test_async_media_completion_answers_as_the_synchronous_one(
    client: httpx.AsyncClient,
) -> None:
    body = chat_body([image_part(seed=5)], temperature=0, max_tokens=12)
    sync = (await client.post("/v2/media/completions", json=body)).json()
    response = await client.post("/v2/media/completions", json={**body, "async": True})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "completions" and job["status"] == "queued"
    assert response.headers["location"] == job["status_url"]
    done = await wait_done(client, job["status_url"])
    assert done["status"] == "completed" and done["progress"] == 1, done
    result = done["result"]
    assert result["object"] == "chat.completion" and result["id"].startswith("chatcmpl-")
    assert result["choices"][0]["message"] == sync["choices"][0]["message"]
    # The same prompt again: its prefix comes from the prefix cache, the rest is the same.
    cached = result["usage"]["prompt_tokens_details"].pop("cached_tokens")
    assert cached > sync["usage"]["prompt_tokens_details"].pop("cached_tokens")
    assert result["usage"] == sync["usage"]


async def test_async_media_completion_of_a_video_keeps_its_frames(
    client: httpx.AsyncClient,
) -> None:
    body = chat_body([video_part(make_video(seconds=6))], max_tokens=6, **{"async": True})
    job = (await client.post("/v2/media/completions", json=body)).json()
    done = await wait_done(client, job["status_url"])
    assert done["status"] == "completed", done
    assert done["result"]["frames"] and done["result"]["usage"]["prompt_tokens_details"]


async def test_completions_job_progress_is_frames_captioned_over_planned(
    tiny_model_dir: Path,
) -> None:
    """The worker's handler, run directly on two videos: started, each video fetched and
    decoded, then every captioned frame of either moves progress forward; it stays below 1
    until the answer over the captions is done."""
    from server.pipelines.finish import FRAMES_DONE, MEDIA_READY, STARTED

    two_videos = [video_part(make_video(seconds=4)), video_part(make_video(seconds=8))]
    body = chat_body(two_videos, max_tokens=4, **{"async": True})
    seen: list[float] = []
    async for client in start_client(make_settings(tiny_model_dir, max_videos_per_request=2)):
        services = client.app.state.services  # type: ignore[attr-defined]
        job = services.jobs.create("completions", body, None)
        handle = completions_job_handler(services.chat)
        result = await handle(job, seen.append)
    assert len(seen) == 3 + len(result["frames"]) and len(result["frames"]) >= 4
    assert seen[:3] == [STARTED, MEDIA_READY / 2, MEDIA_READY]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert seen[-1] == pytest.approx(FRAMES_DONE)


@pytest.mark.parametrize(
    ("extra", "status", "code"),
    [
        ({"stream": True}, 400, "invalid_value"),
        ({"model": "nope"}, 404, "model_not_found"),
        ({"tools": [{"type": "function"}]}, 400, None),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
            400,
            None,
        ),
        ({"webhook_url": "ftp://example.com/hook"}, 400, None),
        ({"stop_token_ids": [10**9]}, 400, "invalid_value"),
        ({"max_tokens": 10**6}, 400, "context_length_exceeded"),
    ],
)
async def test_async_media_completion_refused_at_submit(
    client: httpx.AsyncClient, extra: dict, status: int, code: str | None
) -> None:
    body = {**chat_body([image_part()]), "async": True, **extra}
    jobs_before = num_jobs(client)
    response = await client.post("/v2/media/completions", json=body)
    assert response.status_code == status, response.text
    assert num_jobs(client) == jobs_before
    error = response.json()["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://example.com/clip.mp4", "Unsupported media URL scheme 'ftp'"),
        ("<string>", "'<string>' is not a URL"),  # (the reference's placeholder, sent as is)
        ("http://10.1.2.3/clip.mp4", "10.1.2.3"),  # (off this test server's allow-list)
        ("http://[::1]:8080/a.png", "::1"),
        ("file:///etc/passwd", "file:// URLs"),
    ],
)
async def test_a_media_url_no_fetch_could_read_is_refused_before_the_job(
    client: httpx.AsyncClient, url: str, says: str
) -> None:
    """As the synchronous request refuses it (and as a webhook_url is checked): no job is
    stored to fail on a URL that can be refused as written; DNS is left to the job."""
    jobs_before = num_jobs(client)
    for path, body in [
        ("/v2/media/categories", {"media_url": url, "async": True}),
        ("/v2/media/completions", chat_body([{"type": "image_url", "image_url": {"url": url}}])),
    ]:
        response = await client.post(path, json={**body, "async": True})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "media_url_not_allowed" and says in error["message"], error
        synchronous = await client.post(path, json={**body, "async": False})
        assert synchronous.json()["error"] == error  # (the same words, said at once)
    video = chat_body([{"type": "video_url", "video_url": {"url": url}}], **{"async": True})
    response = await client.post("/v2/media/completions", json=video)
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages")
    assert num_jobs(client) == jobs_before


def num_jobs(client: httpx.AsyncClient) -> int:
    return sum(client.app.state.services.jobs.count_by_status().values())  # type: ignore[attr-defined]


async def test_text_over_the_context_refused_before_the_job(client: httpx.AsyncClient) -> None:
    body = chat_body([image_part()], **{"async": True})
    body["messages"][0]["content"][-1]["text"] = "word " * 40_000
    response = await client.post("/v2/media/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded"


async def test_too_many_images_refused_before_the_job(client: httpx.AsyncClient) -> None:
    body = {**chat_body([image_part(seed=i) for i in range(70)]), "async": True}
    response = await client.post("/v2/media/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_many_images"
    message = response.json()["error"]["message"]
    assert (
        message == "70 images in one request; this server's limit is 64 (--max-images-per-request)."
    )


async def test_an_empty_idempotency_key_is_no_key(client: httpx.AsyncClient) -> None:
    """A script's unset variable sends the header empty: each request is its own job."""
    ids = set()
    for seed in (5, 6):
        body = {"model": "tiny", "media_url": data_uri(make_image(seed=seed)), "async": True}
        response = await client.post(
            "/v2/media/categories", json=body, headers={"Idempotency-Key": " "}
        )
        assert response.status_code == 202, response.text
        ids.add(response.json()["id"])
    assert len(ids) == 2


async def test_media_completion_idempotency_key(client: httpx.AsyncClient) -> None:
    body = {**chat_body([image_part(seed=8)]), "max_tokens": 4, "async": True}
    headers = {"Idempotency-Key": "completion-42"}
    first = await client.post("/v2/media/completions", json=body, headers=headers)
    second = await client.post("/v2/media/completions", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]


async def test_idempotency_key_reused_for_another_request_is_409(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "reused-7"}
    categories = {"model": "tiny", "media_url": data_uri(make_image(seed=4)), "async": True}
    first = await client.post("/v2/media/categories", json=categories, headers=headers)
    assert first.status_code == 202
    for path, body in (
        ("/v2/media/categories", {**categories, "metadata": ["tags"]}),
        ("/v2/media/completions", {**chat_body([image_part(seed=4)]), "async": True}),
    ):
        response = await client.post(path, json=body, headers=headers)
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "idempotency_key_reused"


async def test_progress_moves_through_every_stage(client: httpx.AsyncClient) -> None:
    """Started, media fetched and decoded (scenes found), then frame by frame: a long video's
    job no longer sits at 0 until its first frame is done."""
    from server.media.frames import FrameRequest
    from server.pipelines.categories import CategoriesRequest
    from server.pipelines.finish import FRAMES_DONE, MEDIA_READY, STARTED

    video = make_video(seconds=3, cuts=(1.5,))
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    values: list[float] = []
    pipeline = client.app.state.services.categories  # type: ignore[attr-defined]
    scenes = FrameRequest("frames", use_scenes=True)
    await pipeline.run(CategoriesRequest("progress-1", url, ("tags",), scenes), values.append)
    assert values[:2] == [STARTED, MEDIA_READY]
    assert values == sorted(values) and MEDIA_READY < values[-1] <= FRAMES_DONE
    assert len(values) == 2 + 2  # two scenes: one frame each
    # an image's job is started too (it sat at 0 until done)
    values.clear()
    image = data_uri(make_image())
    await pipeline.run(CategoriesRequest("progress-2", image, ("tags",)), values.append)
    assert values == [STARTED]
    handle = completions_job_handler(client.app.state.services.chat)  # type: ignore[attr-defined]
    job = client.app.state.services.jobs.create(  # type: ignore[attr-defined]
        "completions", chat_body([image_part()], max_tokens=2, **{"async": True}), None
    )
    values.clear()
    await handle(job, values.append)
    assert values == [STARTED]


async def test_a_busy_engine_does_not_hold_every_job_back(tiny_model_dir: Path) -> None:
    """Interactive requests that keep the engine full (one place here, taken by a long
    answer) do not keep jobs from starting: with none running, one is claimed at once (its
    request waits its turn in the queue) and completes; jobs do not starve."""
    settings = make_settings(tiny_model_dir, max_num_seqs=1)
    async for client in start_client(settings):
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        long = {"model": "tiny", "messages": [{"role": "user", "content": "Go on."}]}
        busy = asyncio.create_task(
            client.post("/v1/chat/completions", json=long | {"max_tokens": 400, "ignore_eos": True})
        )
        async with asyncio.timeout(30):
            while not engine.num_running:
                await asyncio.sleep(0.01)
        job = {"model": "tiny", "messages": long["messages"], "max_tokens": 2, "async": True}
        created = (await client.post("/v2/media/completions", json=job)).json()
        url = f"/v2/media/status/{created['id']}"
        async with asyncio.timeout(30):
            while (await client.get(url)).json()["status"] == "queued":
                await asyncio.sleep(0.05)
        assert not busy.done()  # claimed while the engine was full
        assert (await wait_done(client, url))["status"] == "completed"
        assert (await busy).status_code == 200
