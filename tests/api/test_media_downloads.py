"""Media by URL are downloaded before a request takes a preprocessing slot: a host that stalls
holds a download slot (--max-concurrent-downloads), not one of the few slots that decode, and
what a failed or abandoned request downloaded does not stay in the spool."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from httpx import AsyncClient

from server.config import Settings
from tests.api.test_errors import assert_error
from tests.helpers import MediaServer, data_uri, make_image, make_settings, start_client

pytestmark = pytest.mark.anyio


def ask(*urls: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    content.append({"type": "text", "text": "What is this?"})
    return {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}


def spooled(settings: Settings) -> list[Path]:
    files = (settings.data_dir / "spool").rglob("*")
    return [p for p in files if p.is_file() and p.name != ".lock"]


async def requested(media_server: MediaServer, path: str) -> None:
    async with asyncio.timeout(20):
        while path not in media_server.requested:
            await asyncio.sleep(0.01)


async def test_a_stalling_media_host_holds_no_preprocessing_slot(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer
) -> None:
    """One preprocessing slot, one request whose image's host stalls: a request with an inline
    image is answered meanwhile (it waited for the slot until the stalled download ended), and
    the stalled one is answered once its host answers; its download leaves the spool."""
    settings = make_settings(
        tiny_model_dir,
        data_dir=tmp_path / "data",
        max_concurrent_preprocessing=1,
        media_fetch_timeout=60,
    )
    url = media_server.stall("/stall/slot.jpg", make_image(64, 48))
    async for client in start_client(settings):
        stalled = asyncio.ensure_future(client.post("/v1/chat/completions", json=ask(url)))
        await requested(media_server, "/stall/slot.jpg")
        inline = client.post("/v1/chat/completions", json=ask(data_uri(make_image(32, 32))))
        response = await asyncio.wait_for(inline, 30)
        assert response.status_code == 200, response.text
        assert not stalled.done()
        media_server.stalls["/stall/slot.jpg"].set()
        response = await asyncio.wait_for(stalled, 30)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] > 0
        assert not spooled(settings)


async def test_downloads_are_bounded_and_discarded_on_error_or_hang_up(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer
) -> None:
    """--max-concurrent-downloads 1: a second request's download starts only once the first's
    ends. A request whose second image fails discards its first's download; so does a request
    whose client hangs up while a download stalls."""
    settings = make_settings(
        tiny_model_dir,
        data_dir=tmp_path / "data",
        max_concurrent_downloads=1,
        media_fetch_timeout=60,
    )
    image = make_image(64, 48)
    first = media_server.stall("/stall/first.jpg", image)
    second = media_server.add("/second.jpg", image)
    async for client in start_client(settings):
        waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=ask(first)))
        await requested(media_server, "/stall/first.jpg")
        behind = asyncio.ensure_future(client.post("/v1/chat/completions", json=ask(second)))
        await asyncio.sleep(1.0)
        assert "/second.jpg" not in media_server.requested  # (no download slot yet)
        media_server.stalls["/stall/first.jpg"].set()
        for request in (waiting, behind):
            response = await asyncio.wait_for(request, 30)
            assert response.status_code == 200, response.text

        missing = media_server.url("/missing.jpg")
        response = await client.post("/v1/chat/completions", json=ask(second, missing))
        assert_error(response, 400, "messages[0].content[1]", "media_fetch_failed")
        assert not spooled(settings)

        hang = media_server.stall("/stall/hang.jpg", image)
        abandoned = asyncio.ensure_future(
            client.post("/v1/chat/completions", json=ask(second, hang))
        )
        await requested(media_server, "/stall/hang.jpg")
        abandoned.cancel()  # (the client hangs up: the request's task is cancelled)
        await asyncio.gather(abandoned, return_exceptions=True)
        for _ in range(200):
            if not spooled(settings):
                break
            await asyncio.sleep(0.05)
        media_server.stalls["/stall/hang.jpg"].set()
        assert not spooled(settings), [(p.name, p.stat().st_size) for p in spooled(settings)]


async def test_a_request_over_its_bytes_names_the_part_in_order(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer
) -> None:
    """Images charged against the request's bytes in the request's order: the error names the
    image that takes the total over (the second here), not the one read last (the big first
    one, whose bytes take longest to decode)."""
    small, big = make_image(32, 32), make_image(640, 480)
    settings = make_settings(
        tiny_model_dir, data_dir=tmp_path / "data", max_media_bytes_per_request=len(big)
    )
    async for client in start_client(settings):
        body = ask(data_uri(big), data_uri(small), data_uri(small))
        for _ in range(3):
            response = await client.post("/v1/chat/completions", json=body)
            assert_error(response, 400, "messages[0].content[1]", "media_budget_exceeded")


async def test_downloads_waiting_for_a_slot_keep_their_download_slot(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer
) -> None:
    """A request whose downloads are done waits for a preprocessing slot still holding its
    download slot: the requests whose downloads wait on disk stay as many as the download
    slots (given back at once, a burst of them spooled without bound)."""
    settings = make_settings(
        tiny_model_dir,
        data_dir=tmp_path / "data",
        max_concurrent_preprocessing=1,
        max_concurrent_downloads=1,
    )
    image = make_image(64, 48)
    first, second = (media_server.add(f"/handover/{n}.jpg", image) for n in (1, 2))
    async for client in start_client(settings):
        slots = client.app.state.services.chat.media.preprocessing  # type: ignore[attr-defined]
        await slots.take()  # (every preprocessing slot busy)
        waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=ask(first)))
        await requested(media_server, "/handover/1.jpg")
        behind = asyncio.ensure_future(client.post("/v1/chat/completions", json=ask(second)))
        # Both waits are shown, as the engine's queue is (an operator saw an idle engine)
        one_each = {"held": 1, "waiting": 1}
        expected = {"downloads": one_each, "preprocessing": one_each}
        await until_slots(client, expected)
        await asyncio.sleep(0.5)
        assert "/handover/2.jpg" not in media_server.requested
        assert len(spooled(settings)) == 1
        slots.give_back()
        for request in (waiting, behind):
            response = await asyncio.wait_for(request, 30)
            assert response.status_code == 200, response.text
        assert not spooled(settings)
        none = {"held": 0, "waiting": 0}
        assert await media_slots(client) == {"downloads": none, "preprocessing": none}


async def until_slots(client: AsyncClient, expected: dict[str, dict[str, int]]) -> None:
    """Until /health's media_slots are the expected ones (then checked against /metrics)."""
    async with asyncio.timeout(20):
        while (await client.get("/health")).json()["media_slots"] != expected:
            await asyncio.sleep(0.05)
    assert await media_slots(client) == expected


async def media_slots(client: AsyncClient) -> dict[str, dict[str, int]]:
    """/health's media_slots, checked against /metrics' vlm_media_slots (at rest: read one
    after the other)."""
    slots = (await client.get("/health")).json()["media_slots"]
    metrics = (await client.get("/metrics")).text
    for name, counts in slots.items():
        for state, count in counts.items():
            assert f'vlm_media_slots{{slot="{name}",state="{state}"}} {count}.0' in metrics
    return slots


async def test_a_failed_download_is_not_held_behind_a_slow_one(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer
) -> None:
    """Of a request's downloads, the first to fail is the answer at once (a 404 waited for a
    slow host before it in the request), and the slow one is stopped and discarded."""
    settings = make_settings(tiny_model_dir, data_dir=tmp_path / "data", media_fetch_timeout=60)
    slow = media_server.stall("/stall/before-404.jpg", make_image(64, 48))
    async for client in start_client(settings):
        body = ask(slow, media_server.url("/missing-after-slow.jpg"))
        response = await asyncio.wait_for(client.post("/v1/chat/completions", json=body), 20)
        assert_error(response, 400, "messages[0].content[1]", "media_fetch_failed")
        assert not spooled(settings)
        media_server.stalls["/stall/before-404.jpg"].set()


def held(caption: Callable, started: asyncio.Event, release: asyncio.Event) -> Callable:
    """caption, once release is set (started: it was called)."""

    async def captioned(*args: object, **kwargs: object) -> object:
        started.set()
        await release.wait()
        return await caption(*args, **kwargs)

    return captioned


async def test_captioning_a_video_holds_no_preprocessing_slot(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Captions mode's captions are the engine's work, done after the request's slot is
    given back (two /v2 requests captioning long videos held both slots: an inline image
    waited 7 s)."""
    from tests.helpers import make_video

    settings = make_settings(
        tiny_model_dir, data_dir=tmp_path / "data", max_concurrent_preprocessing=1
    )
    async for client in start_client(settings):
        chat = client.app.state.services.chat  # type: ignore[attr-defined]
        captioning, release = asyncio.Event(), asyncio.Event()
        chat.captioner.caption = held(chat.captioner.caption, captioning, release)
        video = data_uri(make_video(seconds=2), "video/mp4")
        content = [{"type": "image_url", "image_url": {"url": video}}]
        body = {
            "model": "tiny",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": content}],
        }
        captioned = asyncio.ensure_future(client.post("/v2/media/completions", json=body))
        await asyncio.wait_for(captioning.wait(), 30)
        assert chat.media.preprocessing.num_held == 0
        inline = client.post("/v1/chat/completions", json=ask(data_uri(make_image(32, 32))))
        response = await asyncio.wait_for(inline, 30)
        assert response.status_code == 200, response.text
        release.set()
        response = await asyncio.wait_for(captioned, 60)
        assert response.status_code == 200, response.text
        assert response.json()["frames"]


async def test_a_request_waits_for_a_media_slot_no_longer_than_the_queue_timeout(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer
) -> None:
    """A request that cannot get a download (or preprocessing) slot within --queue-timeout
    is the 503 queue_timeout with Retry-After, as one that waited too long in the engine's
    queue (it waited behind every stalled request, unbounded)."""
    settings = make_settings(
        tiny_model_dir,
        data_dir=tmp_path / "data",
        max_concurrent_downloads=1,
        max_concurrent_preprocessing=1,
        queue_timeout=1.0,
        media_fetch_timeout=60,
    )
    stalled = media_server.stall("/stall/slot-timeout.jpg", make_image(64, 48))
    async for client in start_client(settings):
        holding = asyncio.ensure_future(client.post("/v1/chat/completions", json=ask(stalled)))
        await requested(media_server, "/stall/slot-timeout.jpg")
        waiting = await client.post("/v1/chat/completions", json=ask(media_server.url("/x.jpg")))
        error = assert_error(waiting, 503, None, "queue_timeout")
        assert waiting.headers["retry-after"] == "1" and "slot" in error["message"]
        slots = client.app.state.services.chat.media.preprocessing  # type: ignore[attr-defined]
        await slots.take()  # (and a preprocessing slot, for a request with inline media)
        inline = await client.post("/v1/chat/completions", json=ask(data_uri(make_image(8, 8))))
        assert_error(inline, 503, None, "queue_timeout")
        slots.give_back()
        media_server.stalls["/stall/slot-timeout.jpg"].set()
        response = await asyncio.wait_for(holding, 30)
        assert response.status_code == 200, response.text
        assert not spooled(settings)


async def test_categories_decode_in_a_preprocessing_slot(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer
) -> None:
    """/v2/media/categories decodes its image or video in one of the preprocessing slots, as a
    completion does (it decoded and built 60 frames' inputs outside them: a burst of
    categories requests spent the CPU the slots bound), and gives it back for the answer.
    By URL, it keeps its download slot until it has a preprocessing slot (as a completion's
    downloads: the downloads waiting on disk stay as many as the download slots)."""
    from tests.helpers import make_video

    settings = make_settings(
        tiny_model_dir,
        data_dir=tmp_path / "data",
        max_concurrent_preprocessing=1,
        max_concurrent_downloads=1,
        queue_timeout=30.0,
    )
    image, video = make_image(64, 48), make_video(seconds=2)
    inline = [data_uri(image), data_uri(video, "video/mp4")]
    by_url = [media_server.add("/cat/1", image), media_server.add("/cat/2", video, "video/mp4")]
    async for client in start_client(settings):
        media = client.app.state.services.chat.media  # type: ignore[attr-defined]
        for media_url in inline:
            await media.preprocessing.take()  # (every preprocessing slot busy)
            body = {"model": "tiny", "media_url": media_url, "metadata": ["tags"]}
            waiting = asyncio.ensure_future(client.post("/v2/media/categories", json=body))
            async with asyncio.timeout(20):
                while media.preprocessing.num_waiting == 0:
                    await asyncio.sleep(0.01)
            assert not waiting.done()
            media.preprocessing.give_back()
            response = await asyncio.wait_for(waiting, 60)
            assert response.status_code == 200, response.text
        await media.preprocessing.take()
        bodies = [{"model": "tiny", "media_url": url, "metadata": ["tags"]} for url in by_url]
        waiting = [
            asyncio.ensure_future(client.post("/v2/media/categories", json=body)) for body in bodies
        ]
        one_each = {"held": 1, "waiting": 1}
        await until_slots(client, {"downloads": one_each, "preprocessing": one_each})
        await asyncio.sleep(0.5)
        assert len(spooled(settings)) == 1  # (the second waits for the download slot)
        media.preprocessing.give_back()
        for request in waiting:
            response = await asyncio.wait_for(request, 60)
            assert response.status_code == 200, response.text
        none = {"held": 0, "waiting": 0}
        assert await media_slots(client) == {"downloads": none, "preprocessing": none}
        assert not spooled(settings)


async def test_a_broken_inline_image_is_refused_before_a_slow_download(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer
) -> None:
    """An inline image that is no image needs no download to be refused: the 400 comes at
    once, not when the slow host beside it answers."""
    settings = make_settings(tiny_model_dir, data_dir=tmp_path / "data", media_fetch_timeout=60)
    slow = media_server.stall("/stall/beside-broken.jpg", make_image(64, 48))
    broken = "data:image/png;base64,bm90IGFuIGltYWdl"  # "not an image"
    async for client in start_client(settings):
        response = await asyncio.wait_for(
            client.post("/v1/chat/completions", json=ask(slow, broken)), 20
        )
        assert_error(response, 400, "messages[0].content[1]", "invalid_media")
        assert "/stall/beside-broken.jpg" not in media_server.requested
        media_server.stalls["/stall/beside-broken.jpg"].set()
