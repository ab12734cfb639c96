"""Stored responses (the Responses API's `store`, on by default as OpenAI's): a conversation
continued with previous_response_id is the conversation sent whole (same prompt tokens, same
greedy answer, the earlier instructions left out); function calls answered in the next turn;
streamed answers stored before their last event; GET, input_items, DELETE; store: false and
--no-store-responses keep nothing; stored responses outlive the server process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from openai.types.responses import Response

from server.api import response_events
from server.api.response_events import followed
from server.api.responses import ResponseObject, ResponsesRequest
from server.api.routes.responses import recorded_as_it_ends
from server.api.sse import EventStream
from server.api.translated import shorten
from server.engine.sampling import SamplingParams
from server.jobs import responses as response_store
from server.jobs.sqlite import SqliteJobStore
from server.pipelines.loopback import post_scope
from tests.api.test_responses import WEATHER, image_input
from tests.helpers import data_uri, make_image, make_settings, serve_in_thread, start_client

pytestmark = pytest.mark.anyio
GREEDY = {"model": "tiny", "max_output_tokens": 4, "temperature": 0}


def sdk_for(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key="-", http_client=client, max_retries=0
    )


@pytest.fixture
def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return sdk_for(client)


async def test_a_continued_conversation_is_the_conversation_sent_whole(
    sdk: openai.AsyncOpenAI,
) -> None:
    first_input = image_input("Who is in this picture?")
    first = await sdk.responses.create(instructions="Be brief.", input=first_input, **GREEDY)
    assert first.store is True and first.previous_response_id is None
    second = await sdk.responses.create(
        previous_response_id=first.id, input="And what is behind them?", **GREEDY
    )
    assert second.previous_response_id == first.id
    # The same conversation sent whole, without the first request's instructions (they are
    # not carried over, as OpenAI's are not), and not stored.
    history = [*first_input, *(item.model_dump() for item in first.output)]
    whole = await sdk.responses.create(
        input=[*history, {"role": "user", "content": "And what is behind them?"}],
        store=False,
        **GREEDY,
    )
    assert second.usage is not None and whole.usage is not None
    assert second.usage.input_tokens == whole.usage.input_tokens
    assert second.output_text == whole.output_text
    counted = await sdk.responses.input_tokens.count(
        previous_response_id=first.id, input="And what is behind them?"
    )
    assert counted.input_tokens == second.usage.input_tokens
    third = await sdk.responses.create(previous_response_id=second.id, input="Why?", **GREEDY)
    assert third.usage is not None and third.usage.input_tokens > second.usage.input_tokens
    # input_items: what the second answer was made from, newest first (its own input, then
    # the first turn's output and input).
    listed = await sdk.responses.input_items.list(second.id, limit=100)
    first_items = [item.id for item in first.output]
    assert [item.id for item in listed.data][1 : 1 + len(first_items)] == first_items[::-1]
    assert listed.data[0].type == "message" and listed.data[0].role == "user"  # type: ignore[union-attr]
    assert len(listed.data) == 1 + len(first_items) + 1
    # A branch from the first answer sees only the first turn.
    branch = await sdk.responses.create(
        previous_response_id=first.id, input="And what is behind them?", **GREEDY
    )
    assert branch.usage is not None and branch.usage.input_tokens == second.usage.input_tokens


async def test_a_function_call_is_answered_in_the_next_turn(sdk: openai.AsyncOpenAI) -> None:
    called = await sdk.responses.create(
        input="Weather in Oslo?",
        tools=[WEATHER],
        tool_choice="required",
        **GREEDY | {"max_output_tokens": 200},
    )
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls, called.output
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}
    answered = await sdk.responses.create(
        previous_response_id=called.id, input=[result], tools=[WEATHER], **GREEDY
    )
    assert answered.status in ("completed", "incomplete")
    with pytest.raises(openai.BadRequestError) as unknown:  # without the call before it
        await sdk.responses.create(input=[result], **GREEDY)
    assert unknown.value.body["param"] == "input[0].call_id"
    with pytest.raises(openai.BadRequestError) as unanswered:  # the call left unanswered
        await sdk.responses.create(previous_response_id=called.id, input="And?", **GREEDY)
    assert unanswered.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert (
        f"No tool output found for function call {calls[0].call_id}"
        in (
            unanswered.value.body["message"]  # type: ignore[index]
        )
    )


async def test_an_item_reference_is_the_stored_item_it_names(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    """As the Vercel AI SDK sends a stored answer back (store on): the item by id. The same
    prompt as the item sent whole, streamed and in the background alike; one that names no
    stored item is a 404 naming where it is."""
    first = await sdk.responses.create(input="Name a colour.", **GREEDY)
    (message,) = first.output
    turn = [{"role": "user", "content": "Name a colour."}]
    follow_up = {"role": "user", "content": "Another?"}
    sent_whole = await sdk.responses.create(
        input=[*turn, message.model_dump(), follow_up], store=False, **GREEDY
    )
    by_reference = await sdk.responses.create(
        input=[*turn, {"type": "item_reference", "id": message.id}, follow_up], **GREEDY
    )
    short_form = await sdk.responses.create(input=[*turn, {"id": message.id}, follow_up], **GREEDY)
    for answer in (by_reference, short_form):
        assert answer.usage is not None and sent_whole.usage is not None
        assert answer.usage.input_tokens == sent_whole.usage.input_tokens
        assert answer.output_text == sent_whole.output_text
    counted = await sdk.responses.input_tokens.count(
        input=[*turn, {"type": "item_reference", "id": message.id}, follow_up]  # type: ignore[list-item]
    )
    assert sent_whole.usage is not None
    assert counted.input_tokens == sent_whole.usage.input_tokens
    # an input item of a stored response is one too; a stored list shows the item itself
    (asked,) = (await sdk.responses.input_items.list(first.id)).data
    listed = await sdk.responses.input_items.list(by_reference.id)
    assert [item.type for item in listed.data] == ["message"] * 3
    streamed = await client.post(
        "/v1/responses",
        json={**GREEDY, "stream": True, "input": [{"id": asked.id}, {"id": message.id}]},
    )
    assert streamed.status_code == 200 and "event: response.incomplete" in streamed.text
    background = await sdk.responses.create(
        input=[*turn, {"id": message.id}, follow_up], background=True, **GREEDY
    )
    while background.status in ("queued", "in_progress"):
        await asyncio.sleep(0.05)
        background = await sdk.responses.retrieve(background.id)
    assert background.output_text == sent_whole.output_text
    # its answer's items are its own (the run's request answered as the stored response)
    (answer,) = background.output
    again = await sdk.responses.create(input=[*turn, {"id": answer.id}], **GREEDY)
    assert again.status in ("completed", "incomplete")
    for unknown in (
        "msg_1",
        message.id[:-1] + "0" if message.id[-1] != "0" else message.id[:-1] + "1",
    ):
        reply = await client.post(
            "/v1/responses",
            json={**GREEDY, "input": [*turn, {"type": "item_reference", "id": unknown}]},
        )
        assert reply.status_code == 404, reply.text
        assert reply.json()["error"]["code"] == "item_not_found"
        assert reply.json()["error"]["param"] == "input[1]"
    await sdk.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.create(input=[{"id": message.id}], **GREEDY)


async def test_a_stored_response_reads_back_and_is_deleted(sdk: openai.AsyncOpenAI) -> None:
    first = await sdk.responses.create(
        input=[
            {"role": "user", "content": "One"},
            {"role": "user", "content": [{"type": "input_text", "text": "Two"}]},
            {"role": "user", "content": "Three"},
        ],
        metadata={"topic": "counting"},
        **GREEDY,
    )
    again = await sdk.responses.retrieve(first.id)
    assert again.model_dump() == first.model_dump()
    items = await sdk.responses.input_items.list(first.id)
    assert [item.type for item in items.data] == ["message"] * 3
    texts = [item.content[0].text for item in items.data]  # type: ignore[union-attr]
    assert texts == ["Three", "Two", "One"]  # newest first, as OpenAI's
    assert all(item.id.startswith("msg_") for item in items.data)
    page = await sdk.responses.input_items.list(first.id, order="asc", limit=2)
    assert [item.content[0].text for item in page.data] == ["One", "Two"]  # type: ignore[union-attr]
    assert page.has_more and page.last_id == page.data[-1].id
    rest = await sdk.responses.input_items.list(first.id, order="asc", after=page.last_id)
    assert [item.content[0].text for item in rest.data] == ["Three"]  # type: ignore[union-attr]
    assert not rest.has_more
    with pytest.raises(openai.BadRequestError):  # only a background response can be
        await sdk.responses.cancel(first.id)
    second = await sdk.responses.create(previous_response_id=first.id, input="Four", **GREEDY)
    await sdk.responses.delete(first.id)
    for call in (sdk.responses.retrieve(first.id), sdk.responses.delete(first.id)):
        with pytest.raises(openai.NotFoundError) as gone:
            await call
        assert gone.value.body["code"] == "response_not_found"
    # The conversation after it can no longer be continued: its first turn is gone.
    with pytest.raises(openai.NotFoundError) as broken:
        await sdk.responses.create(previous_response_id=second.id, input="Five", **GREEDY)
    assert broken.value.body["code"] == "previous_response_not_found"
    assert first.id in broken.value.body["message"]


async def test_store_false_keeps_nothing(sdk: openai.AsyncOpenAI) -> None:
    kept_not = await sdk.responses.create(input="Hi", store=False, **GREEDY)
    assert kept_not.store is False
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(kept_not.id)
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.responses.create(previous_response_id=kept_not.id, input="Hi", **GREEDY)
    assert missing.value.body["param"] == "previous_response_id"


async def test_a_streamed_answer_is_stored_before_its_last_event(
    sdk: openai.AsyncOpenAI,
) -> None:
    final = None
    async with sdk.responses.stream(input="Tell me a story", **GREEDY) as stream:
        async for event in stream:
            if event.type in ("response.completed", "response.incomplete"):
                # The client continues at once: the stored response is already there.
                final = event.response
                stored = await sdk.responses.retrieve(final.id)
                assert stored.output_text == final.output_text
                assert stored.status == final.status and final.store is True
    assert final is not None
    follow = await sdk.responses.create(previous_response_id=final.id, input="More", **GREEDY)
    assert follow.previous_response_id == final.id


async def test_an_answer_the_store_cannot_take_still_goes_out(
    client: httpx.AsyncClient, sdk: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = client.app.state.services.jobs  # type: ignore[attr-defined]

    def store_down(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(jobs, "save_response", store_down)
    answer = await sdk.responses.create(input="Hi", **GREEDY)
    assert answer.store is False and answer.output_text is not None
    async with sdk.responses.stream(input="Hi", **GREEDY) as stream:
        ends = [e async for e in stream if e.type in ("response.completed", "response.incomplete")]
    assert [end.response.store for end in ends] == [False]  # type: ignore[union-attr]


async def test_no_store_responses_keeps_no_responses_nor_conversations(
    tiny_model_dir: Path,
) -> None:
    settings = make_settings(tiny_model_dir, store_responses=False)
    async for client in start_client(settings):
        sdk = sdk_for(client)
        answer = await sdk.responses.create(input="Hi", **GREEDY)
        assert answer.store is False
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(answer.id)
        for call in (
            sdk.responses.create(previous_response_id=answer.id, input="Hi", **GREEDY),
            sdk.conversations.create(),  # nor conversations
            sdk.responses.create(conversation="conv_x", input="Hi", **GREEDY),
            sdk.responses.create(input=[{"type": "item_reference", "id": "msg_1"}], **GREEDY),
        ):
            with pytest.raises(openai.BadRequestError) as refused:
                await call
            assert refused.value.body["code"] == "unsupported_parameter"  # type: ignore[index]


async def test_stored_responses_outlive_the_server(tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir)
    async for client in start_client(settings):
        first = await sdk_for(client).responses.create(input="Remember 7.", **GREEDY)
    async for client in start_client(settings):  # the same data dir, a new process's app
        sdk = sdk_for(client)
        assert (await sdk.responses.retrieve(first.id)).output_text == first.output_text
        again = await sdk.responses.create(previous_response_id=first.id, input="?", **GREEDY)
        assert again.previous_response_id == first.id


async def test_the_stored_items_are_what_was_sent(client: httpx.AsyncClient) -> None:
    """Unknown keys in an item are not kept; each item gets an id of its own (one sent could
    repeat an earlier item's); a message has a status, its string content as its part."""
    body = {
        "input": [
            {"type": "message", "role": "user", "content": "Hi", "id": "msg_mine", "x": 1},
            {"type": "message", "role": "assistant", "content": "Hello", "id": "msg_mine"},
            {"role": "user", "content": "Again"},
        ],
        **GREEDY,
    }
    created = (await client.post("/v1/responses", json=body)).json()
    listed = await client.get(f"/v1/responses/{created['id']}/input_items?order=asc")
    assert listed.status_code == 200, listed.text
    first, second, third = listed.json()["data"]
    assert len({first["id"], second["id"], third["id"], "msg_mine"}) == 4
    assert {k: v for k, v in first.items() if k != "id"} == {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "Hi"}],
        "status": "completed",
    }
    assert second["content"] == [{"type": "output_text", "text": "Hello", "annotations": []}]


async def until_ended(sdk: openai.AsyncOpenAI, response_id: str) -> Response:
    async with asyncio.timeout(60):
        while True:
            response = await sdk.responses.retrieve(response_id)
            if response.status not in ("queued", "in_progress"):
                return response
            await asyncio.sleep(0.05)


async def test_a_background_response_is_polled_to_its_answer(sdk: openai.AsyncOpenAI) -> None:
    body = {"input": image_input("What is it?"), "instructions": "Be brief.", **GREEDY}
    queued = await sdk.responses.create(background=True, **body)
    assert queued.background is True and queued.status in ("queued", "in_progress")
    assert queued.output == [] and queued.store is True
    ended = await until_ended(sdk, queued.id)
    at_once = await sdk.responses.create(store=False, **body)  # the same request, answered
    assert ended.status == at_once.status and ended.output_text == at_once.output_text
    assert ended.usage is not None and at_once.usage is not None
    assert ended.usage.input_tokens == at_once.usage.input_tokens  # (cached ones differ)
    assert ended.usage.output_tokens == at_once.usage.output_tokens and ended.id == queued.id
    assert ended.created_at == queued.created_at and ended.background is True
    items = await sdk.responses.input_items.list(queued.id)
    assert [item.type for item in items.data] == ["message"]
    follow = await sdk.responses.create(previous_response_id=queued.id, input="More", **GREEDY)
    assert follow.usage is not None
    assert follow.usage.input_tokens > at_once.usage.input_tokens
    assert (await sdk.responses.cancel(queued.id)).status == ended.status  # ended: as it is


async def test_a_streamed_background_response_is_followed_and_resumed(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    """background and stream: the events of the stored response (its id throughout, numbered
    from 0), saved as they come, so GET ...?stream=true&starting_after=n sends the rest again;
    the stored answer is the last event's. A background response that did not stream gives
    its last event only; one not made in the background cannot be streamed."""
    body = {"input": image_input("What is it?"), **GREEDY, "max_output_tokens": 12}
    events = [e async for e in await sdk.responses.create(background=True, stream=True, **body)]
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert events[0].response.status == "queued" and events[2].response.status == "in_progress"
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    rid = events[0].response.id
    assert {e.response.id for e in events if hasattr(e, "response")} == {rid}
    final = events[-1].response
    assert final.background is True and final.store is True
    stored = await sdk.responses.retrieve(rid)
    assert stored.status == final.status and stored.output_text == final.output_text
    at_once = await sdk.responses.create(store=False, **body)  # the same request, answered
    assert final.output_text == at_once.output_text
    again = [e async for e in await sdk.responses.retrieve(rid, stream=True, starting_after=2)]
    assert [e.model_dump() for e in again] == [e.model_dump() for e in events[3:]]
    past_the_end = await sdk.responses.retrieve(rid, stream=True, starting_after=len(events) - 1)
    assert [e async for e in past_the_end] == []
    params = {"stream": "true", "starting_after": str(2**63)}  # (past SQLite's integers)
    too_far = await client.get(f"/v1/responses/{rid}", params=params)
    assert too_far.status_code == 400 and too_far.json()["error"]["param"] == "starting_after"
    polled = await sdk.responses.create(background=True, **body)
    ended = await until_ended(sdk, polled.id)
    streamed = [e async for e in await sdk.responses.retrieve(polled.id, stream=True)]
    assert [e.type for e in streamed] == [
        "response.created",
        "response.queued",
        f"response.{ended.status}",
    ]
    assert streamed[-1].response.id == polled.id and streamed[-1].sequence_number == 2
    again = await sdk.responses.retrieve(polled.id, stream=True, starting_after=2)
    assert [e async for e in again] == []  # (that end was sent already)
    async with sdk.responses.stream(response_id=polled.id) as helper:  # the SDK's accumulator
        assert [e.type async for e in helper][-1] == f"response.{ended.status}"
    plain = await sdk.responses.create(**body)
    refused = await client.get(f"/v1/responses/{plain.id}", params={"stream": "true"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"


async def test_a_streamed_background_response_arrives_as_it_runs(tiny_model_dir: Path) -> None:
    """(A real server: the ASGI test transport reads whole streams.) The events come while
    the response runs; the client that hangs up does not stop it (it is in the background),
    and a cancel ends the streams that follow it."""
    body = {"model": "tiny", "input": "Tell me everything.", "stream": True, "background": True}
    body |= {"max_output_tokens": 8000, "temperature": 0}  # (longer than the test: ~8 s)

    async def first_events(client: httpx.AsyncClient, how_many: int, **extra: object) -> list:
        seen = []
        async with client.stream("POST", "/v1/responses", json={**body, **extra}) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if len(seen) == how_many:
                        return seen
        return seen

    with serve_in_thread(make_settings(tiny_model_dir)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            sdk = openai.AsyncOpenAI(
                base_url=f"{url}/v1", api_key="-", max_retries=0, http_client=client
            )
            short = (await first_events(client, 3, max_output_tokens=30))[0]["response"]["id"]
            assert (await until_ended(sdk, short)).status in ("completed", "incomplete")
            seen = await first_events(client, 5)  # hung up too, with the run going on
            rid = seen[0]["response"]["id"]
            assert (await client.get(f"/v1/responses/{rid}")).json()["status"] == "in_progress"
            params = {"stream": "true", "starting_after": "2"}
            async with client.stream("GET", f"/v1/responses/{rid}", params=params) as stream:
                lines = stream.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        assert json.loads(line[6:])["sequence_number"] == 3
                        break
                cancelled = await client.post(f"/v1/responses/{rid}/cancel")
                assert cancelled.json()["status"] == "cancelled"
                async with asyncio.timeout(10):  # the followed stream ends
                    async for _ in lines:
                        pass
            assert (await client.get(f"/v1/responses/{rid}")).json()["status"] == "cancelled"


async def test_a_followed_stream_whose_run_started_over_ends_with_an_error(
    client: httpx.AsyncClient, sdk: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What was sent cannot be taken back: a client that read attempt 1's events gets an
    error as soon as attempt 2 (its server stopped, another took the job) starts, numbered
    after them; one that comes back after one of attempt 1's events too; a new client
    follows attempt 2 from the start (the queued events, then attempt 2's)."""
    jobs = client.app.state.services.jobs  # type: ignore[attr-defined]
    answered = (await sdk.responses.create(input="Hi", **GREEDY)).model_dump(exclude_none=True)
    running = {**answered, "id": "resp_restarted", "status": "in_progress", "background": True}
    jobs.save_response(running, [], project="")

    def text(number: int) -> str:
        return f'event: response.output_text.delta\ndata: {{"sequence_number": {number}}}\n\n'

    async def settle() -> dict:
        return running

    def follow(after: int) -> AsyncIterator[str]:
        return followed(jobs, "resp_restarted", after, settle, lambda: False)

    with jobs.transaction() as execute:
        response_store.insert_events(execute, "resp_restarted", 0, [(0, text(0)), (1, text(1))])
        response_store.insert_events(execute, "resp_restarted", 1, [(2, text(2)), (3, text(3))])
    stream = follow(-1)
    assert [await anext(stream) for _ in range(4)] == [text(n) for n in range(4)]
    with jobs.transaction() as execute:  # as start_events does it for attempt 2
        execute("DELETE FROM response_events WHERE attempt > 0", ())
        response_store.insert_events(execute, "resp_restarted", 2, [(4, text(4)), (5, text(5))])
    error = json.loads((await anext(stream)).split("data: ", 1)[1])
    assert error["type"] == "error" and "started over" in error["message"]
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    back = [event async for event in follow(3)]  # attempt 1's event 3: gone
    assert len(back) == 1 and "started over" in back[0]
    fresh = follow(-1)
    assert [await anext(fresh) for _ in range(4)] == [text(n) for n in (0, 1, 4, 5)]
    await fresh.aclose()
    draining = followed(jobs, "resp_restarted", 4, settle, lambda: True)
    shutting, last = [event async for event in draining]  # (it goes on elsewhere)
    assert shutting == text(5) and '"code":"server_shutting_down"' in last
    number = json.loads(last.split("data: ", 1)[1])["sequence_number"]
    assert number == 5  # the last sent: a client going on after it misses nothing
    monkeypatch.setattr(response_events, "KEEPALIVE_S", 0.0)
    idle = follow(5)  # nothing new: an SSE comment keeps proxies from cutting the stream
    assert await asyncio.wait_for(anext(idle), 5) == ": keepalive\n\n"
    await idle.aclose()
    monkeypatch.setattr(response_events, "KEEPALIVE_S", 15.0)
    quiet = follow(-1)  # attempt 2 said only its in_progress when attempt 3 replaced it
    in_progress = 'event: response.in_progress\ndata: {"sequence_number": 4}\n\n'
    with jobs.transaction() as execute:
        execute("DELETE FROM response_events WHERE attempt > 0", ())
        response_store.insert_events(execute, "resp_restarted", 2, [(4, in_progress)])
    assert [await anext(quiet) for _ in range(3)] == [text(0), text(1), in_progress]
    with jobs.transaction() as execute:
        execute("DELETE FROM response_events WHERE attempt > 0", ())
        response_store.insert_events(execute, "resp_restarted", 3, [(5, text(5))])
    assert await anext(quiet) == text(5)  # followed on, no error: nothing was taken back
    await quiet.aclose()


async def test_a_background_response_that_fails_says_why(sdk: openai.AsyncOpenAI) -> None:
    """What only running finds (here: an image that cannot be fetched) fails the response,
    with the error the request would have got."""
    part = {"type": "input_image", "image_url": "http://127.0.0.1:1/nothing.png"}
    queued = await sdk.responses.create(
        background=True, input=[{"role": "user", "content": [part]}], **GREEDY
    )
    failed = await until_ended(sdk, queued.id)
    assert failed.status == "failed" and failed.error is not None
    # (OpenAI's code for it, the SDK's enum; the request's error type and the part named)
    assert failed.error.code == "failed_to_download_image"
    assert failed.error.type == "invalid_request_error"
    assert failed.error.param == "input[0].content[0]"


async def test_bad_background_requests_are_400s(sdk: openai.AsyncOpenAI) -> None:
    for extra, param in (
        ({"store": False}, "background"),
        ({"temperature": 5}, "temperature"),  # checked before it is queued
        ({"max_output_tokens": 10**6}, "max_output_tokens"),  # past the context, whatever else
        ({"model": "nope"}, "model"),
    ):
        with pytest.raises(openai.APIStatusError) as refused:
            await sdk.responses.create(background=True, input="Hi", **(GREEDY | extra))
        assert 400 <= refused.value.status_code < 500
        assert refused.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):  # not made in the background
        await sdk.responses.cancel((await sdk.responses.create(input="Hi", **GREEDY)).id)
    # images that need no download are read before it is queued: a bad one is a 400 now
    for image in (
        {"type": "input_image", "image_url": "data:image/png;base64,@@@"},
        {"type": "input_image", "file_id": "file-nope"},
    ):
        with pytest.raises(openai.BadRequestError) as unreadable:
            content = [image, {"type": "input_text", "text": "What?"}]
            await sdk.responses.create(
                background=True, input=[{"role": "user", "content": content}], **GREEDY
            )
        assert unreadable.value.body["param"].startswith("input[0]")  # type: ignore[index]


async def test_a_queued_background_response_is_cancelled_and_kept_so(
    tiny_model_dir: Path,
) -> None:
    """No worker runs here (stopped), so the response stays queued until it is cancelled;
    then a worker that starts (a restart on the same data dir) leaves it cancelled. One
    queued across a restart is answered by the next start."""
    settings = make_settings(tiny_model_dir)
    async for client in start_client(settings):
        await client.app.state.services.job_worker.stop()  # type: ignore[attr-defined]
        sdk = sdk_for(client)
        cancelled = await sdk.responses.create(background=True, input="Hi", **GREEDY)
        waits = await sdk.responses.create(background=True, input="Hi", **GREEDY)
        deleted = await sdk.responses.create(background=True, input="Hi", **GREEDY)
        with pytest.raises(openai.BadRequestError) as running:
            await sdk.responses.create(previous_response_id=waits.id, input="?", **GREEDY)
        assert "queued" in running.value.body["message"]  # type: ignore[index]
        assert (await sdk.responses.cancel(cancelled.id)).status == "cancelled"
        await sdk.responses.delete(deleted.id)
        jobs = client.app.state.services.jobs  # type: ignore[attr-defined]
        assert jobs.get(cancelled.id).status == "cancelled"
        assert jobs.get(deleted.id).status == "cancelled"
    async for client in start_client(settings):
        sdk = sdk_for(client)
        answered = await until_ended(sdk, waits.id)
        assert answered.status in ("completed", "incomplete") and answered.output_text
        assert (await sdk.responses.retrieve(cancelled.id)).status == "cancelled"


async def test_a_conversation_that_cannot_be_read_back_is_a_400(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    """A function call cut off by max_output_tokens is a call the next turn answers (OpenAI
    takes it); a stored call that cannot be read as input (its JSON escapes a lone surrogate)
    is previous_response_id's 400, as is an image of an earlier turn deleted since."""
    cut = await sdk.responses.create(
        input="Weather?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        **GREEDY | {"max_output_tokens": 3},
    )
    assert cut.status == "incomplete"
    output = {"type": "function_call_output", "call_id": cut.output[0].call_id, "output": "x"}
    answered = await sdk.responses.create(previous_response_id=cut.id, input=[output], **GREEDY)
    assert answered.status in ("completed", "incomplete")
    jobs = client.app.state.services.jobs  # type: ignore[attr-defined]
    stored = cut.model_dump(exclude_none=True)
    stored["output"][0]["arguments"] = '{"city": "\\ud800"}'
    jobs.save_response({**stored, "id": "resp_unreadable"}, [], project="")
    for call in (
        sdk.responses.create(previous_response_id="resp_unreadable", input="go on", **GREEDY),
        sdk.responses.input_tokens.count(previous_response_id="resp_unreadable", input="go on"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            await call
        assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
        assert "lone surrogate" in refused.value.body["message"]  # type: ignore[index]
    image = await sdk.files.create(file=("a.png", make_image(32, 32, fmt="PNG")), purpose="vision")
    part = {"type": "input_image", "file_id": image.id}
    seen = await sdk.responses.create(input=[{"role": "user", "content": [part]}], **GREEDY)
    await sdk.files.delete(image.id)
    with pytest.raises(openai.BadRequestError) as gone:
        await sdk.responses.create(previous_response_id=seen.id, input="again", **GREEDY)
    assert gone.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert gone.value.body["code"] == "file_not_found"  # type: ignore[index]


async def test_the_final_event_waits_for_the_store_and_nothing_else_does(tmp_path: Path) -> None:
    """(Over the ASGI test transport a whole stream is read before the client sees it: the
    order is checked on the wrapper itself, over a real job store whose writes it records.)"""
    sent: list[str] = []
    saved_after: list[int] = []
    added_after: list[int] = []

    class Store(SqliteJobStore):
        def update_response(self, response: dict, *args: object, **kwargs: object) -> bool:
            saved_after.append(len(sent))
            return super().update_response(response, *args, **kwargs)  # type: ignore[arg-type]

        def add_items(self, conversation_id: str, items: list, project: str) -> bool:
            added_after.append(len(sent))
            return super().add_items(conversation_id, items, project)

    async def stream() -> AsyncIterator[str]:
        for kind in ("response.created", "response.output_text.delta", "response.completed"):
            yield f"event: {kind}\ndata: {{}}\n\n"

    body = ResponsesRequest.model_validate({"model": "tiny", "input": "Hi", "conversation": "c"})
    response = ResponseObject.start("resp_x", body, SamplingParams(), store=True)
    store = Store(tmp_path / "jobs.db")
    store.save_response(response.model_dump(), body.own_items("resp_x"), "")  # (as it began)
    store.create_conversation("c", {}, [], "")
    services = SimpleNamespace(jobs=store)
    async for event in recorded_as_it_ends(stream(), response, body, services):  # type: ignore[arg-type]
        sent.append(event)
    assert saved_after == [2] and len(sent) == 3  # stored after two events, before the last
    assert added_after == [2]  # (its items in its conversation too)
    assert store.get_response("resp_x", "") is not None
    items = store.conversation_items("c", "")
    assert items is not None and [item["role"] for item in items] == ["user"]
    store.close()


async def test_a_streamed_response_is_seen_while_it_streams(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(A real server: the ASGI test transport reads whole streams.) GET shows a stream's
    response in_progress while it runs (its lease renewed), then as it ended; a client that
    hangs up leaves it cancelled, not in_progress."""
    monkeypatch.setattr(response_store, "STREAM_LEASE_S", 1.0)
    body = {"model": "tiny", "input": "Tell me everything.", "stream": True}
    body |= {"max_output_tokens": 8000, "temperature": 0}  # (longer than the test: ~8 s)
    with serve_in_thread(make_settings(tiny_model_dir)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with client.stream("POST", "/v1/responses", json=body) as stream:
                lines = stream.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        rid = json.loads(line[6:])["response"]["id"]
                        break
                seen = (await client.get(f"/v1/responses/{rid}")).json()
                assert seen["status"] == "in_progress" and seen["output"] == []
                await asyncio.sleep(2.5)  # leases past: renewed meanwhile, still running
                assert (await client.get(f"/v1/responses/{rid}")).json()["status"] == "in_progress"
            async with asyncio.timeout(10):  # hung up: its end is written
                while (await client.get(f"/v1/responses/{rid}")).json()["status"] != "cancelled":
                    await asyncio.sleep(0.05)
            short = {**body, "max_output_tokens": 3}
            async with client.stream("POST", "/v1/responses", json=short) as stream:
                ends = [
                    line async for line in stream.aiter_lines() if "response.incomplete" in line
                ]
            rid = json.loads(ends[-1].removeprefix("data: "))["response"]["id"]
            assert (await client.get(f"/v1/responses/{rid}")).json()["status"] == "incomplete"


async def test_a_stream_whose_server_stopped_is_failed_once_its_lease_runs_out(
    client: httpx.AsyncClient, sdk: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's row left in_progress by a server that crashed (nothing renews it): running
    while its lease lasts, then failed with a server_error, and not continued."""
    jobs = client.app.state.services.jobs  # type: ignore[attr-defined]
    answered = (await sdk.responses.create(input="Hi", **GREEDY)).model_dump(exclude_none=True)
    crashed = {**answered, "id": "resp_crashed", "status": "in_progress", "output": []}
    jobs.save_response(crashed, [], project="")  # as a stream's row is saved when it begins
    assert (await sdk.responses.retrieve("resp_crashed")).status == "in_progress"
    late = jobs.get_response("resp_crashed", project="").used_at + response_store.STREAM_LEASE_S + 1
    renewed = {**crashed, "status": "failed"}  # (renewed after it was read as unrenewed)
    assert not jobs.update_response(
        renewed, unused_since=jobs.get_response("resp_crashed", project="").used_at
    )
    monkeypatch.setattr(jobs, "now", lambda: late)
    lost = await sdk.responses.retrieve("resp_crashed")
    assert lost.status == "failed" and lost.error is not None
    assert lost.error.code == "server_error" and "stopped" in lost.error.message
    with pytest.raises(openai.BadRequestError, match="is failed"):
        await sdk.responses.create(input="Go on", previous_response_id="resp_crashed", **GREEDY)
    assert (await sdk.responses.retrieve(answered["id"])).status == answered["status"]


async def test_a_background_retry_with_its_idempotency_key_gets_the_same_response(
    sdk: openai.AsyncOpenAI,
) -> None:
    key = {"Idempotency-Key": "bg-retry-1"}
    first = await sdk.responses.create(input="Hi", background=True, extra_headers=key, **GREEDY)
    again = await sdk.responses.create(input="Hi", background=True, extra_headers=key, **GREEDY)
    assert again.id == first.id
    with pytest.raises(openai.ConflictError) as reused:  # the key, for another request
        await sdk.responses.create(input="Bye", background=True, extra_headers=key, **GREEDY)
    assert reused.value.body["code"] == "idempotency_key_reused"  # type: ignore[index]
    ended = await until_ended(sdk, first.id)
    assert ended.status in ("completed", "incomplete")


async def test_truncation_auto_leaves_the_oldest_turns_out(tiny_model_dir: Path) -> None:
    """A conversation past the context: with truncation "auto" (OpenAI's) its oldest turns
    are left out until it fits, the instructions and the last turn kept, streamed, in the
    background and continued alike; "disabled" (the default) is the 400. The stored input
    is the request's, whole."""
    settings = make_settings(tiny_model_dir, max_model_len=256)
    long_turn = "The quick brown fox jumps over the lazy dog. " * 6  # about 60 tokens
    turns = []
    for k in range(6):
        turns += [
            {"role": "user", "content": f"{k}: {long_turn}"},
            {"role": "assistant", "content": f"Answer {k}."},
        ]
    turns.append({"role": "user", "content": "And now?"})
    body = {**GREEDY, "instructions": "Be brief.", "input": turns}
    async for client in start_client(settings):
        sdk = sdk_for(client)
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.responses.create(**body)
        assert refused.value.code == "context_length_exceeded"
        fitted = await sdk.responses.create(**body, truncation="auto")
        answered = ("completed", "incomplete")  # (incomplete: max_output_tokens reached)
        assert fitted.status in answered and fitted.truncation == "auto"
        assert 100 < fitted.usage.input_tokens <= 256 - 4
        items = await sdk.responses.input_items.list(fitted.id, order="asc")
        assert len(items.data) == len(turns)  # stored whole
        counted = await sdk.responses.input_tokens.count(
            model="tiny", instructions="Be brief.", input=turns, truncation="auto"
        )
        assert counted.input_tokens == fitted.usage.input_tokens
        whole = await sdk.responses.input_tokens.count(model="tiny", input=turns)
        assert whole.input_tokens > 256
        events = [
            e async for e in await sdk.responses.create(**body, truncation="auto", stream=True)
        ]
        streamed = events[-1].response  # (response.incomplete: max_output_tokens reached)
        assert streamed.usage.input_tokens == fitted.usage.input_tokens
        queued = await sdk.responses.create(**body, truncation="auto", background=True)
        for _ in range(200):
            done = await sdk.responses.retrieve(queued.id)
            if done.status not in ("queued", "in_progress"):
                break
            await asyncio.sleep(0.05)
        assert done.status in answered, done.error
        assert done.usage.input_tokens == fitted.usage.input_tokens
        more = {**GREEDY, "input": long_turn, "previous_response_id": fitted.id}
        continued = await sdk.responses.create(**more, truncation="auto")
        assert continued.status in answered
        with pytest.raises(openai.BadRequestError):
            await sdk.responses.create(**more)
        alone = {**GREEDY, "input": long_turn * 6, "truncation": "auto"}  # one turn: no fit
        with pytest.raises(openai.BadRequestError):
            await sdk.responses.create(**alone)


def screenshot_loop(steps: int) -> list[dict]:
    """A computer-use task: one user message, then a step per screenshot (the model's click,
    the tool's answer with the screen as it is now)."""
    screen = {"type": "input_image", "image_url": data_uri(make_image(224, 224)), "detail": "high"}
    items: list[dict] = [{"role": "user", "content": "Open the settings."}]
    for k in range(steps):
        items += [
            {"type": "function_call", "call_id": f"c{k}", "name": "click", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": f"c{k}",
                "output": [{"type": "input_text", "text": f"step {k}"}, screen],
            },
        ]
    return items


def test_truncation_leaves_a_tool_loops_oldest_steps_out_first_its_task_never() -> None:
    """One turn holding a whole tool loop: truncation "auto" leaves its oldest steps (a call
    with its output) out, one at a time; the instructions, the task's user message and the
    latest step stay. Before that, whole turns go, oldest first."""
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    body = ResponsesRequest.model_validate(
        {
            "model": "tiny",
            "instructions": "Be brief.",
            "input": [*earlier, *screenshot_loop(3)],
            "truncation": "auto",
        }
    )
    kept = []
    while True:
        kept.append([where for _, where in body._kept_items()])
        if not shorten(body):
            break
    assert kept == [
        [f"input[{i}]" for i in range(9)],
        [f"input[{i}]" for i in range(2, 9)],  # the earlier turn
        ["input[2]", "input[5]", "input[6]", "input[7]", "input[8]"],  # step 0
        ["input[2]", "input[7]", "input[8]"],  # step 1 (the latest, step 2, stays)
    ]


def test_a_step_ends_only_once_its_calls_are_answered() -> None:
    """Outputs may come after other items (an answer's message between two calls' outputs):
    truncation never keeps an output whose call it left out."""
    call = {"type": "function_call", "name": "f", "arguments": "{}"}
    items = [
        {"role": "user", "content": "go"},
        {**call, "call_id": "a"},
        {**call, "call_id": "b"},
        {"type": "function_call_output", "call_id": "a", "output": "1"},
        {"role": "assistant", "content": "waiting for b"},
        {"type": "function_call_output", "call_id": "b", "output": []},  # (nothing said)
        {**call, "call_id": "c"},
        {"type": "function_call_output", "call_id": "c", "output": "3"},
    ]
    body = ResponsesRequest.model_validate({"model": "tiny", "input": items, "truncation": "auto"})
    assert shorten(body) and not shorten(body)
    assert [where for _, where in body._kept_items()] == ["input[0]", "input[6]", "input[7]"]
    assert body.to_chat_body()["messages"][-1]["role"] == "tool"


async def test_truncation_finds_the_fewest_steps_to_leave_out_in_a_few_builds(
    tiny_model_dir: Path,
) -> None:
    """A long tool loop far past the context: the fewest oldest steps that must go are found
    by doubling, then halving (a dozen prompt builds for 100 steps, not one per step), the
    prompt left as full as fits."""
    settings = make_settings(tiny_model_dir, max_model_len=512)
    items: list[dict] = [{"role": "user", "content": "Tidy the desktop."}]
    for k in range(100):
        items += [
            {"type": "function_call", "call_id": f"c{k}", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": f"c{k}", "output": f"moved file {k}"},
        ]
    body = {**GREEDY, "input": items, "truncation": "auto"}
    async for client in start_client(settings):
        chat = client.app.state.services.chat  # type: ignore[attr-defined]
        builds = 0

        async def counted(request, prompt=chat.prompt, **options):  # type: ignore[no-untyped-def]
            nonlocal builds
            builds += 1
            return await prompt(request, **options)

        chat.prompt = counted
        answer = (await client.post("/v1/responses", json=body)).json()
        assert answer["status"] in ("completed", "incomplete"), answer
        assert builds <= 16
        kept = answer["usage"]["input_tokens"]
        assert kept > 512 - 100  # (one step more would not fit: a step is about 60 tokens)
        counted_tokens = await client.post("/v1/responses/input_tokens", json=body)
        assert counted_tokens.json()["input_tokens"] == kept
    request = ResponsesRequest.model_validate(body)
    assert request.truncatable() == 99  # (every step but the latest)


async def test_truncation_auto_fits_a_screenshot_loop(tiny_model_dir: Path) -> None:
    """A computer-use loop past the context (a screenshot each step) answers with truncation
    "auto", its oldest steps left out; input_tokens counts what the answer takes, and the whole
    loop is counted (its images alone past the context) rather than refused."""
    settings = make_settings(tiny_model_dir, max_model_len=512, max_images_per_request=16)
    body = {**GREEDY, "input": screenshot_loop(8)}  # 8 screenshots of 64 tokens, and the text
    async for client in start_client(settings):
        sdk = sdk_for(client)
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.responses.create(**body)
        assert refused.value.code == "context_length_exceeded"
        assert refused.value.param == "input"
        assert 'Set truncation "auto"' in refused.value.message  # (what would fit it)
        fitted = await sdk.responses.create(**body, truncation="auto")
        assert fitted.status in ("completed", "incomplete"), fitted.error
        with pytest.raises(openai.BadRequestError) as still:  # (its latest step alone too long)
            big = {"type": "input_image", "image_url": data_uri(make_image(700, 700))}
            last = {**body["input"][-1], "output": [{**big, "detail": "high"}]}
            too_long = {**body, "input": [*body["input"][:-1], last], "truncation": "auto"}
            await sdk.responses.create(**too_long)
        assert 'Truncation "auto" left out all it may' in still.value.message
        assert 64 < fitted.usage.input_tokens <= 512 - 4
        counted = await sdk.responses.input_tokens.count(
            model="tiny", input=body["input"], truncation="auto"
        )
        assert counted.input_tokens == fitted.usage.input_tokens
        whole = await sdk.responses.input_tokens.count(model="tiny", input=body["input"])
        assert whole.input_tokens > 8 * 64
        # more screenshots than a request may hold (16): the oldest steps go too
        many = {**GREEDY, "input": screenshot_loop(17)}
        with pytest.raises(openai.BadRequestError) as counted_out:
            await sdk.responses.create(**many)
        assert counted_out.value.code == "too_many_images"
        assert (await sdk.responses.create(**many, truncation="auto")).status != "failed"
        # a prompt truncation could not shorten gets no hint about it
        with pytest.raises(openai.BadRequestError) as alone:
            await sdk.responses.create(**{**GREEDY, "input": "word " * 200})
        assert "truncation" not in alone.value.message


class GoneMidSend:
    """An ASGI client that goes away while the server sends its `n`th message (its task then
    cancelled inside `send`, as Starlette cancels it on the disconnect)."""

    def __init__(self, body: dict, n: int) -> None:
        self.body, self.n, self.sent, self.gone = body, n, [], asyncio.Event()
        self.read = False

    async def receive(self) -> dict:
        if not self.read:
            self.read = True
            return {"type": "http.request", "body": json.dumps(self.body).encode()}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        if len(self.sent) == self.n:
            self.gone.set()
            await asyncio.Event().wait()  # (never answered: cancelled here)

    def scope(self, path: str) -> dict:
        headers = [(b"host", b"testserver"), (b"content-type", b"application/json")]
        scope = post_scope(path, headers)
        return scope | {"asgi": {"version": "3.0", "spec_version": "2.3"}}  # (uvicorn's)


async def test_an_event_streams_generator_is_closed_when_its_client_goes_away_mid_send() -> None:
    """Starlette leaves a stream's generator at its `yield` when the client goes away while
    an event is sent (for the garbage collector: minutes under load); EventStream closes it
    (its `finally` runs) as the response ends."""
    closed = asyncio.Event()

    async def events() -> AsyncIterator[str]:
        try:
            for i in range(100):
                yield f"data: {i}\n\n"
        finally:
            closed.set()

    generator = events()  # (held here: no collector closes it)
    client = GoneMidSend({}, n=3)  # (the start, the first event, the second)
    await asyncio.wait_for(
        EventStream(generator)(client.scope("/"), client.receive, client.send), 5
    )
    assert closed.is_set()


async def test_a_stored_stream_whose_client_went_away_mid_send_is_cancelled(
    client: httpx.AsyncClient,
) -> None:
    """(Under load, 11 of 7,635 streams whose clients hung up early stayed in_progress for
    good.) A client gone while an opening event is sent leaves its response cancelled."""
    body = {"model": "tiny", "input": "Tell me everything.", "stream": True}
    gone = GoneMidSend(body | {"max_output_tokens": 8000}, n=3)
    app = client.app  # type: ignore[attr-defined]
    await asyncio.wait_for(app(gone.scope("/v1/responses"), gone.receive, gone.send), 30)
    created = gone.sent[1]["body"].decode()
    rid = json.loads(created.split("data: ", 1)[1])["response"]["id"]
    assert (await client.get(f"/v1/responses/{rid}")).json()["status"] == "cancelled"


async def test_a_stored_stream_whose_client_went_away_as_it_ended_is_recorded(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client goes away while the stream's end is being written (Starlette cancels the
    stream): the write lands all the same. Cancelled while it waited for a busy thread pool,
    it never ran, and the row (its end under way, so not marked cancelled) stayed
    in_progress for good (1 of 5,733 hang-ups under load)."""
    from server.api.routes import responses as routes

    gone = asyncio.Event()
    record = routes.record

    async def slow_record(*args, **kwargs) -> None:  # (as a write queued for a thread)
        gone.set()
        await asyncio.sleep(0.3)
        await record(*args, **kwargs)

    monkeypatch.setattr(routes, "record", slow_record)
    body = {"model": "tiny", "input": "Hi", "stream": True, "max_output_tokens": 4}
    client_gone = GoneMidSend(body, n=10**6)
    client_gone.gone = gone  # (away once the end is being written)
    app = client.app  # type: ignore[attr-defined]
    await asyncio.wait_for(
        app(client_gone.scope("/v1/responses"), client_gone.receive, client_gone.send), 30
    )
    created = client_gone.sent[1]["body"].decode()
    rid = json.loads(created.split("data: ", 1)[1])["response"]["id"]
    async with asyncio.timeout(5):
        while (await client.get(f"/v1/responses/{rid}")).json()["status"] == "in_progress":
            await asyncio.sleep(0.05)
    assert (await client.get(f"/v1/responses/{rid}")).json()["status"] == "incomplete"


async def test_a_background_responses_own_request_is_no_client_request(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The request a background response runs as (the server's own, to itself) is logged as
    internal and left out of the HTTP request metrics: a fleet's request rate counts the
    client's POST once, not again at the replica that ran it."""

    async def posts() -> float:
        text = (await client.get("/metrics")).text
        name = 'vlm_http_requests_total{route="/v1/responses",status="200"} '
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    before = await posts()
    with caplog.at_level("INFO", logger="server.access"):
        queued = await sdk.responses.create(background=True, input="Hi", **GREEDY)
        await until_ended(sdk, queued.id)
    assert await posts() == before + 1
    internal = 'vlm_internal_requests_total{route="/v1/responses",status="200"}'
    assert internal in (await client.get("/metrics")).text
    internal = [r for r in caplog.records if "(internal: a job's)" in r.getMessage()]
    assert [r.getMessage().split()[:3] for r in internal] == [["POST", "/v1/responses", "200"]]
    assert internal[0].fields["internal"] is True  # type: ignore[attr-defined]
