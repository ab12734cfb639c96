"""POST /v2/media/categories: schema-guaranteed JSON from a random-weight model."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import pytest

from server.pipelines.categories import MAX_ITEMS, METADATA_KEYS, merge_results
from tests.api.test_errors import assert_error
from tests.helpers import (
    MediaServer,
    data_uri,
    make_image,
    make_settings,
    make_video,
    start_client,
)

pytestmark = pytest.mark.anyio


def check(result: dict, keys: tuple[str, ...], max_items: int | None = MAX_ITEMS) -> None:
    assert tuple(result) == keys
    for key in keys:
        if key == "scene":
            assert isinstance(result[key], str)
        else:
            assert isinstance(result[key], list)
            assert max_items is None or len(result[key]) <= max_items
            assert all(isinstance(v, str) and v for v in result[key]), result


async def test_fifty_random_images_all_give_valid_json(client: httpx.AsyncClient) -> None:
    async def one(i: int) -> httpx.Response:
        body = {"model": "tiny", "media_url": data_uri(make_image(56 + 4 * i, 56, seed=i))}
        return await client.post("/v2/media/categories", json=body)

    responses = await asyncio.gather(*(one(i) for i in range(50)))
    for response in responses:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "media.categories" and body["media_type"] == "image"
        check(body["result"], METADATA_KEYS)
        assert body["usage"]["prompt_tokens_details"]["image_tokens"] > 0


async def test_requested_keys_only(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "media_url": data_uri(make_image()), "metadata": ["tags", "scene"]}
    response = await client.post("/v2/media/categories", json=body)
    assert response.status_code == 200, response.text
    check(response.json()["result"], ("scene", "tags"))


async def test_video_with_scenes(client: httpx.AsyncClient) -> None:
    video = make_video(seconds=10, cuts=(2.0, 5.0, 7.5))
    body = {
        "model": "tiny",
        "media_url": "data:video/mp4;base64," + base64.b64encode(video).decode(),
        "metadata": ["actions", "scene"],
        "use_scenes": True,
    }
    response = await client.post("/v2/media/categories", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["media_type"] == "video"
    assert [round(f["timestamp"]) for f in result["frames"]] == [1, 4, 6, 9]
    check(result["result"], ("actions", "scene"), max_items=None)  # merged over frames
    for frame in result["frames"]:
        check(frame["result"], ("actions", "scene"))


@pytest.mark.parametrize(
    "extra,code",
    [
        ({"webhook_url": "ftp://127.0.0.1/hook"}, "invalid_webhook_url"),
        ({"metadata": ["colours"]}, "invalid_value"),
        ({"metadata": []}, "invalid_value"),
    ],
)
async def test_refusals(client: httpx.AsyncClient, extra: dict, code: str) -> None:
    body = {"model": "tiny", "media_url": data_uri(make_image()), **extra}
    response = await client.post("/v2/media/categories", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == code


def test_merge_orders_by_frequency_and_dedupes() -> None:
    frames = [
        {"tags": ["Tree", "sky"], "scene": "a park"},
        {"tags": ["sky", "dog"], "scene": "a park"},
        {"tags": ["tree ", "Sky"], "scene": "a street"},
    ]
    merged = merge_results(frames, ("scene", "tags"))
    assert merged == {"scene": "a park", "tags": ["sky", "Tree", "dog"]}


async def test_model_is_optional_as_in_seed_000(client: httpx.AsyncClient) -> None:
    """Seed 000's categories parameters are media_url, metadata and use_scenes: no model. The
    answer (and an async job's result) names the first served model."""
    first = "animuslabs/Qwen2-VL-NSFW-Vision-1.2"
    body = {"media_url": data_uri(make_image()), "metadata": ["tags"]}
    response = await client.post("/v2/media/categories", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == first
    check(response.json()["result"], ("tags",))
    accepted = await client.post("/v2/media/categories", json={**body, "async": True})
    assert accepted.status_code == 202, accepted.text
    for _ in range(200):
        job = (await client.get(accepted.json()["status_url"])).json()
        if job["status"] in ("completed", "failed"):
            break
        await asyncio.sleep(0.05)
    assert job["status"] == "completed", job
    assert job["result"]["model"] == first
    null_model = await client.post("/v2/media/categories", json={**body, "model": None})
    assert null_model.status_code == 200  # null is the same as leaving it out
    unknown = await client.post("/v2/media/categories", json={**body, "model": "nope"})
    assert unknown.status_code == 404


async def test_a_video_format_the_server_does_not_read_is_named(client: httpx.AsyncClient) -> None:
    body = {"media_url": "https://media.example/clip.rmvb?sig=1", "metadata": ["tags"]}
    response = await client.post("/v2/media/categories", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type" and error["param"] == "media_url"
    assert ".rmvb videos are not supported" in error["message"] and "image" not in error["message"]
    # every route says so by the name, before any download (/v1's video_url part was a
    # fetch failure, /v2's image_url part this 400)
    part = {"type": "video_url", "video_url": {"url": "https://media.example/clip.rm"}}
    v1 = {"model": "tiny", "messages": [{"role": "user", "content": [part]}]}
    part = {"type": "image_url", "image_url": {"url": "https://media.example/clip.rm"}}
    v2 = {"model": "tiny", "messages": [{"role": "user", "content": [part]}]}
    for path, request in (("/v1/chat/completions", v1), ("/v2/media/completions", v2)):
        response = await client.post(path, json=request)
        error = assert_error(response, 400, "messages[0].content[0]", "unsupported_media_type")
        assert ".rm videos are not supported" in error["message"]


def test_a_3gp_name_is_a_video_this_server_reads() -> None:
    """MP4's container under old phones' name, and the MPEG, Flash, Windows Media and Ogg
    containers' names: they were refused by the name."""
    from server.media.kind import url_kind

    names = ("clip.3gp", "clip.3G2?sig=1", "cam.MTS", "a.m2ts", "b.ts", "c.mpg", "VTS_01_1.VOB")
    for name in (*names, "d.flv", "e.f4v", "f.wmv", "g.ogv"):
        assert url_kind(f"https://media.example/{name}", "media_url") == "video"


async def test_video_frames_are_not_divided_by_the_context(client: httpx.AsyncClient) -> None:
    """Seed 000: up to 60 frames, as many as the model allows; each frame is its own request,
    so a 5-second clip gets its 2 frames a second (it used to be 7 for any video)."""
    video = make_video(seconds=5)
    body = {
        "media_url": "data:video/mp4;base64," + base64.b64encode(video).decode(),
        "metadata": ["scene"],
    }
    response = await client.post("/v2/media/categories", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["frames"]) == 10
    # fewer frames asked for (an extension, as a video part takes them): fewer analysed
    fewer = await client.post("/v2/media/categories", json={**body, "max_frames": 4})
    assert len(fewer.json()["frames"]) == 4
    slower = await client.post("/v2/media/categories", json={**body, "fps": 0.5, "async": True})
    job = slower.json()
    while job["status"] not in ("completed", "failed"):
        await asyncio.sleep(0.05)
        job = (await client.get(f"/v2/media/status/{job['id']}")).json()
    assert len(job["result"]["frames"]) == 2  # (a job keeps them too)
    bad = await client.post("/v2/media/categories", json={**body, "max_frames": 0})
    assert_error(bad, 400, "max_frames")


async def test_a_url_that_does_not_say_what_it_is_is_read_by_its_first_bytes(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer
) -> None:
    """No extension (a signed CDN link, a local file named `clip`), or one of neither kind:
    the media's first bytes decide image or video, over HTTP and file:// alike; downloaded
    once (a single-use link takes no second request), nothing left in the spool."""
    video, image = make_video(seconds=2), make_image(96, 64, fmt="PNG")
    (tmp_path / "clip").write_bytes(video)
    (tmp_path / "picture.bin").write_bytes(image)
    media_server.files["/signed/abc123?sig=x"] = (video, "application/octet-stream")
    media_server.files["/signed/def456"] = (image, "application/octet-stream")
    settings = make_settings(tiny_model_dir, allowed_local_media_path=tmp_path)
    cases = {
        f"file://{tmp_path}/clip": "video",
        f"file://{tmp_path}/picture.bin": "image",
        media_server.url("/signed/abc123") + "?sig=x": "video",
        media_server.url("/signed/def456"): "image",
        media_server.add("/misnamed.jpg", video, "image/jpeg"): "video",  # (the bytes decide)
        media_server.add("/misnamed.mp4", image, "video/mp4"): "image",
        # a data: URI naming no type, as Qwen-Agent writes a local file
        "data:;base64," + base64.b64encode(video).decode(): "video",
        "data:application/octet-stream;base64," + base64.b64encode(image).decode(): "image",
    }
    async for client in start_client(settings):
        for url, kind in cases.items():
            before = len(media_server.requested)
            body = {"model": "tiny", "media_url": url, "metadata": ["tags"]}
            response = await client.post("/v2/media/categories", json=body)
            assert response.status_code == 200, (url, response.text)
            assert response.json()["media_type"] == kind, url
            downloads = 0 if url.startswith(("file:", "data:")) else 1
            assert len(media_server.requested) - before == downloads
        spooled = (settings.data_dir / "spool").rglob("*")
        assert not [p for p in spooled if p.is_file() and p.name != ".lock"]
        missing = {"model": "tiny", "media_url": media_server.url("/signed/none")}
        response = await client.post("/v2/media/categories", json=missing)
        assert response.status_code == 400 and response.json()["error"]["param"] == "media_url"
        # Neither an image read here nor a video: the error says both, not only "not a video";
        # an image format read elsewhere is named (an SVG was "neither ... nor a video")
        text = media_server.add("/notes", b"plain text, not media at all", "x")
        response = await client.post("/v2/media/categories", json={"media_url": text})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "media_url", error
        assert "neither an image this server reads (jpeg, png" in error["message"], error
        svg = media_server.add("/logo.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "x")
        response = await client.post("/v2/media/categories", json={"media_url": svg})
        error = assert_error(response, 400, "media_url", "invalid_media")
        assert "it is an SVG" in error["message"], error
