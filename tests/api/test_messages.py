"""Anthropic's Messages API through the official anthropic client: the same answer and usage as
the chat completion it is, images, the system prompt, prefill, stop sequences, tool use (and
results in the next turn), JSON output, the streamed events as the SDK accumulates them, token
counting, Anthropic's error envelope and its x-api-key header."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Literal

import anthropic
import httpx
import httpx2
import openai
import pytest
import torch
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from pydantic import TypeAdapter

from server.api.messages import (
    MessageEvents,
    MessageObject,
    MessagesRequest,
    content_blocks,
    stop_of,
    usage_of,
)
from server.engine.inputs import ModelInputs
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence, SequenceOutput
from server.exceptions import EngineOverloaded, InvalidRequest
from server.pipelines.chat import ChatRun, ChoiceResult
from server.pipelines.messages import ToolCall
from server.pipelines.tools import Tools
from tests.helpers import data_uri, make_image, make_settings, make_video, start_client

pytestmark = pytest.mark.anyio

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
# The current SDK has no temperature argument (newer Claude models take none); its older
# versions and curl scripts send one, and clients reach it through extra_body.
GREEDY = {"temperature": 0}
WEATHER_CHAT = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]},
}
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["n"],
    "additionalProperties": False,
}


def anthropic_sdk(client: httpx.AsyncClient, **auth: str) -> anthropic.AsyncAnthropic:
    """The SDK on the test client's app (the SDK speaks httpx2, its own fork of httpx)."""
    transport = httpx2.ASGITransport(app=client._transport.app)  # type: ignore[attr-defined]
    http = httpx2.AsyncClient(transport=transport, base_url="http://testserver")
    return anthropic.AsyncAnthropic(
        base_url="http://testserver", http_client=http, max_retries=0, **auth
    )


@pytest.fixture
def sdk(client: httpx.AsyncClient) -> anthropic.AsyncAnthropic:
    return anthropic_sdk(client, api_key="unused")


@pytest.fixture
def oai(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )


def image_block() -> dict:
    data = data_uri(make_image(96, 64)).split(",", 1)[1]
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}


def assert_anthropic_error(response: httpx.Response, status: int, error_type: str) -> str:
    """Anthropic's envelope; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body) == {"type", "error", "request_id"}
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == error_type
    assert "Traceback" not in body["error"]["message"]
    return body["error"]["message"]


async def test_the_answer_is_the_chat_completions(
    sdk: anthropic.AsyncAnthropic, oai: openai.AsyncOpenAI
) -> None:
    # first, so the message reads the prompt from the prefix cache
    chat = await oai.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": data_uri(make_image(96, 64))}},
                ],
            },
        ],
        max_tokens=6,
        temperature=0,
    )
    message = await sdk.messages.create(
        model="tiny",
        system="Be brief.",
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image_block()]}
        ],
        max_tokens=6,
        extra_body=GREEDY,
    )
    assert message.id.startswith("msg_") and message.type == "message"
    assert message.role == "assistant" and message.model == "tiny"
    (block,) = message.content
    assert block.type == "text" and block.text == chat.choices[0].message.content
    usage = message.usage
    # input_tokens are the ones not read from the prefix cache (the chat request warmed it)
    assert usage.input_tokens + usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert usage.cache_read_input_tokens > 0 and usage.cache_creation_input_tokens == 0
    assert usage.cache_creation is not None and usage.cache_creation.ephemeral_5m_input_tokens == 0
    assert usage.output_tokens == chat.usage.completion_tokens
    finish = chat.choices[0].finish_reason
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[finish]
    assert message.stop_sequence is None


async def test_the_sdks_types_validate_what_is_sent(client: httpx.AsyncClient) -> None:
    """Strict validation with the SDK's models (the SDK itself builds them unchecked)."""
    body = {
        "model": "tiny",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [image_block(), {"type": "text", "text": "?"}]}],
    }
    response = await client.post("/v1/messages", json=body)
    Message.model_validate(response.json())
    events = TypeAdapter(RawMessageStreamEvent)
    kinds = []
    async with client.stream("POST", "/v1/messages", json={**body, "stream": True}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                kinds.append(line[7:])
            if line.startswith("data: ") and kinds[-1] != "ping":  # the SDK skips pings
                assert events.validate_python(json.loads(line[6:])).type == kinds[-1]
    assert kinds[:2] == ["message_start", "ping"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[2] == "content_block_start" and kinds[-3] == "content_block_stop"


async def test_the_stream_accumulates_to_the_answer(sdk: anthropic.AsyncAnthropic) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "extra_body": GREEDY,
    }
    whole = await sdk.messages.create(**body)
    async with sdk.messages.stream(**body) as stream:
        texts = [text async for text in stream.text_stream]
        streamed = await stream.get_final_message()
    assert "".join(texts) == whole.content[0].text == streamed.content[0].text
    assert streamed.stop_reason == whole.stop_reason
    assert streamed.usage.output_tokens == whole.usage.output_tokens
    assert streamed.usage.input_tokens + streamed.usage.cache_read_input_tokens == (
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    )


async def test_stop_sequences_say_which_one_matched(sdk: anthropic.AsyncAnthropic) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Count"}],
        "extra_body": GREEDY,
    }
    whole = (await sdk.messages.create(**body, max_tokens=10)).content[0].text
    stop = whole.strip()[-2:]
    assert stop.strip(), f"the greedy answer has too little text to stop in: {whole!r}"
    cut = await sdk.messages.create(**body, max_tokens=10, stop_sequences=["\u2603\u2603", stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert whole.startswith(cut.content[0].text) and stop not in cut.content[0].text
    async with sdk.messages.stream(**body, max_tokens=10, stop_sequences=[stop]) as stream:
        streamed = await stream.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == stop


async def test_an_empty_answer_has_no_content_block(sdk: anthropic.AsyncAnthropic) -> None:
    """As Anthropic's: an answer stopped before its first character is `content: []` (not an
    empty text block, which the API refuses when sent back), streamed with no block."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Count"}],
        "extra_body": GREEDY,
    }
    whole = (await sdk.messages.create(**body, max_tokens=4)).content[0].text
    first = whole.lstrip()[:1]
    assert first, f"the greedy answer has no text to stop at: {whole!r}"
    stop = whole[: whole.index(first) + 1]  # (the answer's first visible character, and before)
    empty = await sdk.messages.create(**body, max_tokens=4, stop_sequences=[stop])
    assert empty.content == [] and empty.stop_reason == "stop_sequence"
    async with sdk.messages.stream(**body, max_tokens=4, stop_sequences=[stop]) as stream:
        kinds = [e.type async for e in stream]
        streamed = await stream.get_final_message()
    assert streamed.content == [] and not any(k.startswith("content_block") for k in kinds)


async def test_prefill_continues_the_assistants_turn(
    sdk: anthropic.AsyncAnthropic, oai: openai.AsyncOpenAI
) -> None:
    """A last assistant message is the answer's beginning: the content continues it (vLLM's
    continue_final_message)."""
    turns = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "The colour is"},
    ]
    message = await sdk.messages.create(
        model="tiny", messages=turns, max_tokens=4, extra_body=GREEDY
    )
    chat = await oai.chat.completions.create(
        model="tiny",
        messages=turns,
        max_tokens=4,
        temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert message.content[0].text == chat.choices[0].message.content
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == (
        chat.usage.prompt_tokens
    )


async def test_tool_use_and_its_result(sdk: anthropic.AsyncAnthropic) -> None:
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    tool_choice = {"type": "tool", "name": "get_weather"}
    message = await sdk.messages.create(
        model="tiny",
        messages=question,
        tools=[WEATHER],
        tool_choice=tool_choice,
        extra_body=GREEDY,
        max_tokens=100,
    )
    assert message.stop_reason == "tool_use"
    (call,) = message.content
    assert call.type == "tool_use" and call.name == "get_weather"
    assert set(call.input) == {"city"} and isinstance(call.input["city"], str)
    async with sdk.messages.stream(
        model="tiny",
        messages=question,
        tools=[WEATHER],
        tool_choice=tool_choice,
        extra_body=GREEDY,
        max_tokens=100,
    ) as stream:
        streamed = await stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert streamed.content[0].input == call.input  # rebuilt from the input_json deltas
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}
    follow_up = await sdk.messages.create(
        model="tiny",
        messages=[
            *question,
            {"role": "assistant", "content": [b.model_dump() for b in message.content]},
            {"role": "user", "content": [result, {"type": "text", "text": "And tomorrow?"}]},
        ],
        tools=[WEATHER],
        extra_body=GREEDY,  # (sampled, three tokens of whitespace were an empty answer)
        max_tokens=3,
    )
    assert follow_up.content[0].type in ("text", "tool_use")
    before = message.usage.input_tokens + message.usage.cache_read_input_tokens
    after = follow_up.usage.input_tokens + follow_up.usage.cache_read_input_tokens
    assert after > before


async def test_the_sdks_tool_runner_runs_its_tools(client: httpx.AsyncClient) -> None:
    """The SDK's tool runner threads its requests by default (the message-threads beta): the
    server refuses `thread` with the error_code that makes the SDK send whole conversations,
    and the tool's result reaches the next turn."""
    sent: list[dict] = []

    async def record(request: httpx2.Request) -> None:
        if request.method == "POST":
            sent.append(json.loads(request.content))

    transport = httpx2.ASGITransport(app=client._transport.app)  # type: ignore[attr-defined]
    http = httpx2.AsyncClient(
        transport=transport, base_url="http://testserver", event_hooks={"request": [record]}
    )
    sdk = anthropic.AsyncAnthropic(
        base_url="http://testserver", http_client=http, max_retries=0, api_key="unused"
    )
    calls: list[str] = []

    @anthropic.beta_async_tool
    async def get_weather(city: Literal["Oslo", "Paris"]) -> str:
        """The weather in a city.

        Args:
            city: the city's name
        """
        calls.append(city)
        return "sunny"

    runner = sdk.beta.messages.tool_runner(
        model="tiny",
        max_tokens=100,
        tools=[get_weather],
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        max_iterations=2,
        extra_body=GREEDY,
    )
    replies = [message async for message in runner]
    assert [m.stop_reason for m in replies] == ["tool_use", "tool_use"] and len(calls) == 2
    assert "thread" in sent[0]  # (the SDK's first try, refused)
    last = sent[-1]
    assert "thread" not in last and last["messages"][-1]["content"][0]["type"] == "tool_result"
    refused = await client.post(
        "/v1/messages",
        json={
            "model": "tiny",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "thread": {"type": "create"},
        },
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["details"] == {"error_code": "thread_unsupported_request"}


async def test_a_tool_use_cut_off_by_max_tokens_keeps_what_was_written(
    sdk: anthropic.AsyncAnthropic,
) -> None:
    message = await sdk.messages.create(
        model="tiny",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        max_tokens=3,
    )
    assert message.stop_reason == "max_tokens"
    assert [b.type for b in message.content] == ["tool_use"]
    assert isinstance(message.content[0].input, dict)


async def test_thinking_is_accepted_where_the_checkpoint_has_none(
    sdk: anthropic.AsyncAnthropic,
) -> None:
    """An -Instruct checkpoint never thinks: each thinking config answers with text only
    (a Qwen3 thinking checkpoint's blocks: tests/api/test_qwen3_api.py)."""
    for thinking in (
        {"type": "enabled", "budget_tokens": 2},  # (below max_tokens, as Anthropic's)
        {"type": "disabled"},
        {"type": "disabled", "budget_tokens": 1024},  # (a budget for no thinking: no check)
        {"type": "adaptive"},
    ):
        message = await sdk.messages.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=3,
            thinking=thinking,
            extra_body=GREEDY,  # (sampled, the first token was now and then an end)
        )
        assert [b.type for b in message.content] == ["text"]


async def test_any_tool_cut_off_by_max_tokens_is_a_partial_tool_use(
    sdk: anthropic.AsyncAnthropic, client: httpx.AsyncClient
) -> None:
    """tool_choice "any" decodes a list of calls under a grammar; cut off, the calls whose
    input began are tool_use blocks with what their input got (not the list's text)."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "any"},
        "max_tokens": 44,
    }
    message = await sdk.messages.create(**body, extra_body=GREEDY)
    assert message.stop_reason == "max_tokens"
    assert [b.type for b in message.content] == ["tool_use"], message.content
    assert message.content[0].name == "get_weather"
    assert isinstance(message.content[0].input, dict)
    async with sdk.messages.stream(**body, extra_body=GREEDY) as stream:
        streamed = await stream.get_final_message()
    assert [b.type for b in streamed.content] == ["tool_use"]
    # (the SDK's partial-JSON reading drops a string cut short; the whole answer keeps it)
    streamed_input = streamed.content[0].input
    assert isinstance(streamed_input, dict)
    assert streamed_input.items() <= message.content[0].input.items()


async def test_any_tool_cut_before_a_calls_input_is_no_block(
    sdk: anthropic.AsyncAnthropic,
) -> None:
    """tool_choice "any" cut off before a call's input began: no tool_use (a client would
    run it with no input) and no text (the list's JSON, `[{"name": "get_weather",`, is not
    an answer; Anthropic never answers "any" with text), streamed or not."""
    for max_tokens in (1, 4, 8):
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Weather?"}],
            "tools": [WEATHER],
            "tool_choice": {"type": "any"},
            "max_tokens": max_tokens,
            "extra_body": GREEDY,
        }
        message = await sdk.messages.create(**body)
        assert message.stop_reason == "max_tokens" and message.content == [], message
        async with sdk.messages.stream(**body) as stream:
            kinds = [sent.type async for sent in stream]
            streamed = await stream.get_final_message()
        assert streamed.content == [] and "content_block_start" not in kinds


async def test_any_tool_streams_its_input_as_the_whole_answer_has_it(
    sdk: anthropic.AsyncAnthropic,
) -> None:
    """tool_choice "any" (a list of calls under a grammar) streamed: each tool_use's
    input_json deltas join to its input, the one the whole answer holds (they once began with
    a stray "{}", which the SDK's accumulator read as an empty input)."""
    for parallel in (True, False):
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Weather?"}],
            "tools": [WEATHER],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": not parallel},
            "max_tokens": 200,
            "extra_body": GREEDY,
        }
        message = await sdk.messages.create(**body)
        assert message.stop_reason == "tool_use"
        inputs = [b.input for b in message.content if b.type == "tool_use"]
        assert inputs and all(set(i) == {"city"} for i in inputs), message.content
        async with sdk.messages.stream(**body) as stream:
            joined: dict[int, str] = {}
            async for sent in stream:
                if sent.type == "content_block_delta" and sent.delta.type == "input_json_delta":
                    joined[sent.index] = joined.get(sent.index, "") + sent.delta.partial_json
            streamed = await stream.get_final_message()
        assert [b.input for b in streamed.content if b.type == "tool_use"] == inputs
        assert [json.loads(text) for text in joined.values()] == inputs


async def test_a_video_sent_as_an_image_is_pointed_to_chat(client: httpx.AsyncClient) -> None:
    """Anthropic's blocks hold no video: a video in an image block is a 400 that says where a
    video goes (chat's video_url part), not chat's own hint (a part this API does not have)."""
    video = base64.b64encode(make_video(seconds=1)).decode()
    source = {"type": "base64", "media_type": "image/png", "data": video}
    content = [{"type": "image", "source": source}, {"type": "text", "text": "What happens?"}]
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    declared = {"type": "url", "url": "data:video/mp4;base64," + video}
    for sent in (source, declared):
        content[0]["source"] = sent
        response = await client.post("/v1/messages", json=body)
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert "messages[0].content[0]" in message and "no video blocks" in message, message
        assert "/v1/chat/completions as a video_url part" in message and "; send" not in message


async def test_images_in_a_tool_result_reach_the_model(
    sdk: anthropic.AsyncAnthropic, client: httpx.AsyncClient
) -> None:
    """An image in a tool result reaches the model inside the tool's response (the prompt
    holds its image tokens)."""
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "oslo"}}
    turns = [
        {"role": "user", "content": "Show me the sky."},
        {"role": "assistant", "content": [call]},
    ]
    text_only = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}
    with_image = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "text", "text": "sunny"}, image_block()],
    }
    only_image = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [image_block()]}
    counts = []
    for result in (text_only, with_image, only_image):
        counted = await sdk.messages.count_tokens(
            model="tiny", messages=[*turns, {"role": "user", "content": [result]}], tools=[WEATHER]
        )
        counts.append(counted.input_tokens)
    assert counts[1] > counts[0] and counts[2] > counts[0]
    message = await sdk.messages.create(
        model="tiny",
        messages=[*turns, {"role": "user", "content": [with_image]}],
        tools=[WEATHER],
        max_tokens=2,
    )
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == counts[1]
    # two calls at once, the first's result with an image
    second = {**call, "id": "toolu_2"}
    both = [
        {"role": "user", "content": "Show me the sky."},
        {"role": "assistant", "content": [call, second]},
        {
            "role": "user",
            "content": [with_image, {**text_only, "tool_use_id": "toolu_2"}],
        },
    ]
    message = await sdk.messages.create(model="tiny", messages=both, tools=[WEATHER], max_tokens=2)
    assert message.usage.input_tokens > 0
    # count_tokens takes no max_tokens: a thinking budget is not checked against one
    counted = await sdk.messages.count_tokens(
        model="tiny",
        messages=both,
        tools=[WEATHER],
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert counted.input_tokens > 0


async def test_the_request_id_is_where_the_sdk_reads_it(sdk: anthropic.AsyncAnthropic) -> None:
    message = await sdk.messages.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
    )
    assert message._request_id and len(message._request_id) >= 16


async def test_json_output_follows_the_schema(sdk: anthropic.AsyncAnthropic) -> None:
    for field in (
        {"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}},
        {"output_format": {"type": "json_schema", "schema": SCHEMA}},
    ):
        message = await sdk.messages.create(
            model="tiny",
            messages=[{"role": "user", "content": "A number?"}],
            max_tokens=40,
            extra_body=field,
        )
        assert message.stop_reason == "end_turn", message  # (bounded: it ends in 40 tokens)
        assert 0 <= json.loads(message.content[0].text)["n"] <= 99


async def test_count_tokens_is_the_messages_input(sdk: anthropic.AsyncAnthropic) -> None:
    body = {
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [image_block(), {"type": "text", "text": "?"}]}],
        "tools": [WEATHER],
    }
    counted = await sdk.messages.count_tokens(model="tiny", **body)
    assert isinstance(counted, MessageTokensCount)
    message = await sdk.messages.create(model="tiny", max_tokens=1, **body)
    usage = message.usage
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens


async def test_the_models_list_reads_as_anthropics(sdk: anthropic.AsyncAnthropic) -> None:
    page = await sdk.models.list()
    assert "tiny" in [model.id for model in page.data]
    for model in page.data:
        assert model.type == "model" and model.display_name == model.id
        assert model.created_at.year >= 2024
    assert page.has_more is False
    assert (page.first_id, page.last_id) == (page.data[0].id, page.data[-1].id)
    # the SDK's pager, a name a page: each once, in order, and it stops
    names = [model.id for model in page.data]
    assert [model.id async for model in await sdk.models.list(limit=1)] == names
    last = await sdk.models.list(limit=2, before_id=names[-1])
    assert [m.id for m in last.data] == names[-3:-1] and last.has_more == (len(names) > 3)
    assert (await sdk.models.list(after_id="nope")).data == []
    # errors on the routes both APIs share are in the envelope of the SDK that asks
    with pytest.raises(anthropic.NotFoundError) as missing:
        await sdk.models.retrieve("nope")
    assert missing.value.body["type"] == "error"  # type: ignore[index]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert missing.value.request_id  # (Anthropic's request-id header)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"max_tokens": None}, "max_tokens"),  # required, as Anthropic's
        ({"temperature": 1.5}, "temperature"),  # Anthropic's range: 0..1
        ({"surprise": 1}, "surprise"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "?"},
                            {"type": "image", "source": {"type": "file", "file_id": "file_1"}},
                        ],
                    }
                ]
            },
            "messages[0].content[1]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/tiff",
                                    "data": "AAAA",
                                },
                            },
                        ],
                    }
                ]
            },
            "messages[0].content[0].source.media_type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                        ],
                    }
                ]
            },
            "messages[0].content[0].tool_use_id",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "hi"},
                            {
                                "type": "image",
                                "source": {"type": "url", "url": "http://127.0.0.1:1/a.png"},
                            },
                        ],
                    }
                ]
            },
            "messages[0].content[1]",  # found by the chat route, named as this body has it
        ),
        ({"stop_sequences": ["x" * 1000]}, "stop_sequences"),
        # as Anthropic's: what a chat completion would take
        ({"stop_sequences": ["ok", " "]}, "stop_sequences"),
        ({"thinking": {"type": "enabled", "budget_tokens": 4}}, "thinking.budget_tokens"),
        (
            {
                "tools": [
                    {"name": "f", "input_schema": {"type": "object"}},
                    {"name": "f", "input_schema": {"type": "object"}},
                ]
            },
            "unique",
        ),
        ({"messages": [{"role": "user", "content": ""}]}, "messages.0"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": ""}]},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "b"},
                ]
            },
            "messages.0",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Sure: "},
                ]
            },
            "trailing whitespace",
        ),
        ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "object"),
        ({"system": [{"type": "text", "text": ""}]}, "system"),
        (  # an image inside a tool result, named where it is
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
                    },
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t1",
                                "is_error": True,
                                "content": [
                                    {"type": "text", "text": "shot"},
                                    {
                                        "type": "image",
                                        "source": {
                                            "type": "url",
                                            "url": "http://127.0.0.1:1/a.png",
                                        },
                                    },
                                ],
                            }
                        ],
                    },
                ],
                "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            },
            "messages[2].content[0].content[1]",
        ),
        # Anthropic's words for a prompt past the context, which its clients look for
        (
            {"messages": [{"role": "user", "content": "word " * 9000}]},
            "prompt is too long: 27044 tokens > 8192 maximum",
        ),
        ({"messages": [{"role": "user", "content": "word " * 90000}]}, "prompt is too long: "),
    ],
)
async def test_bad_requests_are_400s_in_anthropics_envelope(
    client: httpx.AsyncClient, change: dict, words: str
) -> None:
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    body = {k: v for k, v in (body | change).items() if v is not None}
    response = await client.post("/v1/messages", json=body)
    message = assert_anthropic_error(response, 400, "invalid_request_error")
    assert words in message


async def test_a_prompt_past_the_context_says_so_in_anthropics_words(
    client: httpx.AsyncClient,
) -> None:
    """Anthropic's clients match the start of these messages (to compact the conversation, or
    to lower max_tokens and retry)."""
    for text, words in (
        ("word " * 9000, "prompt is too long: 27044 tokens > 8192 maximum"),
        ("word " * 90000, "prompt is too long: "),
        ("word " * 1000, "input length and `max_tokens` exceed context limit: 3044 + 6000 > 8192"),
    ):
        body = {
            "model": "tiny",
            "max_tokens": 6000,
            "messages": [{"role": "user", "content": text}],
        }
        response = await client.post("/v1/messages", json=body)
        assert assert_anthropic_error(response, 400, "invalid_request_error").startswith(words)


async def test_the_sdk_raises_its_own_errors(sdk: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        await sdk.messages.create(
            model="nope", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        await sdk.messages.count_tokens(model="tiny", messages=[])
    assert "messages" in bad.value.body["error"]["message"]


async def test_other_routes_keep_openais_envelope(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "tiny"})
    assert set(response.json()) == {"error"}
    response = await client.post("/v1/messagesx", json={})
    assert set(response.json()) == {"error"}
    # Anthropic's SDK (anthropic-version) reads its own envelope, on a route not here too
    headers = {"anthropic-version": "2023-06-01"}
    response = await client.get("/v1/foo", headers=headers)
    assert_anthropic_error(response, 404, "not_found_error")
    # OpenAI's routes keep OpenAI's, whatever headers a gateway forwards
    response = await client.post("/v1/chat/completions", json={"model": "tiny"}, headers=headers)
    assert response.status_code == 400 and set(response.json()) == {"error"}


async def test_x_api_key_is_a_key(tiny_model_dir: Path) -> None:
    """Anthropic's SDK sends its key as x-api-key; a wrong one is a 401 in its envelope."""
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    async for client in start_client(make_settings(tiny_model_dir, api_keys=["k"])):
        good = anthropic_sdk(client, api_key="k")
        assert (await good.messages.create(**body)).type == "message"
        bearer = anthropic_sdk(client, auth_token="k")
        assert (await bearer.messages.create(**body)).type == "message"
        wrong = await client.post("/v1/messages", json=body, headers={"x-api-key": "bad"})
        assert_anthropic_error(wrong, 401, "authentication_error")
        chat = {"model": "tiny", "messages": body["messages"], "max_tokens": 2}
        response = await client.post("/v1/chat/completions", json=chat, headers={"x-api-key": "k"})
        assert response.status_code == 200


async def test_overloaded_is_anthropics_529(
    sdk: anthropic.AsyncAnthropic, client: httpx.AsyncClient
) -> None:
    """Our 503s (a full queue, a server shutting down) reach Anthropic's clients as its 529
    overloaded_error: the SDK raises OverloadedError; OpenAI's routes keep the 503."""
    app = client.app  # type: ignore[attr-defined]
    app.state.draining = True
    try:
        with pytest.raises(anthropic.OverloadedError) as overloaded:
            await sdk.messages.create(
                model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            )
        assert overloaded.value.status_code == 529
        assert overloaded.value.body["error"]["type"] == "overloaded_error"
        response = await client.post("/v1/chat/completions", json={"model": "tiny"})
        assert response.status_code == 503
    finally:
        app.state.draining = False


async def test_a_turn_of_thinking_alone_changes_nothing(client: httpx.AsyncClient) -> None:
    """A thinking block goes with its turn's text or tool_use (as that turn's reasoning); an
    assistant turn of thinking alone adds no turn (and makes no empty prefill)."""
    hi = {"role": "user", "content": "hi"}
    thought = {
        "role": "assistant",
        "content": [{"type": "thinking", "thinking": "T", "signature": ""}],
    }
    for messages in ([hi, thought], [hi, thought, {"role": "user", "content": "more"}]):
        body = {"model": "tiny", "max_tokens": 2, "messages": messages}
        response = await client.post("/v1/messages", json=body)
        assert response.status_code == 200, response.text
        without = [m for m in messages if m is not thought]
        counted = await client.post(
            "/v1/messages/count_tokens", json={**body, "messages": messages}
        )
        bare = await client.post("/v1/messages/count_tokens", json={**body, "messages": without})
        assert counted.json() == bare.json()


def test_stop_reasons() -> None:
    assert stop_of("length", None, True) == ("max_tokens", None)
    assert stop_of("stop", "##", True) == ("tool_use", None)
    assert stop_of("stop", "##", False) == ("stop_sequence", "##")
    assert stop_of("stop", 7, False) == ("end_turn", None)  # a stop token is not a sequence
    assert stop_of("stop", None, False) == ("end_turn", None)


def test_thinking_becomes_a_thinking_block() -> None:
    choice = ChoiceResult(
        0,
        "42",
        [ToolCall("call_1", "f", '{"a": 1}')],
        "tool_calls",
        None,
        None,
        reasoning_content="Let me see.",
    )
    blocks = content_blocks(choice, omit_thinking=False)
    assert [b["type"] for b in blocks] == ["thinking", "text", "tool_use"]
    assert blocks[0]["thinking"] == "Let me see." and blocks[2]["input"] == {"a": 1}
    assert blocks[2]["id"] == "toolu_1"  # (Anthropic's id form)
    assert content_blocks(choice, omit_thinking=True)[0]["thinking"] == ""
    cut = ChoiceResult(0, None, [ToolCall("call_1", "f", '{"a": "xy')], "length", None, None)
    assert content_blocks(cut, omit_thinking=False)[0]["input"] == {"a": "xy"}


async def test_an_empty_tools_list_is_no_tools(client: httpx.AsyncClient) -> None:
    """tools: [] (a framework with none registered) with auto or any/required is no tools,
    on /v1/messages and /v1/responses as on chat."""
    for choice in ({"type": "auto"}, {"type": "any"}):
        body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
        answer = await client.post(
            "/v1/messages", json={**body, "tools": [], "tool_choice": choice}
        )
        assert answer.status_code == 200, answer.text
    for choice in ("auto", "required"):
        body = {"model": "tiny", "input": "Hi", "max_output_tokens": 2}
        answer = await client.post(
            "/v1/responses", json={**body, "tools": [], "tool_choice": choice}
        )
        assert answer.status_code == 200, answer.text


async def test_a_block_whose_type_is_not_a_string_is_a_400(client: httpx.AsyncClient) -> None:
    """(Found by the OpenAPI fuzz test: it was a 500.)"""
    for block in ({"type": {}}, {"type": ["text"]}, {"type": None}, "text", {}):
        body = {"model": "tiny", "max_tokens": 2}
        body["messages"] = [{"role": "user", "content": [block]}]
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            response = await client.post(path, json=body)
            assert_anthropic_error(response, 400, "invalid_request_error")


async def test_priority_is_taken_as_chats(tiny_model_dir: Path) -> None:
    """vLLM's `priority` extension (it was an unrecognized argument here): run at it under
    --scheduling-policy priority; under fcfs a non-zero one is a 400, as chat's."""
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    for policy in ("priority", "fcfs"):
        settings = make_settings(tiny_model_dir, scheduling_policy=policy)
        async for client in start_client(settings):
            response = await client.post("/v1/messages", json={**body, "priority": -3})
            if policy == "priority":
                assert response.status_code == 200, response.text
            else:
                assert_anthropic_error(response, 400, "invalid_request_error")
                assert "priority" in response.json()["error"]["message"]


def test_a_failure_mid_stream_stops_the_open_block_then_sends_the_error() -> None:
    seq = Sequence(
        "r", ModelInputs({"input_ids": torch.tensor([[1, 2, 3]])}, 3, 0), SamplingParams(), 8
    )
    start = MessageObject(id="msg_x", model="tiny", content=[], usage=usage_of(ChatRun([seq])))
    events = MessageEvents(start, None, reasoning=False, omit=False)
    sent = events.begin() + events.feed(SequenceOutput("Hel", 1))
    sent += events.failed(EngineOverloaded("busy", retry_after_s=1), ChatRun([seq]))
    sent += events.failed(None, ChatRun([seq]))  # (a second failure: nothing left open)
    parsed = [json.loads(e.split("data: ", 1)[1]) for e in sent]
    kinds = [p["type"] for p in parsed]
    assert kinds == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "error",
        "error",
    ]
    assert parsed[5]["error"] == {"type": "overloaded_error", "message": "busy"}
    assert parsed[6]["error"]["type"] == "api_error"
    for event in [parsed[0], *parsed[2:-2]]:  # (the SDK has no type for a ping)
        TypeAdapter(RawMessageStreamEvent).validate_python(event)


def test_a_streamed_whole_call_sends_its_input_as_an_object() -> None:
    """A call the model wrote with arguments that are not an object: its input is {} in both
    forms (the SDK's accumulator parses the input_json as an object)."""
    tools = Tools((WEATHER_CHAT,), "auto", True)
    start = MessageObject(id="msg_x", model="tiny", content=[], usage={})
    events = MessageEvents(start, tools, reasoning=False, omit=False)
    text = '<tool_call>\n{"name": "get_weather", "arguments": "oslo"}\n</tool_call>'
    sent = events.feed(SequenceOutput(text, 5, True, "stop"))
    deltas = [json.loads(e.split("data: ", 1)[1]) for e in sent if "input_json_delta" in e]
    assert [d["delta"]["partial_json"] for d in deltas] == ["{}"]


def test_turns_pair_each_call_with_its_result() -> None:
    """A user turn's tool results go first (they answer the calls just before); text after a
    tool_use joins the assistant's message; a call without a result is a 400."""
    call = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}
    body = MessagesRequest.model_validate(
        {
            "model": "tiny",
            "max_tokens": 4,
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [call, {"type": "text", "text": "after"}]},
                {"role": "user", "content": [{"type": "text", "text": "note"}, result]},
            ],
        }
    )
    roles = [m["role"] for m in body.to_chat_body()["messages"]]
    assert roles == ["user", "assistant", "tool", "user"]
    unanswered = MessagesRequest.model_validate(
        {
            "model": "tiny",
            "max_tokens": 4,
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [call]},
            ],
        }
    )
    with pytest.raises(InvalidRequest) as refused:
        unanswered.to_chat_body()
    assert refused.value.param == "messages[1].content[0].id"


async def test_ignore_eos_is_taken_as_chats(client: httpx.AsyncClient) -> None:
    """vLLM's `ignore_eos`, which benchmark clients (aiperf's --extra-inputs) send to every
    endpoint: the answer runs to max_tokens, as the chat completion's does (it was a 400)."""
    body = {"model": "tiny", "max_tokens": 24, "messages": [{"role": "user", "content": "Hi"}]}
    response = await client.post("/v1/messages", json={**body, "ignore_eos": True, **GREEDY})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["usage"]["output_tokens"] == 24 and answer["stop_reason"] == "max_tokens"
    chat = await client.post(
        "/v1/chat/completions",
        json={**body, "ignore_eos": True, **GREEDY},
    )
    assert answer["content"][0]["text"] == chat.json()["choices"][0]["message"]["content"]
    bad = await client.post("/v1/messages", json={**body, "ignore_eos": "yes please"})
    assert_anthropic_error(bad, 400, "invalid_request_error")
