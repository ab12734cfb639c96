"""What an operator sees: offline docs open without a key, /version, the playground's page,
access lines with latency and the reason of every 4xx, metrics labels."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import re
import threading
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server import __version__
from tests.helpers import data_uri, make_image, make_settings, make_video, start_client

pytestmark = pytest.mark.anyio

KEY = "operator-key"


@pytest.fixture(scope="module")
async def keyed(tiny_model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for client in start_client(make_settings(tiny_model_dir, api_keys=[KEY])):
        yield client


async def test_docs_render_offline_and_open_without_a_key(keyed: httpx.AsyncClient) -> None:
    for path in ("/docs", "/redoc"):
        page = await keyed.get(path)
        assert page.status_code == 200
        assert not re.search(r"https?://", page.text), f"{path} would load from the network"
        for asset in re.findall(r"""(?:src|href)=["']?(/[^"' >]+)""", page.text):
            assert (await keyed.get(asset)).status_code == 200, asset
    assert (await keyed.get("/openapi.json")).json()["info"]["version"] == __version__
    assert (await keyed.get("/v1/models")).status_code == 401  # everything else needs the key
    auth = {"Authorization": f"Bearer {KEY}"}
    assert (await keyed.get("/v1/models", headers=auth)).status_code == 200


async def test_version(keyed: httpx.AsyncClient) -> None:
    assert (await keyed.get("/version")).json() == {"version": __version__}


async def test_head_is_get_without_the_body(keyed: httpx.AsyncClient) -> None:
    """Uptime checkers and `curl -I` probe with HEAD: every GET route answers it, headers and
    status as GET's, no body; the key is still needed where GET needs it."""
    health = await keyed.head("/health")
    assert health.status_code == 200 and health.content == b""
    assert health.headers["content-type"] == "application/json"
    assert int(health.headers["content-length"]) == len((await keyed.get("/health")).content)
    assert (await keyed.head("/v1/models")).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    models = await keyed.head("/v1/models", headers=auth)
    assert models.status_code == 200 and models.content == b""
    assert (await keyed.head("/v1/models/nope", headers=auth)).status_code == 404
    posted_only = await keyed.head("/v1/completions", headers=auth)
    assert posted_only.status_code == 405 and posted_only.content == b""


async def test_a_bad_query_parameter_is_named_as_sent(keyed: httpx.AsyncClient) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    response = await keyed.get("/v1/models", params={"limit": 0}, headers=auth)
    assert response.status_code == 400 and response.json()["error"]["param"] == "limit"


async def test_playground_page_is_served_and_can_be_turned_off(
    keyed: httpx.AsyncClient, tiny_model_dir: Path
) -> None:
    page = await keyed.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert not re.search(r"(src|href)=[\"']?https?://", page.text)  # no CDN
    async for client in start_client(make_settings(tiny_model_dir, playground=False)):
        assert (await client.get("/")).status_code == 404


async def test_a_4xx_is_logged_once_with_its_reason(
    keyed: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.access")
    response = await keyed.get("/v1/models/nope", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404
    lines = [r for r in caplog.records if r.name == "server.access"]
    (line,) = [r for r in lines if r.fields["path"] == "/v1/models/nope"]  # type: ignore[attr-defined]
    assert re.fullmatch(
        r"GET /v1/models/nope 404 \d+\.\d ms from 127\.0\.0\.1 model_not_found: .*nope.*",
        line.getMessage(),
    )
    assert line.fields["status"] == 404  # type: ignore[attr-defined]


async def test_metrics_label_every_route_and_have_no_created_series(
    keyed: httpx.AsyncClient,
) -> None:
    await keyed.get("/docs")
    await keyed.get("/openapi.json")
    await keyed.get("/static-offline-docs/swagger-ui.css")
    text = (await keyed.get("/metrics")).text
    assert 'vlm_http_requests_total{route="/docs",status="200"}' in text
    assert 'vlm_http_requests_total{route="/openapi.json",status="200"}' in text
    assert 'vlm_http_requests_total{route="/static-offline-docs",status="200"}' in text
    assert "_created" not in text
    # refused before routing (no key), HEAD, a path no route takes: each labelled as routed
    await keyed.get("/v1/models/some-model")
    await keyed.head("/health")
    await keyed.get("/no/such/path", headers={"Authorization": f"Bearer {KEY}"})
    await keyed.get("/no/such/path")
    text = (await keyed.get("/metrics")).text
    assert 'vlm_http_requests_total{route="/v1/models/{model:path}",status="401"}' in text
    assert 'vlm_http_requests_total{route="/health",status="200"}' in text
    assert 'vlm_http_requests_total{route="unmatched",status="404"}' in text
    assert 'vlm_http_requests_total{route="unmatched",status="401"}' in text


def counter(metrics_text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", metrics_text, re.M)
    return float(match.group(1)) if match else 0.0


async def token_counts(client: httpx.AsyncClient) -> tuple[float, float]:
    text = (await client.get("/metrics")).text
    return counter(text, "vlm_prompt_tokens_total"), counter(text, "vlm_generated_tokens_total")


@pytest.mark.parametrize("endpoint", ["/v2/media/completions", "/v2/media/categories"])
async def test_metrics_count_every_frames_engine_work(
    tiny_model_dir: Path, endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    video = "data:video/mp4;base64," + base64.b64encode(make_video(seconds=2)).decode()
    if endpoint == "/v2/media/categories":
        body: dict = {"media_url": video, "metadata": ["scene"]}
    else:
        content = [
            {"type": "text", "text": "Describe this scene:"},
            {"type": "video_url", "video_url": {"url": video}},
        ]
        messages = [{"role": "user", "content": content}]
        body = {"model": "tiny", "max_tokens": 4, "messages": messages}
    settings = make_settings(tiny_model_dir, caption_tokens=6)
    caplog.set_level(logging.INFO)
    async for client in start_client(settings):
        before = await token_counts(client)
        response = await client.post(endpoint, json=body)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        after = await token_counts(client)
        assert after[0] - before[0] == usage["prompt_tokens"]
        assert after[1] - before[1] == usage["completion_tokens"]
    finished = [r for r in caplog.records if r.getMessage().startswith(("captioned", "analysed"))]
    assert len(finished) == 1  # one line for the video, not one per frame


async def test_an_app_lets_go_of_its_model_and_kv_cache_when_its_lifespan_ends(
    tiny_model_dir: Path,
) -> None:
    """FastAPI's caches keep an app's route closures (and so the app) past its lifespan: what the
    lifespan built must not stay in memory with it (each test app kept ~270 MB before)."""
    async for client in start_client(make_settings(tiny_model_dir)):
        app = client.app  # type: ignore[attr-defined]
        services = app.state.services
        runner = weakref.ref(services.engine.runner)
        model = weakref.ref(services.loaded.model)
        assert b"vlm_kv_cache_blocks" in app.state.metrics.render()
        del services
    gc.collect()
    assert runner() is None and model() is None
    assert b"vlm_queue_depth 0.0" in app.state.metrics.render()  # its gauges still render


def blocking_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("blocking")]


async def test_the_blocking_threads_serve_the_app_and_go_with_its_lifespan(
    tiny_model_dir: Path,
) -> None:
    """asyncio.to_thread runs on the app's 64 threads while it serves (Python's default, cores +
    4, was taken by calls that wait on the job store), and they go when its lifespan ends."""
    others = blocking_threads()  # (another app's, this module's, still serving)
    async for client in start_client(make_settings(tiny_model_dir)):
        name = await asyncio.to_thread(lambda: threading.current_thread().name)
        assert name.startswith("blocking")
        assert (await client.get("/health")).status_code == 200
        ours = [t for t in blocking_threads() if t not in others]
        assert ours
    for thread in ours:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in ours)
    name = await asyncio.to_thread(lambda: threading.current_thread().name)
    assert not name.startswith("blocking")  # the loop's own executor serves what runs after


async def test_auto_image_tokens_sets_the_budget_of_images_without_a_detail(
    tiny_model_dir: Path, client: httpx.AsyncClient
) -> None:
    """--auto-image-tokens: the budget of a part whose detail is auto or left out (default
    1280); 0 reads such an image at the model's ceiling, as `detail: high` and vLLM read it."""
    image = data_uri(make_image(1600, 1200, fmt="PNG"))

    async def image_tokens(client: httpx.AsyncClient, detail: str | None) -> int:
        part = {"type": "image_url", "image_url": {"url": image}}
        if detail is not None:
            part["image_url"]["detail"] = detail
        body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [part]}]}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["image_tokens"]

    default, high = await image_tokens(client, None), await image_tokens(client, "high")
    assert default <= 1280 < high
    low = await image_tokens(client, "low")
    for budget in (0, 64):
        settings = make_settings(tiny_model_dir, auto_image_tokens=budget)
        async for own in start_client(settings):
            tokens = [await image_tokens(own, d) for d in (None, "auto", "low", "high")]
        assert tokens[0] == tokens[1] and tokens[2:] == [low, high]
        if budget == 0:
            assert tokens[0] == high
        else:
            assert 48 <= tokens[0] <= 64


async def test_return_image_sizes_says_what_the_model_read(client: httpx.AsyncClient) -> None:
    """return_image_sizes (extension): each image's size as the model read it, resized to
    whole tokens (Qwen's smart_resize within its detail's budget), in the request's order: the
    pixels a box or point Qwen2.5-VL writes is in. In the answer, on a stream's first chunk,
    and from /tokenize before sending; left out unless asked."""
    wide = {"type": "image_url", "image_url": {"url": data_uri(make_image(1600, 900))}}
    tall = {"type": "image_url", "image_url": {"url": data_uri(make_image(60, 200))}}
    tall["image_url"]["detail"] = "low"
    body = {
        "model": "tiny",
        "max_tokens": 1,
        "messages": [{"role": "user", "content": [wide, tall]}],
    }
    asked = {**body, "return_image_sizes": True}
    answer = (await client.post("/v1/chat/completions", json=asked)).json()
    # 1600 x 900 under auto's 1,280 tokens: 1,316 x 728 (47 x 26 tokens); 60 x 200 rounded
    assert answer["image_sizes"] == [{"width": 1316, "height": 728}, {"width": 56, "height": 196}]
    tokens = answer["usage"]["prompt_tokens_details"]["image_tokens"]
    assert tokens == 47 * 26 + 2 * 7
    assert "image_sizes" not in (await client.post("/v1/chat/completions", json=body)).json()
    tokenized = (await client.post("/tokenize", json=asked)).json()
    assert tokenized["image_sizes"] == answer["image_sizes"]
    assert "image_sizes" not in (await client.post("/tokenize", json=body)).json()
    for sent, sizes in ((asked, answer["image_sizes"]), (body, None)):
        streamed = {**sent, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=streamed) as stream:
            lines = [line async for line in stream.aiter_lines() if line.startswith("data: {")]
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines]
        assert chunks[0].get("image_sizes") == sizes
        assert all("image_sizes" not in chunk for chunk in chunks[1:])
