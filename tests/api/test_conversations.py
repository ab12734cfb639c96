"""OpenAI's Conversations API through the openai SDK: a conversation's metadata and items
(create, list in both orders and by page, read, delete), and responses made in it: each reads
the conversation's items as its history (the same prompt as the conversation sent whole) and
adds its input and output items, streamed or in the background too."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from server.config import Settings
from server.pipelines import conversation_lock
from tests.api.test_errors import assert_error
from tests.api.test_responses_store import GREEDY, sdk_for, until_ended
from tests.helpers import make_settings, start_client

pytestmark = pytest.mark.anyio


@pytest.fixture
def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return sdk_for(client)


def user(text: str) -> dict:
    return {"type": "message", "role": "user", "content": text}


async def test_a_conversation_and_its_items(sdk: openai.AsyncOpenAI) -> None:
    made = await sdk.conversations.create(
        metadata={"topic": "cats"}, items=[user("One"), user("Two")]
    )
    assert made.object == "conversation" and made.id.startswith("conv_")
    assert (await sdk.conversations.retrieve(made.id)).metadata == {"topic": "cats"}
    updated = await sdk.conversations.update(made.id, metadata={"topic": "dogs"})
    assert updated.metadata == {"topic": "dogs"}
    added = await sdk.conversations.items.create(made.id, items=[user("Three")])
    assert [item.id for item in added.data][0].startswith("msg_")
    newest_first = await sdk.conversations.items.list(made.id)
    texts = [item.content[0].text for item in newest_first.data]  # type: ignore[union-attr]
    assert texts == ["Three", "Two", "One"]
    page = await sdk.conversations.items.list(made.id, order="asc", limit=2)
    assert [item.content[0].text for item in page.data] == ["One", "Two"]  # type: ignore[union-attr]
    assert page.has_more
    everything = [item.id async for item in sdk.conversations.items.list(made.id, limit=1)]
    assert everything == [item.id for item in newest_first.data]  # the SDK pages by `after`
    one = await sdk.conversations.items.retrieve(page.data[1].id, conversation_id=made.id)
    assert one.id == page.data[1].id
    after_delete = await sdk.conversations.items.delete(one.id, conversation_id=made.id)
    assert after_delete.id == made.id
    with pytest.raises(openai.NotFoundError) as gone:
        await sdk.conversations.items.retrieve(one.id, conversation_id=made.id)
    assert gone.value.body["code"] == "item_not_found"  # type: ignore[index]
    deleted = await sdk.conversations.delete(made.id)
    assert deleted.deleted and deleted.object == "conversation.deleted"
    for call in (
        sdk.conversations.retrieve(made.id),
        sdk.conversations.items.list(made.id),
        sdk.conversations.items.create(made.id, items=[user("x")]),
        sdk.conversations.delete(made.id),
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            await call
        assert missing.value.body["code"] == "conversation_not_found"  # type: ignore[index]


async def test_responses_in_a_conversation_read_and_add_its_items(
    sdk: openai.AsyncOpenAI,
) -> None:
    conversation = await sdk.conversations.create(items=[user("My name is Ada.")])
    first = await sdk.responses.create(
        conversation=conversation.id, input="What is my name?", **GREEDY
    )
    assert first.conversation is not None and first.conversation.id == conversation.id
    whole = await sdk.responses.create(
        input=[user("My name is Ada."), user("What is my name?")], store=False, **GREEDY
    )
    assert first.usage is not None and whole.usage is not None
    assert first.usage.input_tokens == whole.usage.input_tokens
    assert first.output_text == whole.output_text
    items = await sdk.conversations.items.list(conversation.id, order="asc", limit=100)
    output_ids = [item.id for item in first.output]
    assert [item.id for item in items.data][2:] == output_ids  # its input, then its output
    assert items.data[1].content[0].text == "What is my name?"  # type: ignore[union-attr]
    own = (await sdk.responses.input_items.list(first.id)).data[0]
    assert own.id == items.data[1].id  # one item, one id, wherever it is listed
    # Streamed (that its items are in before its last event is checked on the wrapper).
    async with sdk.responses.stream(
        conversation={"id": conversation.id}, input="And now?", **GREEDY
    ) as stream:
        ends = [e async for e in stream if e.type in ("response.completed", "response.incomplete")]
    assert len(ends) == 1
    listed = await sdk.conversations.items.list(conversation.id, limit=1)
    assert listed.data[0].id == ends[0].response.output[-1].id  # type: ignore[union-attr]
    # In the background: its items are in once it has ended.
    queued = await sdk.responses.create(
        conversation=conversation.id, input="Last?", background=True, **GREEDY
    )
    ended = await until_ended(sdk, queued.id)
    listed = await sdk.conversations.items.list(conversation.id, limit=1)
    assert listed.data[0].id == ended.output[-1].id
    counted = await sdk.conversations.items.list(conversation.id, limit=100)
    inputs = [i for i in counted.data if i.type == "message" and i.role == "user"]  # type: ignore[union-attr]
    assert len(inputs) == 4


async def test_what_a_conversation_cannot_take_is_a_4xx(
    client: httpx.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    conversation = await sdk.conversations.create()
    previous = await sdk.responses.create(input="Hi", **GREEDY)
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 2}
    for extra, status, param in (
        ({"conversation": conversation.id, "previous_response_id": previous.id}, 400, None),
        # both: the 400, before a missing one is looked up (it was the conversation's 404)
        ({"conversation": "conv_nope", "previous_response_id": "resp_nope"}, 400, "conversation"),
        ({"conversation": "conv_nope"}, 404, "conversation"),
        ({"conversation": {"id": "conv_nope"}}, 404, "conversation"),
        ({"conversation": {"nope": 1}}, 400, None),
        ({"conversation": "nope"}, 400, "conversation"),  # not an id (OpenAI's 400)
        ({"previous_response_id": "nope"}, 400, "previous_response_id"),
    ):
        response = await client.post("/v1/responses", json={**body, **extra})
        assert_error(response, status, param)
    too_many = {f"k{n}": "v" for n in range(17)}
    for path, request, param in (
        ("/v1/conversations", {"metadata": too_many}, "metadata"),
        ("/v1/conversations", {"items": [user("x")] * 21}, "items"),
        ("/v1/conversations", {"items": [{"type": "item_reference", "id": "msg_1"}]}, "items[0]"),
        (f"/v1/conversations/{conversation.id}/items", {"items": []}, "items"),
        (f"/v1/conversations/{conversation.id}", {"metadata": too_many}, "metadata"),
    ):
        assert_error(await client.post(path, json=request), 400, param)
    response = await client.get(f"/v1/conversations/{conversation.id}/items?after=msg_nope")
    assert_error(response, 400, "after")
    # Items a response could not read are refused before they are in, naming the item as
    # the request has it (its id is not known yet).
    orphan = {"type": "function_call_output", "call_id": "c1", "output": "x"}
    for path in ("/v1/conversations", f"/v1/conversations/{conversation.id}/items"):
        error = assert_error(await client.post(path, json={"items": [orphan]}), 400, "items[0]")
        assert "'c1'" in error["message"] and "items[0]" in error["message"]
    video = {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}
    in_system = {"type": "message", "role": "system", "content": [video]}
    error = assert_error(
        await client.post("/v1/conversations", json={"items": [user("x"), in_system]}),
        400,
        "items[1]",
    )
    assert "system message" in error["message"] and "items[1]" in error["message"]
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    assert (await client.post("/v1/conversations", json={"items": [call, orphan]})).is_success
    reasoning_only = {"items": [{"type": "reasoning", "summary": []}]}
    assert (await client.post("/v1/conversations", json=reasoning_only)).is_success
    # (a URL is fetched when a response runs; here only checked as written: an allowed host)
    image = {"type": "input_image", "image_url": "http://127.0.0.1:9/a.png"}
    limit = Settings.model_fields["max_images_per_request"].default
    crowded = {"items": [{"role": "user", "content": [image] * (limit + 1)}]}  # past a request's
    error = assert_error(await client.post("/v1/conversations", json=crowded), 400, "items")
    assert error["code"] == "too_many_images"
    # counted per request that adds them: a screenshot loop's conversation grows past it (a
    # response with truncation "auto" leaves the oldest out)
    grown = (await client.post("/v1/conversations", json={"items": [user("go")]})).json()
    one_more = {"items": [{"role": "user", "content": [image]}]}
    for _ in range(limit + 1):
        added = await client.post(f"/v1/conversations/{grown['id']}/items", json=one_more)
        assert added.status_code == 200, added.text
    crowd_path = f"/v1/conversations/{grown['id']}/items"
    assert_error(await client.post(crowd_path, json=crowded), 400, "items")
    # Images that need no download (inline, uploaded) are read before the item is in.
    for unreadable_image in (
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
        {"type": "input_image", "image_url": "data:image/png;base64,@@@"},
        {"type": "input_image", "file_id": "file-nope"},
    ):
        items = {"items": [{"role": "user", "content": [unreadable_image]}]}
        for path in ("/v1/conversations", f"/v1/conversations/{conversation.id}/items"):
            error = assert_error(await client.post(path, json=items), 400, "items[0]")
            assert "items[0]" in error["message"], error
    # An item that breaks only when read (an image whose URL cannot be fetched) is named too.
    bad = {
        "role": "user",
        "content": [{"type": "input_image", "image_url": "http://127.0.0.1:9/a.png"}],
    }
    broken = await sdk.conversations.create(items=[bad])
    with pytest.raises(openai.BadRequestError) as unreadable:
        await sdk.responses.create(conversation=broken.id, **GREEDY)  # (no input needed)
    assert unreadable.value.body["param"] == "conversation"  # type: ignore[index]
    listed = await sdk.conversations.items.list(broken.id)
    assert f"conversation item {listed.data[0].id}" in unreadable.value.body["message"]  # type: ignore[index]
    queued = await sdk.responses.create(
        conversation=broken.id, input="and?", background=True, **GREEDY
    )  # (in the background: the same words)
    failed = await until_ended(sdk, queued.id)
    assert (
        failed.error is not None
        and f"conversation item {listed.data[0].id}" in failed.error.message
    )


async def test_a_background_run_that_breaks_leaves_its_response_failed(
    client: httpx.AsyncClient, sdk: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background run that fails for another reason than its request's answer (here the
    store cannot read the conversation when the job runs) ends failed, never stuck running."""
    services = client.app.state.services  # type: ignore[attr-defined]
    conversation = await sdk.conversations.create()
    await services.job_worker.stop()  # (queued until the store is broken)
    try:
        queued = await sdk.responses.create(
            conversation=conversation.id, input="Hi", background=True, **GREEDY
        )

        def broken(conversation_id: str, project: str) -> None:
            raise RuntimeError("the store broke")

        monkeypatch.setattr(services.jobs, "conversation_items", broken)
    finally:
        services.job_worker.start()
    failed = await until_ended(sdk, queued.id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "server_error"


async def test_a_cancel_wins_over_a_background_answer_in_a_conversation(
    tiny_model_dir: Path,
) -> None:
    """With no worker running, background responses stay queued: one cancelled adds nothing
    to its conversation when a worker comes (a restart); one whose job ended without writing
    its answer (a store outage at its end) reads as failed."""
    settings = make_settings(tiny_model_dir)
    async for client in start_client(settings):
        services = client.app.state.services  # type: ignore[attr-defined]
        await services.job_worker.stop()
        sdk = sdk_for(client)
        conversation = await sdk.conversations.create(items=[user("Hi")])
        cancelled = await sdk.responses.create(
            conversation=conversation.id, input="A", background=True, **GREEDY
        )
        answered = await sdk.responses.create(
            conversation=conversation.id, input="B", background=True, **GREEDY
        )
        lost = await sdk.responses.create(input="C", background=True, **GREEDY)
        assert (await sdk.responses.cancel(cancelled.id)).status == "cancelled"
        services.jobs.cancel(lost.id)  # its job ended, its response still says queued
        gone = await sdk.responses.retrieve(lost.id)
        assert gone.status == "failed" and gone.error is not None
    async for client in start_client(settings):
        sdk = sdk_for(client)
        done = await until_ended(sdk, answered.id)
        assert done.status in ("completed", "incomplete")
        assert (await sdk.responses.retrieve(cancelled.id)).status == "cancelled"
        items = await sdk.conversations.items.list(conversation.id, order="asc", limit=100)
        texts = [i.content[0].text for i in items.data if i.type == "message" and i.role == "user"]  # type: ignore[union-attr]
        assert texts == ["Hi", "B"]  # the cancelled one's input is not in, nor twice B's
        assert items.data[-1].id == done.output[-1].id


async def test_turns_at_once_in_one_conversation_take_it_in_turn(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Responses sent at once to one conversation each read the history with the turns that
    ended before it (one at a time, as OpenAI's lock makes them); one that finds the
    conversation held past a short wait is OpenAI's 400 conversation_locked; a background
    response waits its turn, queued."""
    conversation = await sdk.conversations.create()
    turns = await asyncio.gather(
        *[
            sdk.responses.create(conversation=conversation.id, input=f"Turn {n}.", **GREEDY)
            for n in range(3)
        ]
    )
    seen = sorted(turn.usage.input_tokens for turn in turns)  # type: ignore[union-attr]
    assert seen[0] < seen[1] < seen[2]  # each saw the turns before it
    items = (await sdk.conversations.items.list(conversation.id, order="asc", limit=100)).data
    by_tokens = sorted(turns, key=lambda turn: turn.usage.input_tokens)  # type: ignore[union-attr]
    assert [item.id for item in items if item.type != "message" or item.role != "user"] == [
        item.id for turn in by_tokens for item in turn.output
    ]
    store = client.app.state.services.jobs  # type: ignore[attr-defined]
    assert store.lock_conversation(conversation.id, "", "resp_elsewhere", lease_s=60)
    monkeypatch.setattr(conversation_lock, "WAIT_S", 0.2)  # (read when a turn waits)
    for stream in (False, True):
        body = {"conversation": conversation.id, "input": "Now?", "stream": stream, **GREEDY}
        response = await client.post("/v1/responses", json=body)
        error = assert_error(response, 400, "conversation")
        assert error["code"] == "conversation_locked"
    # items added by hand would land inside the running turn: refused the same way
    response = await client.post(
        f"/v1/conversations/{conversation.id}/items", json={"items": [user("x")]}
    )
    assert assert_error(response, 400, "conversation_id")["code"] == "conversation_locked"
    queued = await sdk.responses.create(
        conversation=conversation.id, input="Later.", background=True, **GREEDY
    )
    await asyncio.sleep(0.5)
    assert (await sdk.responses.retrieve(queued.id)).status == "queued"
    await asyncio.to_thread(store.unlock_conversation, conversation.id, "resp_elsewhere")
    ended = await until_ended(sdk, queued.id)
    assert ended.status in ("completed", "incomplete")  # (answered; max_output_tokens 4)
    listed = await sdk.conversations.items.list(conversation.id, limit=1)
    assert listed.data[0].id == ended.output[-1].id
    after = await sdk.responses.create(conversation=conversation.id, input="Free?", **GREEDY)
    assert after.usage.input_tokens > ended.usage.input_tokens  # type: ignore[union-attr]


async def test_a_batchs_lines_in_one_conversation_wait_their_turn(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's own requests (a batch's lines) queue for a conversation's turn without the
    2 s limit: a line is not failed because another turn ran long."""
    from tests.api.test_batches import finished, jsonl

    conversation = await sdk.conversations.create()
    store = client.app.state.services.jobs  # type: ignore[attr-defined]
    assert store.lock_conversation(conversation.id, "", "resp_elsewhere", lease_s=60)
    monkeypatch.setattr(conversation_lock, "WAIT_S", 0.1)
    lines = [
        {
            "custom_id": f"l{n}",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"conversation": conversation.id, "input": f"Turn {n}.", **GREEDY},
        }
        for n in range(3)
    ]
    upload = await sdk.files.create(file=("c.jsonl", jsonl(*lines)), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h"
    )
    await asyncio.sleep(1.0)  # (longer than a request's wait)
    await asyncio.to_thread(store.unlock_conversation, conversation.id, "resp_elsewhere")
    done = await finished(sdk, batch.id)
    assert done.request_counts.completed == 3, done  # type: ignore[attr-defined]
    items = (await sdk.conversations.items.list(conversation.id, limit=100)).data
    assert len([i for i in items if i.type == "message" and i.role == "user"]) == 3  # type: ignore[union-attr]
