"""Projects: on a server with API keys, a key's stored objects (files, batches, media jobs,
responses, conversations) are its project's. Another project's are not found (404, as on
OpenAI's platform), not listed, not continued, not usable as inputs; keys given one project
name share theirs. A batch's lines and a background response run in their job's project."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from server.config import Settings, key_and_project
from server.jobs.project import ALL, of_key, scoped_key, sees
from tests.api.test_batches import chat_line, finished, jsonl
from tests.api.test_errors import assert_error
from tests.helpers import data_uri, make_image, make_settings, start_client

pytestmark = pytest.mark.anyio

GREEDY = {"model": "tiny", "temperature": 0, "max_output_tokens": 4}
IMAGE = make_image(48, 48, fmt="PNG")


@pytest.fixture(scope="module")
async def client(tiny_model_dir: Path, tmp_path_factory) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# a project of its own, then two keys of one team\nsk-a\nsk-b team\n")
    settings = make_settings(tiny_model_dir, api_key_file=keys, api_keys=["sk-c team"])
    async for c in start_client(settings):
        yield c


def sdk_of(client: httpx.AsyncClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0
    )


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def upload(sdk: openai.AsyncOpenAI, content: bytes, purpose: str) -> str:
    name = "in.jsonl" if purpose == "batch" else "photo.png"
    return (await sdk.files.create(file=(name, io.BytesIO(content)), purpose=purpose)).id  # type: ignore[arg-type]


async def test_files_are_their_projects(client: httpx.AsyncClient) -> None:
    a, b, c = (sdk_of(client, key) for key in ("sk-a", "sk-b", "sk-c"))
    mine = await upload(a, IMAGE, "vision")
    team = await upload(b, IMAGE, "vision")
    for path in (f"/v1/files/{mine}", f"/v1/files/{mine}/content"):
        assert_error(await client.get(path, headers=as_key("sk-b")), 404)
        assert (await client.get(path, headers=as_key("sk-a"))).status_code == 200
    assert_error(await client.delete(f"/v1/files/{mine}", headers=as_key("sk-c")), 404)
    assert [f.id async for f in b.files.list()] == [team]
    assert [f.id async for f in c.files.list()] == [team]  # one team: one project
    assert team not in [f.id async for f in a.files.list()]
    # a cursor of another project's is no cursor
    assert_error(await client.get(f"/v1/files?after={mine}", headers=as_key("sk-b")), 400, "after")
    # an image by file id: the request's project's only
    part = {"type": "file", "file": {"file_id": mine}}
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [part]}]}
    assert_error(await client.post("/v1/chat/completions", json=body, headers=as_key("sk-b")), 400)
    ok = await client.post("/v1/chat/completions", json=body, headers=as_key("sk-a"))
    assert ok.status_code == 200, ok.text
    assert (await client.delete(f"/v1/files/{team}", headers=as_key("sk-c"))).status_code == 200


async def test_a_project_uploads_up_to_its_file_storage(tiny_model_dir: Path) -> None:
    """--max-file-storage-bytes: an upload past what the project's files may hold is a 400
    naming the bound (the SDK's BadRequestError, not retried), other projects upload on, and
    a deleted file makes room."""
    settings = make_settings(
        tiny_model_dir, api_keys=["sk-a", "sk-b"], max_file_storage_bytes=2 * len(IMAGE)
    )
    async for client in start_client(settings):
        a, b = sdk_of(client, "sk-a"), sdk_of(client, "sk-b")
        first = await upload(a, IMAGE, "vision")
        await upload(a, IMAGE, "vision")
        refused = await client.post(
            "/v1/files",
            files={"file": ("photo.png", IMAGE)},
            data={"purpose": "vision"},
            headers=as_key("sk-a"),
        )
        error = assert_error(refused, 400, "file")
        assert error["code"] == "storage_limit_exceeded"
        assert f"past {2 * len(IMAGE)} bytes" in error["message"]
        with pytest.raises(openai.BadRequestError):
            await upload(a, b"{}", "batch")
        await upload(b, IMAGE, "vision")  # (its own project's room)
        await a.files.delete(first)
        await upload(a, IMAGE, "vision")
        assert len([f async for f in a.files.list()]) == 2


async def test_batches_run_in_their_project(client: httpx.AsyncClient) -> None:
    """A batch over another project's file is refused; a batch is not seen, cancelled or
    listed by another project; its lines (an image by file id among them) run in its
    project, and its output file is its project's."""
    a, b = sdk_of(client, "sk-a"), sdk_of(client, "sk-b")
    image = await upload(a, IMAGE, "vision")
    by_id = [{"type": "file", "file": {"file_id": image}}, {"type": "text", "text": "What?"}]
    lines = jsonl(chat_line("plain"), chat_line("image", by_id)).getvalue()
    requests = await upload(a, lines, "batch")
    with pytest.raises(openai.NotFoundError):
        await b.batches.create(
            input_file_id=requests, endpoint="/v1/chat/completions", completion_window="24h"
        )
    batch = await a.batches.create(
        input_file_id=requests, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.NotFoundError):
        await b.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        await b.batches.cancel(batch.id)
    assert batch.id not in [listed.id async for listed in b.batches.list()]
    done = await finished(a, batch.id)
    assert done.status == "completed" and done.output_file_id is not None, done  # type: ignore[attr-defined]
    answers = (await a.files.content(done.output_file_id)).text.splitlines()  # type: ignore[attr-defined]
    assert [json.loads(line)["response"]["status_code"] for line in answers] == [200, 200]
    with pytest.raises(openai.NotFoundError):
        await b.files.content(done.output_file_id)  # type: ignore[attr-defined]
    # B's batch naming A's image: that line is B's request, and B does not see the file
    theirs = await upload(b, jsonl(chat_line("image", by_id)).getvalue(), "batch")
    batch = await b.batches.create(
        input_file_id=theirs, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await finished(b, batch.id)
    errors = (await b.files.content(done.error_file_id)).text.splitlines()  # type: ignore[attr-defined]
    assert json.loads(errors[0])["response"]["status_code"] == 400


async def test_media_jobs_and_idempotency_keys_are_per_project(
    client: httpx.AsyncClient,
) -> None:
    body = {"model": "tiny", "media_url": data_uri(make_image(seed=5)), "async": True}
    same_key = {"Idempotency-Key": "order-17"}
    made = await client.post(
        "/v2/media/categories", json=body, headers={**as_key("sk-a"), **same_key}
    )
    assert made.status_code == 202, made.text
    job_id = made.json()["id"]
    other = await client.post(
        "/v2/media/categories", json=body, headers={**as_key("sk-b"), **same_key}
    )
    assert other.status_code == 202 and other.json()["id"] != job_id  # not A's job
    again = await client.post(
        "/v2/media/categories", json=body, headers={**as_key("sk-a"), **same_key}
    )
    assert again.json()["id"] == job_id
    status = f"/v2/media/status/{job_id}"
    assert_error(await client.get(status, headers=as_key("sk-b")), 404)
    assert_error(await client.post(f"{status}/cancel", headers=as_key("sk-b")), 404)
    listed = (await client.get("/v2/media/jobs", headers=as_key("sk-b"))).json()["data"]
    assert job_id not in [job["id"] for job in listed]
    assert (await client.get(status, headers=as_key("sk-a"))).status_code == 200


async def test_responses_and_conversations_are_their_projects(
    client: httpx.AsyncClient,
) -> None:
    a, b = sdk_of(client, "sk-a"), sdk_of(client, "sk-b")
    first = await a.responses.create(input="Hi", **GREEDY)
    for call in (
        b.responses.retrieve(first.id),
        b.responses.delete(first.id),
        b.responses.input_items.list(first.id),
        b.responses.cancel(first.id),
    ):
        with pytest.raises(openai.NotFoundError):
            await call
    with pytest.raises(openai.NotFoundError, match="Previous response"):
        await b.responses.create(input="More", previous_response_id=first.id, **GREEDY)
    assert (await a.responses.create(input="More", previous_response_id=first.id, **GREEDY)).id

    conversation = await a.conversations.create(items=[{"role": "user", "content": "Hello"}])
    for call in (
        b.conversations.retrieve(conversation.id),
        b.conversations.update(conversation.id, metadata={"x": "y"}),
        b.conversations.items.list(conversation.id),
        b.conversations.items.create(conversation.id, items=[{"role": "user", "content": "Hi"}]),
        b.conversations.delete(conversation.id),
    ):
        with pytest.raises(openai.NotFoundError):
            await call
    with pytest.raises(openai.NotFoundError):
        await b.responses.create(input="Hi", conversation=conversation.id, **GREEDY)
    background = await b.responses.create(input="Hi", background=True, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        await a.responses.retrieve(background.id)
    async with asyncio.timeout(60):  # it runs (in B's project) to its end
        while (await b.responses.retrieve(background.id)).status in ("queued", "in_progress"):
            await asyncio.sleep(0.05)
    assert (await b.responses.retrieve(background.id)).status in ("completed", "incomplete")
    assert (await a.conversations.items.list(conversation.id)).data


def test_keys_name_their_projects(tmp_path: Path) -> None:
    assert key_and_project("sk-1") == ("sk-1", of_key("sk-1"))
    assert key_and_project("  sk-1   team.a-1 ") == ("sk-1", "team.a-1")
    assert of_key("sk-1") != of_key("sk-2")
    for bad in ("sk-1 two words", "sk-1 t/eam", "sk-1 " + "x" * 65):
        with pytest.raises(ValueError, match="KEY PROJECT"):
            key_and_project(bad)
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-1 team\n# a comment\n\nsk-2\n")
    settings = Settings(api_key_file=keys, api_keys=["sk-3 team"])
    assert settings.all_api_keys() == {"sk-3": "team", "sk-1": "team", "sk-2": of_key("sk-2")}
    keys.write_text("sk-1\nsk-2 a b\n")
    with pytest.raises(ValueError, match="line 2"):
        Settings(api_key_file=keys)
    with pytest.raises(ValueError, match="given twice, with two projects"):
        Settings(api_keys=["sk-1 team", "sk-1"])
    assert Settings(api_keys=["sk-1 team", "sk-1 team"]).all_api_keys() == {"sk-1": "team"}


def test_without_keys_everything_is_everyones() -> None:
    """A server without keys sees every object; an object made then (project ALL) is seen
    by every key later; a key's idempotency keys are its own."""
    assert sees(ALL, "team") and sees("team", ALL) and sees("team", "team")
    assert not sees("team", "other")
    assert scoped_key(ALL, "k") == "k" and scoped_key("team", "k") != scoped_key("other", "k")
    assert scoped_key("team", None) is None


async def test_a_restart_without_keys_on_keyed_objects_is_warned_of(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys lost in a restart (a variable not passed on) make every tenant's objects
    everyone's: the start-up log says so; a store of keyless objects only says nothing."""
    warning = "has no --api-key: every client sees all of them"

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if warning in r.getMessage()]

    async for client in start_client(make_settings(tiny_model_dir, data_dir=tmp_path)):
        assert (await upload(sdk_of(client, "none"), IMAGE, "vision")).startswith("file-")
    async for _client in start_client(make_settings(tiny_model_dir, data_dir=tmp_path)):
        pass
    assert warned() == []
    async for client in start_client(
        make_settings(tiny_model_dir, data_dir=tmp_path, api_keys=["sk-a"])
    ):
        await upload(sdk_of(client, "sk-a"), IMAGE, "vision")
    async for _client in start_client(make_settings(tiny_model_dir, data_dir=tmp_path)):
        pass
    assert warned() == [
        "the job store holds files that API keys' projects made, and this server has no "
        "--api-key: every client sees all of them (and may delete them); pass the keys it "
        "was started with"
    ]


@pytest.mark.parametrize("policy", ["fair", "fcfs"])
async def test_the_fair_policy_lets_another_project_in_first(
    tiny_model_dir: Path, policy: str
) -> None:
    """--scheduling-policy fair, two places in the batch: A's four long requests are sent
    first; B's short one, sent after them, takes a place before A's third and fourth (once
    A holds one, B's none comes first), so it ends before them; under fcfs it waits for
    them to end, and ends last."""
    settings = make_settings(
        tiny_model_dir, api_keys=["sk-a", "sk-b"], scheduling_policy=policy, max_num_seqs=2
    )
    async for client in start_client(settings):
        ended = await _ask_a_then_b(client)
        assert ended.index("b") < 3 if policy == "fair" else ended[-1] == "b", ended


async def _ask_a_then_b(client: httpx.AsyncClient) -> list[str]:
    """A's four long requests, then (once they are in the engine's queue) B's short one:
    the order they end in."""
    ended: list[str] = []

    async def ask(key: str, name: str, tokens: int) -> None:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": name}],
            "max_tokens": tokens,
            "ignore_eos": True,
            "temperature": 0,
        }
        response = await client.post("/v1/chat/completions", json=body, headers=as_key(key))
        assert response.status_code == 200, response.text
        ended.append(name)

    engine = client.app.state.services.engine  # type: ignore[attr-defined]
    long = [asyncio.create_task(ask("sk-a", f"a{i}", 400)) for i in range(4)]
    async with asyncio.timeout(30):  # (A's four are in the engine: queued or running)
        while engine.num_waiting + len(engine.scheduler.running) < 4:
            await asyncio.sleep(0.005)
    await ask("sk-b", "b", 4)
    await asyncio.gather(*long)
    return ended


async def test_tokens_are_counted_by_project(client: httpx.AsyncClient) -> None:
    """/metrics: each project's prompt and generated tokens (chargeback); keys of one
    project add up under its name."""

    def counted(text: str, project: str, kind: str) -> float:
        line = f'vlm_project_tokens_total{{kind="{kind}",project="{project}"}}'
        values = [float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)]
        return values[0] if values else 0.0

    before = (await client.get("/metrics", headers=as_key("sk-a"))).text
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    body |= {"ignore_eos": True}
    for key in ("sk-b", "sk-c"):  # one project: team
        response = await client.post("/v1/chat/completions", json=body, headers=as_key(key))
        assert response.status_code == 200
    usage = response.json()["usage"]
    after = (await client.get("/metrics", headers=as_key("sk-a"))).text
    generated = counted(after, "team", "generated") - counted(before, "team", "generated")
    prompt = counted(after, "team", "prompt") - counted(before, "team", "prompt")
    assert generated == 2 * usage["completion_tokens"] == 6
    assert prompt == 2 * usage["prompt_tokens"]
    # a key's own project is labelled with the server's secret (of_key, the same on every
    # server, would let a weak key be guessed offline from an open /metrics)
    label = client.app.state.metrics.project_label(of_key("sk-a"))  # type: ignore[attr-defined]
    assert label.startswith("key-") and label != of_key("sk-a")
    response = await client.post("/v1/chat/completions", json=body, headers=as_key("sk-a"))
    assert response.status_code == 200
    last = (await client.get("/metrics", headers=as_key("sk-a"))).text
    assert counted(last, label, "generated") - counted(after, label, "generated") == 3
    assert of_key("sk-a") not in last
