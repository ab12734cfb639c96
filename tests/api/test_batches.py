"""OpenAI's Files and Batch APIs through the openai SDK: a JSONL file of requests uploaded, a
batch over it run as a durable job, each line answered as its route answers it (errors too),
the output and error files read back, invalid files failing the batch line by line, cancel,
and the refusals."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from tests.helpers import data_uri, make_image, make_settings, start_client

pytestmark = pytest.mark.anyio
KEY = "batch-test-key"


@pytest.fixture(scope="module")
async def client(tiny_model_dir) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    # An API key: a batch's lines must get past it too.
    settings = make_settings(tiny_model_dir, api_key=[KEY], max_num_seqs=4)
    async for c in start_client(settings):
        yield c


@pytest.fixture
def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0
    )


def jsonl(*lines: object) -> io.BytesIO:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    return io.BytesIO(text.encode())


def chat_line(custom_id: str, content: object = "Hello", **body: object) -> dict:
    messages = [{"role": "user", "content": content}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


async def finished(sdk: openai.AsyncOpenAI, batch_id: str, timeout_s: float = 60) -> object:
    async with asyncio.timeout(timeout_s):
        while True:
            batch = await sdk.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "cancelled"):
                return batch
            await asyncio.sleep(0.05)


async def lines_of(sdk: openai.AsyncOpenAI, file_id: str | None) -> list[dict]:
    assert file_id is not None
    content = await sdk.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


async def test_a_batch_answers_each_line_as_its_route_would(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    image = [
        {"type": "image_url", "image_url": {"url": data_uri(make_image(64, 48))}},
        {"type": "text", "text": "What is this?"},
    ]
    upload = await sdk.files.create(
        file=(
            "requests.jsonl",
            jsonl(
                chat_line("a"),
                chat_line("b", image),
                chat_line("unknown-model", model="nope"),
                chat_line("streamed", stream=True),
                chat_line("c", "Count to three"),
                chat_line("fcfs-priority", priority=3),  # fcfs: a non-zero priority is a 400
            ),
        ),
        purpose="batch",
    )
    assert (upload.object, upload.purpose, upload.filename) == ("file", "batch", "requests.jsonl")
    auth = {"Authorization": f"Bearer {KEY}"}
    described = (await client.get(f"/v1/files/{upload.id}", headers=auth)).json()
    # (Anthropic's field)
    assert described["mime_type"] == "application/jsonl"
    batch = await sdk.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "captions"},
    )
    assert batch.id.startswith("batch_") and batch.status == "validating"
    batch = await finished(sdk, batch.id)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (6, 3, 3)
    assert batch.metadata == {"job": "captions"} and batch.input_file_id == upload.id
    assert batch.model == "tiny"
    assert batch.in_progress_at and batch.completed_at and batch.expires_at

    outputs = await lines_of(sdk, batch.output_file_id)
    assert [line["custom_id"] for line in outputs] == ["a", "b", "c"]  # in input order
    for line in outputs:
        response = line["response"]
        assert response["status_code"] == 200 and line["error"] is None
        assert line["id"].startswith("batch_req_") and response["request_id"] == line["id"]
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["usage"]["completion_tokens"] == 4
    image_usage = outputs[1]["response"]["body"]["usage"]["prompt_tokens_details"]
    assert image_usage["image_tokens"] > 0
    prompt_tokens = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in outputs)
    assert batch.usage is not None
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (prompt_tokens, 12)

    errors = {
        line["custom_id"]: line["response"] for line in await lines_of(sdk, batch.error_file_id)
    }
    assert errors["unknown-model"]["status_code"] == 404
    assert errors["unknown-model"]["body"]["error"]["code"] == "model_not_found"
    assert errors["streamed"]["status_code"] == 400
    assert errors["streamed"]["body"]["error"]["param"] == "stream"
    assert errors["fcfs-priority"]["status_code"] == 400
    assert errors["fcfs-priority"]["body"]["error"]["param"] == "priority"


async def test_text_completions_and_responses_batches(sdk: openai.AsyncOpenAI) -> None:
    for endpoint, body, kind in [
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "Once", "max_tokens": 3},
            "text_completion",
        ),
        ("/v1/responses", {"model": "tiny", "input": "Hi", "max_output_tokens": 3}, "response"),
    ]:
        line = {"custom_id": "one", "method": "POST", "url": endpoint, "body": body}
        # (a line's answer is written whole: not a background response's queued stub)
        background = {**line, "custom_id": "bg", "body": {**body, "background": True}}
        upload = await sdk.files.create(file=("in.jsonl", jsonl(line, background)), purpose="batch")
        batch = await sdk.batches.create(
            input_file_id=upload.id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window="24h",
        )
        batch = await finished(sdk, batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 1, batch
        (output,) = await lines_of(sdk, batch.output_file_id)
        assert output["response"]["body"]["object"] == kind
        (refused,) = await lines_of(sdk, batch.error_file_id)
        assert refused["response"]["body"]["error"]["param"] == "background"


async def test_invalid_lines_fail_the_batch_each_listed(sdk: openai.AsyncOpenAI) -> None:
    wrong_url = {**chat_line("w"), "url": "/v1/completions"}
    upload = await sdk.files.create(
        file=(
            "bad.jsonl",
            jsonl(
                chat_line("x"),
                "{not json",
                chat_line("x"),
                wrong_url,
                "",
                {"custom_id": "y"},
                '{"custom_id": "deep", "body": ' + "[" * 5000 + "]" * 5000 + "}",  # past the stack
                '{"custom_id": "nan", "body": {"temperature": NaN}}',  # (not JSON: was a 500)
            ),
        ),
        purpose="batch",
    )
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = await finished(sdk, batch.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None
    found = [(error.line, error.code, error.param) for error in batch.errors.data or []]
    assert found == [
        (2, "invalid_json_line", None),
        (3, "duplicate_custom_id", "custom_id"),
        (4, "mismatched_url", "url"),
        (6, "invalid_method", "method"),
        (7, "invalid_json_line", None),
        (8, "invalid_json_line", None),
    ]
    assert batch.output_file_id is None


async def test_cancel_a_running_batch(sdk: openai.AsyncOpenAI, client: httpx.AsyncClient) -> None:
    lines = [chat_line(f"long-{i}", max_tokens=2000, ignore_eos=True) for i in range(8)]
    upload = await sdk.files.create(file=("long.jsonl", jsonl(*lines)), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def read_metrics() -> str:
        return (await client.get("/metrics")).text

    engine = client.app.state.services.engine  # type: ignore[attr-defined]
    async with asyncio.timeout(30):  # running: in_progress, and its lines in the engine (a
        # cancel that came before any line reached its route left no 499 to see, on CI once)
        while (await sdk.batches.retrieve(batch.id)).status != "in_progress":
            await asyncio.sleep(0.02)
        while engine.num_running == 0:
            await asyncio.sleep(0.02)
    cancelled = await sdk.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    assert (await sdk.batches.cancel(batch.id)).status == "cancelled"  # again: the same
    async with asyncio.timeout(10):  # its running requests were aborted
        while engine.num_running or engine.num_queued:
            await asyncio.sleep(0.02)
    ids = [b.id async for b in sdk.batches.list(limit=100)]
    assert batch.id in ids
    after = await sdk.batches.retrieve(batch.id)  # the stopped work wrote nothing after it
    assert after.status == "cancelled" and after.output_file_id is None  # none had finished
    # its aborted lines are requests the caller gave up on (499), not server errors (each
    # counted as its route's call ends, which may come just after the engine is idle)
    async with asyncio.timeout(10):
        line = 'vlm_internal_requests_total{route="/v1/chat/completions",status="499"}'
        while line not in (metrics := await read_metrics()):
            await asyncio.sleep(0.02)
    assert 'route="/v1/chat/completions",status="500"' not in metrics
    # an ended batch cannot be cancelled
    done = await sdk.batches.create(
        input_file_id=(
            await sdk.files.create(file=("a.jsonl", jsonl(chat_line("a"))), purpose="batch")
        ).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    await finished(sdk, done.id)
    with pytest.raises(openai.ConflictError):
        await sdk.batches.cancel(done.id)


async def test_files_list_retrieve_delete(sdk: openai.AsyncOpenAI) -> None:
    upload = await sdk.files.create(file=("list.jsonl", jsonl(chat_line("a"))), purpose="batch")
    assert (await sdk.files.retrieve(upload.id)).bytes == upload.bytes
    listed = [f.id async for f in sdk.files.list(purpose="batch")]
    assert upload.id in listed
    assert (await sdk.files.content(upload.id)).text.startswith('{"custom_id": "a"')
    deleted = await sdk.files.delete(upload.id)
    assert deleted.deleted and deleted.id == upload.id
    with pytest.raises(openai.NotFoundError):
        await sdk.files.retrieve(upload.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )


async def test_refusals(sdk: openai.AsyncOpenAI, client: httpx.AsyncClient) -> None:
    upload = await sdk.files.create(file=("r.jsonl", jsonl(chat_line("a"))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as purpose:
        await sdk.files.create(file=("r.jsonl", jsonl(chat_line("a"))), purpose="assistants")
    assert purpose.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        await sdk.files.create(file=("empty.jsonl", io.BytesIO(b"")), purpose="batch")
    headers = {"Authorization": f"Bearer {KEY}"}
    for bad, param in [
        ({"completion_window": "1h"}, "completion_window"),
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        # (taken in OpenAI's range: the output is kept as the job retention keeps it)
        ({"output_expires_after": {"anchor": "created_at", "seconds": 60}}, "output_expires_after"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ]:
        body = {
            "input_file_id": upload.id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            **bad,
        }
        response = await client.post("/v1/batches", json=body, headers=headers)
        assert response.status_code == 400, (bad, response.text)
        if param is not None:
            assert param in (response.json()["error"]["param"] or ""), response.text
    with pytest.raises(openai.NotFoundError):
        await sdk.batches.retrieve("batch_nope")
    # batches are not media jobs, and media jobs are not batches
    batch = await sdk.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 3600},
    )
    response = await client.get("/v2/media/jobs", headers=headers)
    assert response.status_code == 200
    assert all(not job["id"].startswith("batch_") for job in response.json()["data"])
    response = await client.get(f"/v2/media/status/{batch.id}", headers=headers)
    assert response.status_code == 404
    await finished(sdk, batch.id)


async def test_a_page_elsewhere_cannot_upload(client: httpx.AsyncClient, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """A cross-site form may post multipart with no preflight: a browser's upload is taken only
    from an origin --allowed-origins lists."""
    files = {"file": ("x.jsonl", jsonl(chat_line("a")))}
    auth = {"Authorization": f"Bearer {KEY}"}
    page = {**auth, "Origin": "https://evil.example"}
    response = await client.post("/v1/files", files=files, data={"purpose": "batch"}, headers=page)
    assert response.status_code == 400, response.text
    # whatever the content type says (browsers compare it without case)
    request = client.build_request(
        "POST",
        "/v1/files",
        files={"file": ("x.jsonl", jsonl(chat_line("a")))},
        data={"purpose": "batch"},
        headers=page,
    )
    request.headers["Content-Type"] = request.headers["Content-Type"].replace(
        "multipart/form-data", "Multipart/Form-Data"
    )
    assert (await client.send(request)).status_code == 400
    settings = make_settings(tiny_model_dir, allowed_origins=["https://app.example"])
    async for allowed in start_client(settings):
        files = {"file": ("x.jsonl", jsonl(chat_line("a")))}
        headers = {"Origin": "https://app.example"}
        response = await allowed.post(
            "/v1/files", files=files, data={"purpose": "batch"}, headers=headers
        )
        assert response.status_code == 200, response.text


async def test_a_crashing_line_fails_alone(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A route that raises (a bug) answers that line a 500; the others are answered."""
    chat = client.app.state.services.chat  # type: ignore[attr-defined]
    complete = chat.complete

    async def sometimes_crashing(request):  # type: ignore[no-untyped-def]
        if "crash" in str(request.messages):
            raise RuntimeError("a bug")
        return await complete(request)

    monkeypatch.setattr(chat, "complete", sometimes_crashing)
    lines = [chat_line("ok-1"), chat_line("bug", "crash now"), chat_line("ok-2")]
    upload = await sdk.files.create(file=("c.jsonl", jsonl(*lines)), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = await finished(sdk, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
    (error,) = await lines_of(sdk, batch.error_file_id)
    assert (error["custom_id"], error["response"]["status_code"]) == ("bug", 500)


async def test_lines_end_at_newlines_only(sdk: openai.AsyncOpenAI) -> None:
    """JSON text may hold U+2028 and U+0085 (where str.splitlines cuts), a file may start with
    a byte-order mark and end its lines with CRLF; each answer is one ASCII line."""
    text = "Line\u2028separator\u0085next \u00e9"
    raw = "\ufeff" + json.dumps(chat_line("a", text), ensure_ascii=False) + "\r\n"
    raw += json.dumps(chat_line("b"), ensure_ascii=False) + "\r\n"
    upload = await sdk.files.create(file=("u.jsonl", io.BytesIO(raw.encode())), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = await finished(sdk, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 2, batch
    content = (await sdk.files.content(batch.output_file_id)).content  # type: ignore[arg-type]
    assert content.isascii() and len(content.splitlines()) == 2


async def test_lines_run_at_the_job_priority(
    tiny_model_dir, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Under --scheduling-policy priority a line runs at --job-priority unless it names one."""
    settings = make_settings(tiny_model_dir, scheduling_policy="priority", job_priority=7)
    seen: dict[str, int] = {}
    async for client in start_client(settings):
        record_priorities(client.app.state.services.chat, seen, monkeypatch)  # type: ignore[attr-defined]
        sdk = openai.AsyncOpenAI(
            base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0
        )
        lines = [chat_line("a", "first"), chat_line("b", "second", priority=-1)]
        upload = await sdk.files.create(file=("p.jsonl", jsonl(*lines)), purpose="batch")
        batch = await sdk.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch = await finished(sdk, batch.id)
        assert batch.request_counts.completed == 2, batch
    assert seen == {"first": 7, "second": -1}


def record_priorities(chat, seen: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The priority each request runs at, by the word its message holds."""
    complete = chat.complete

    async def recording(request):  # type: ignore[no-untyped-def]
        word = "first" if "first" in str(request.messages) else "second"
        seen[word] = request.sampling.priority
        return await complete(request)

    monkeypatch.setattr(chat, "complete", recording)


async def test_a_cancelled_batch_keeps_what_it_had_answered(sdk: openai.AsyncOpenAI) -> None:
    lines = [
        chat_line("quick"),
        *(chat_line(f"long-{i}", max_tokens=2000, ignore_eos=True) for i in range(3)),
    ]
    upload = await sdk.files.create(file=("mixed.jsonl", jsonl(*lines)), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    async with asyncio.timeout(30):  # the quick answer is saved (the counts with it)
        while (await sdk.batches.retrieve(batch.id)).request_counts.completed < 1:
            await asyncio.sleep(0.02)
    await asyncio.sleep(1.5)  # (answers are saved a few times a second)
    cancelled = await sdk.batches.cancel(batch.id)
    assert cancelled.status == "cancelled"
    (kept,) = await lines_of(sdk, cancelled.output_file_id)
    assert kept["custom_id"] == "quick" and kept["response"]["status_code"] == 200
    # its usage: at least what the kept answer used (as saved with the counts)
    assert cancelled.usage is not None
    assert cancelled.usage.output_tokens >= kept["response"]["body"]["usage"]["completion_tokens"]


async def test_a_batch_taken_over_goes_on_from_its_saved_answers(
    tmp_path,  # type: ignore[no-untyped-def]
    client: httpx.AsyncClient,
) -> None:
    """Its replica died after two answers were saved: the next attempt sends only the other
    lines (to the app's own routes, as a replica does), and the output holds all four, in
    input order."""
    from server.jobs.sqlite import SqliteJobStore
    from server.pipelines.batch import BatchRunner, asgi_dispatch

    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    lines = [chat_line(f"l{i}", f"line {i}") for i in range(4)]
    upload = store.add_file("batch", "in.jsonl", jsonl(*lines).getvalue(), project="")
    request = {
        "input_file_id": upload.id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    store.create("batch", request, None, "batch_", request)
    first = store.claim(60, "gone", ("batch",))
    assert first is not None

    def answer(index: int) -> str:
        body = {"object": "chat.completion", "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
        response = {"status_code": 200, "request_id": f"r{index}", "body": body}
        return json.dumps({"id": f"r{index}", "custom_id": f"l{index}", "response": response})

    assert store.save_answers(first.id, first.attempt, [(0, 200, answer(0)), (2, 200, answer(2))])
    store.expire_leases("gone")
    second = store.claim(60, "here", ("batch",))
    assert second is not None and second.attempt == 2
    sent = []
    to_the_app = asgi_dispatch(client)

    async def dispatch(url: str, body: dict, request_id: str) -> tuple[int, dict]:
        sent.append(body["messages"][0]["content"])
        return await to_the_app(url, body, request_id)

    result = await BatchRunner(store, dispatch, concurrency=2)(second, lambda fraction: None)
    assert sorted(sent) == ["line 1", "line 3"]
    assert result["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert store.complete(second, result)
    done = store.get(second.id)
    assert done is not None and done.result is not None
    content = store.file_content(done.result["output_file_id"], project="")
    assert content is not None
    answers = [json.loads(line) for line in content.decode().splitlines()]
    assert [answer["custom_id"] for answer in answers] == ["l0", "l1", "l2", "l3"]
    answered = [answer["response"]["body"]["usage"]["completion_tokens"] for answer in answers]
    assert answered[0] == answered[2] == 2 and 1 <= answered[1] <= 4  # (saved; new: max 4)
    assert result["usage"]["output_tokens"] == sum(answered)
    assert store.answers(second.id) == []  # turned into the files
