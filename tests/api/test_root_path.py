"""--root-path: the API served under a prefix by a reverse proxy (/vlm), whether the proxy
strips it or passes it on; the URLs the server writes (a job's status_url and Location, a
webhook's, the playground's and /docs' links) name it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from server.api.app import create_app
from server.config import SERVED_SEGMENTS, Settings
from server.jobs.store import JobStore
from tests.api.test_jobs_api import wait_done
from tests.helpers import data_uri, make_image, make_settings, start_client

pytestmark = pytest.mark.anyio
KEY = {"Authorization": "Bearer sk-1"}


@pytest.fixture(scope="module")
async def client(tiny_model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(tiny_model_dir, root_path="/vlm/", api_keys=["sk-1"])
    async for c in start_client(settings):
        yield c


@pytest.mark.parametrize("prefix", ["/vlm", ""])  # (passed on, or stripped by the proxy)
async def test_the_api_answers_under_the_prefix_or_without_it(
    client: httpx.AsyncClient, prefix: str
) -> None:
    sdk = openai.AsyncOpenAI(
        base_url=f"http://testserver{prefix}/v1", api_key="sk-1", http_client=client
    )
    answer = await sdk.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert answer.choices[0].message.content is not None
    assert "tiny" in [m.id async for m in sdk.models.list()]
    assert (await client.get(f"{prefix}/models", headers=KEY)).status_code == 200  # (at root)
    assert (await client.get(f"{prefix}/health")).status_code == 200  # (open without a key)
    assert (await client.get(f"{prefix}/v1/models")).status_code == 401
    assert (await client.get(f"{prefix}/v1/nope", headers=KEY)).status_code == 404
    upload = await client.post(
        f"{prefix}/v1/files",
        files={"file": ("in.jsonl", b"," * 1_100_000)},  # (an upload: its values not counted)
        data={"purpose": "batch"},
        headers=KEY,
    )
    assert upload.status_code == 200, upload.text


async def test_a_jobs_status_url_names_the_prefix(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "media_url": data_uri(make_image()), "async": True}
    accepted = await client.post("/vlm/v2/media/categories", json=body, headers=KEY)
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert job["status_url"] == f"/vlm/v2/media/status/{job['id']}"
    assert accepted.headers["location"] == job["status_url"]
    client.headers.update(KEY)
    try:
        done = await wait_done(client, job["status_url"])
    finally:
        del client.headers["Authorization"]
    assert done["status"] == "completed" and done["status_url"] == job["status_url"]


async def test_the_playground_and_docs_link_under_the_prefix(client: httpx.AsyncClient) -> None:
    for opened in ("/vlm", "/vlm/"):
        page = await client.get(opened)
        assert page.status_code == 200 and '<base href="/vlm/">' in page.text
    assert 'href="/' not in page.text.replace('<base href="/vlm/">', "")
    assert (await client.get("/vlm/playground/app.js")).status_code == 200
    assert (await client.get("/vlm/playground/index.html")).status_code == 404  # (no <base>)
    docs = await client.get("/vlm/docs")
    assert docs.status_code == 200 and "/vlm/openapi.json" in docs.text
    assert (await client.get("/vlm/openapi.json")).status_code == 200
    assets = await client.get("/vlm/static-offline-docs/swagger-ui.css")  # (no CDN: its own)
    assert assets.status_code == 200 and '"/vlm/static-offline-docs/' in docs.text


def test_a_webhooks_status_url_names_the_prefix(tmp_path: Path) -> None:
    from server.jobs.sqlite import SqliteJobStore

    store: JobStore = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.root_path = "/vlm"
    job = store.create("categories", {"webhook_url": "http://h/"}, None)
    claimed = store.claim(lease_s=60)
    assert claimed is not None and store.complete(claimed, {"ok": True})
    (delivery,) = store.due_deliveries()
    sent = json.loads(delivery["payload"])["data"]
    assert sent["status_url"] == f"/vlm/v2/media/status/{job.id}"
    store.close()


def test_the_prefix_is_a_path_that_names_no_route() -> None:
    assert Settings(root_path="/a/b-1.c/").root_path == "/a/b-1.c"
    assert Settings(root_path="").root_path == ""
    for bad, words in (
        ("vlm", "not a path prefix"),
        ("/vlm x", "not a path prefix"),
        ("/vlm/..", "not a path prefix"),
        ("/.", "not a path prefix"),
        ("/v1", "a path this server answers"),
        ("/health/x", "a path this server answers"),
    ):
        with pytest.raises(ValueError, match=words):
            Settings(root_path=bad)
    # every route's first segment is one the prefix may not start with
    app = create_app(Settings())
    paths = set()
    for route in app.routes:
        included = getattr(route, "original_router", None)
        paths |= {r.path for r in included.routes} if included else {route.path}  # type: ignore[attr-defined]
    assert {p.split("/")[1] for p in paths} - {""} <= SERVED_SEGMENTS
