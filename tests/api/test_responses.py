"""OpenAI's Responses API through the official openai client: the same answer and usage as the
chat completion it is, images, instructions, function calls (and their results in the next
input), JSON output, the streamed events as the SDK accumulates them, and the refusals."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from pydantic import TypeAdapter

from server.api.responses import ResponseEvents, ResponseObject, ResponsesRequest
from server.engine.inputs import ModelInputs
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence, SequenceOutput
from server.exceptions import InvalidRequest, ServerError
from server.pipelines.chat import ChatRun
from tests.api.test_errors import assert_error
from tests.helpers import data_uri, make_image

pytestmark = pytest.mark.anyio

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["n"],
    "additionalProperties": False,
}


IMAGE_PART = {"type": "input_image", "image_url": "https://example.com/a.png"}


@pytest.fixture
def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )


def image_input(question: str) -> list[dict]:
    image = {"type": "input_image", "image_url": data_uri(make_image(96, 64)), "detail": "low"}
    return [{"role": "user", "content": [{"type": "input_text", "text": question}, image]}]


async def test_the_answer_is_the_chat_completions(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(
        model="tiny",
        instructions="Be brief.",
        input=image_input("What is in this image?"),
        max_output_tokens=6,
        temperature=0,
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {
                    "type": "image_url",
                    "image_url": {"url": data_uri(make_image(96, 64)), "detail": "low"},
                },
            ],
        },
    ]
    chat = await sdk.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == "tiny" and response.instructions == "Be brief."
    assert response.output_text == chat.choices[0].message.content
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == chat.usage.total_tokens
    if chat.choices[0].finish_reason == "length":
        assert response.status == "incomplete" and message.status == "incomplete"
        assert response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed"


async def test_input_tokens_count_is_the_responses_input_tokens(sdk: openai.AsyncOpenAI) -> None:
    """client.responses.input_tokens.count: the prompt built, its image read, nothing run."""
    body = {"instructions": "Be brief.", "input": image_input("What is it?"), "tools": [WEATHER]}
    counted = await sdk.responses.input_tokens.count(**body)  # model optional
    assert counted.object == "response.input_tokens"
    response = await sdk.responses.create(model="tiny", max_output_tokens=1, **body)
    assert counted.input_tokens == response.usage.input_tokens
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.responses.input_tokens.count(input="x", previous_response_id="resp_1")
    assert missing.value.body["param"] == "previous_response_id"
    assert missing.value.body["code"] == "previous_response_not_found"


async def test_function_tools_are_echoed_with_every_field(client: httpx.AsyncClient) -> None:
    """The response's tools carry FunctionTool's required fields (OpenAI's OpenAPI types, which
    typed clients decode by): a strict or description left out is echoed, as applied: null,
    false (not strict: a forced call follows the schema as far as the grammar goes)."""
    bare = {"type": "function", "name": "now", "parameters": {"type": "object"}}
    body = {"model": "tiny", "input": "Hi", "tools": [WEATHER, bare], "max_output_tokens": 2}
    response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    echoed = response.json()["tools"]
    assert echoed[0] == {**WEATHER, "strict": False}
    assert echoed[1] == {**bare, "description": None, "strict": False}
    strict = {**bare, "strict": True, "description": "The time."}
    response = await client.post("/v1/responses", json={**body, "tools": [strict]})
    assert response.json()["tools"] == [strict]


async def test_compaction_is_named_as_not_served(sdk: openai.AsyncOpenAI) -> None:
    """The SDK's responses.compact: a 400 that says so, not a bare 405 from the path of a
    response's id."""
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.responses.compact(model="tiny", input="Hi")
    assert refused.value.code == "unsupported_endpoint"
    assert "Compaction" in refused.value.message


async def test_listed_input_items_are_the_sdks_types(client: httpx.AsyncClient) -> None:
    """Input items read back (an assistant's string content, a function call and its output)
    carry what the SDK's types require: output_text's annotations, the items' status."""
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}
    items = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look."},
        call,
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ]
    body = {"model": "tiny", "input": items, "tools": [WEATHER], "max_output_tokens": 2}
    response = (await client.post("/v1/responses", json=body)).json()
    listed = (await client.get(f"/v1/responses/{response['id']}/input_items?order=asc")).json()
    ResponseItemList.model_validate(listed, strict=True)
    said = listed["data"][1]["content"][0]
    assert said == {"type": "output_text", "text": "Let me look.", "annotations": []}
    assert [item.get("status") for item in listed["data"]] == ["completed"] * 4


async def test_unknown_responses_are_a_404_that_says_why(sdk: openai.AsyncOpenAI) -> None:
    for call in (
        sdk.responses.retrieve("resp_1"),
        sdk.responses.delete("resp_1"),
        sdk.responses.cancel("resp_1"),
        sdk.responses.input_items.list("resp_1"),
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            await call
        assert missing.value.body["code"] == "response_not_found"
        assert "not found" in missing.value.body["message"]


async def test_the_sdks_own_types_validate_what_is_sent(client: httpx.AsyncClient) -> None:
    """Strict validation with the SDK's models (the SDK itself builds them unchecked)."""
    body = {"model": "tiny", "input": image_input("Describe."), "max_output_tokens": 4}
    body |= {"include": ["message.output_text.logprobs"], "top_logprobs": 2}
    Response.model_validate((await client.post("/v1/responses", json=body)).json())
    events = TypeAdapter(ResponseStreamEvent)
    async with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                events.validate_python(json.loads(line[6:]))


async def test_the_response_echoes_the_hints_it_was_sent(sdk: openai.AsyncOpenAI) -> None:
    """As OpenAI's response object shows them (they change nothing here)."""
    plain = await sdk.responses.create(model="tiny", input="Hi", max_output_tokens=2)
    assert (plain.service_tier, plain.top_logprobs, plain.prompt_cache_key) == ("default", 0, None)
    assert plain.safety_identifier is None and plain.max_tool_calls is None
    hinted = await sdk.responses.create(
        model="tiny",
        input="Hi",
        max_output_tokens=2,
        service_tier="flex",
        prompt_cache_key="k1",
        safety_identifier="user-1",
        top_logprobs=3,
        include=["message.output_text.logprobs"],
        prompt_cache_retention="24h",
        prompt_cache_options={"mode": "implicit"},
        background_options={"completion_window": "soonest"},
        image={"context_compression": "auto"},
        access_programs={"cyber": "standard"},
    )
    assert (hinted.service_tier, hinted.top_logprobs) == ("flex", 3)
    assert (hinted.prompt_cache_key, hinted.safety_identifier) == ("k1", "user-1")
    assert hinted.prompt_cache_retention == "24h"
    # what would need work this server does not do is refused, naming the field
    for field, value in [("moderation", {"model": "m"}), ("context_management", [{"type": "c"}])]:
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.responses.create(model="tiny", input="Hi", **{field: value})
        assert refused.value.body["param"] == field
        assert refused.value.body["code"] == "unsupported_parameter"


async def test_allowed_tools_as_the_responses_api_names_them(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    """tool_choice {"type": "allowed_tools", "mode", "tools": [{"type": "function", "name"}]}:
    only those may be called (chat's allowed_tools), echoed as sent; errors name its fields."""
    other = {**WEATHER, "name": "get_time", "parameters": {"type": "object"}}
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "get_time"}],
    }
    response = await sdk.responses.create(
        model="tiny",
        input="What time is it?",
        tools=[WEATHER, other],  # type: ignore[list-item]
        tool_choice=choice,  # type: ignore[arg-type]
        max_output_tokens=200,
        temperature=0,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and {call.name for call in calls} == {"get_time"}  # type: ignore[union-attr]
    assert response.tool_choice.model_dump() == choice  # type: ignore[union-attr]
    bad = {**choice, "tools": [{"type": "function", "name": "nope"}]}
    body = {"model": "tiny", "input": "Hi", "tools": [WEATHER], "tool_choice": bad}
    assert_error(await client.post("/v1/responses", json=body), 400, "tool_choice.tools[0].name")


async def test_a_string_input_is_one_user_message(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(
        model="tiny", input="Hi", max_output_tokens=3, temperature=0, store=False
    )
    chat = await sdk.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert response.output_text == chat.choices[0].message.content


async def test_function_calls_and_their_results(sdk: openai.AsyncOpenAI) -> None:
    tool_choice = {"type": "function", "name": "get_weather"}
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    response = await sdk.responses.create(
        model="tiny",
        input=question,
        tools=[WEATHER],
        tool_choice=tool_choice,
        temperature=0,
        max_output_tokens=100,
    )
    assert response.status == "completed"
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert set(json.loads(call.arguments)) == {"city"}
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    follow_up = await sdk.responses.create(
        model="tiny",
        input=[*question, call.model_dump(exclude_none=True), result],
        tools=[WEATHER],
        max_output_tokens=3,
    )
    assert follow_up.output[0].type == "message"
    assert follow_up.usage.input_tokens > response.usage.input_tokens


async def test_a_call_cut_off_by_max_output_tokens_is_incomplete(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    """Its item says incomplete (streamed too), and it may be sent back as it is (OpenAI
    takes it: frameworks do, and a 400 stuck their loops), with its output as any call."""
    body = {
        "model": "tiny",
        "input": "Weather?",
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 3,
    }
    response = await sdk.responses.create(**body)
    (call,) = response.output
    assert response.status == "incomplete" and call.status == "incomplete"
    assert response.completed_at is None  # (OpenAI's: set once completed)
    async with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
        lines = [line async for line in stream.aiter_lines() if line.startswith("data: ")]
    done = [json.loads(line[6:]) for line in lines]
    item = next(e["item"] for e in done if e["type"] == "response.output_item.done")
    assert item["status"] == "incomplete"
    again = [{"role": "user", "content": "Weather?"}, call.model_dump(exclude_none=True)]
    response = await client.post("/v1/responses", json={**body, "input": again})
    assert_error(response, 400, "input")  # (no output for the call)
    assert "No tool output found" in response.json()["error"]["message"]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    response = await client.post("/v1/responses", json={**body, "input": [*again, output]})
    assert response.status_code == 200, response.text


async def test_a_call_output_needs_its_call(client: httpx.AsyncClient) -> None:
    output = {"type": "function_call_output", "call_id": "call_zz", "output": "sunny"}
    body = {"model": "tiny", "input": [{"role": "user", "content": "w?"}, output]}
    assert_error(await client.post("/v1/responses", json=body), 400, "input[1].call_id")


async def test_errors_in_the_input_name_its_items(client: httpx.AsyncClient) -> None:
    """An error found while reading the conversation names the input item it is in (not the
    chat message it became: instructions and calls shift those)."""
    bad_image = {"type": "input_image", "image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    body = {
        "model": "tiny",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": "first"},
            call,
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
            {"role": "user", "content": [{"type": "input_text", "text": "this:"}, bad_image]},
        ],
    }
    error = assert_error(await client.post("/v1/responses", json=body), 400, "input[3].content[1]")
    assert "input[3].content[1]" in error["message"] and "messages" not in error["message"]
    # A function's output may hold images (read in a user turn after the tool message): a
    # bad one is named where it is in the output.
    body["input"][3] = {"role": "user", "content": "and?"}
    text = {"type": "input_text", "text": "the chart:"}
    output = [text, bad_image]
    body["input"][2] = {"type": "function_call_output", "call_id": "c1", "output": output}
    assert_error(await client.post("/v1/responses", json=body), 400, "input[2].output[1]")
    # a name of the client's own is left as it is
    odd = {"type": "function_call_output", "call_id": "messages[0]", "output": "x"}
    body["input"] = [{"role": "user", "content": "hi"}, odd]
    error = assert_error(await client.post("/v1/responses", json=body), 400, "input[1].call_id")
    assert "'messages[0]'" in error["message"]


async def test_a_function_output_may_hold_images(client: httpx.AsyncClient) -> None:
    """OpenAI's function_call_output takes images (input_image, input_file): the model reads
    them inside the tool's response."""
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    image = {"type": "input_image", "image_url": data_uri(make_image(96, 64)), "detail": "low"}
    text = {"type": "input_text", "text": "the chart:"}

    async def prompt(output: object) -> int:
        result = {"type": "function_call_output", "call_id": "c1", "output": output}
        body = {"model": "tiny", "input": [{"role": "user", "content": "go"}, call, result]}
        response = await client.post("/v1/responses/input_tokens", json=body)
        assert response.status_code == 200, response.text
        return response.json()["input_tokens"]

    with_image = await prompt([text, image])
    assert with_image > await prompt([text]) and with_image == await prompt([image, text])


async def test_sampling_and_cache_salt(client: httpx.AsyncClient) -> None:
    """The temperature and top_p used are echoed (OpenAI's defaults when left out); vLLM's
    cache_salt keeps the prefix cache apart here too."""
    body = {"model": "tiny", "input": "x" * 80, "max_output_tokens": 1}
    answers = [
        (await client.post("/v1/responses", json={**body, "cache_salt": salt})).json()
        for salt in ("s1", "s1", "s2")
    ]
    assert (answers[0]["temperature"], answers[0]["top_p"]) == (1.0, 1.0)
    cached = [a["usage"]["input_tokens_details"]["cached_tokens"] for a in answers]
    assert cached[1] > 0 and cached[2] == 0


async def test_vllms_sampling_extensions_are_the_chat_completions(
    client: httpx.AsyncClient,
) -> None:
    """vLLM's Responses API takes its chat extensions (`vllm bench serve --backend
    openai-responses` sends ignore_eos): each shapes the answer as it shapes a chat
    completion's; a bad value is the chat's 400, named as sent."""
    extras = {
        "seed": 7,
        "top_k": 5,
        "min_p": 0.01,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "logit_bias": {"11": 5},
        "ignore_eos": True,
        "stop_token_ids": [3],
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "request_id": "bench-1",
    }
    response = await client.post(
        "/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 12, **extras}
    )
    chat = await client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 12,
            **extras,
        },
    )
    assert response.status_code == chat.status_code == 200, response.text
    answer, expected = response.json(), chat.json()
    assert answer["output"][0]["content"][0]["text"] == expected["choices"][0]["message"]["content"]
    assert answer["usage"]["output_tokens"] == expected["usage"]["completion_tokens"]
    stopped = await client.post(
        "/v1/responses",
        json={"model": "tiny", "input": "hi", "max_output_tokens": 12, "seed": 7, "stop": ["e"]},
    )
    assert "e" not in stopped.json()["output"][0]["content"][0]["text"]
    # structured_outputs with its aliased key (json), as chat takes it
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    constrained = await client.post(
        "/v1/responses",
        json={
            "model": "tiny",
            "input": "hi",
            "max_output_tokens": 40,
            "seed": 1,
            "structured_outputs": {"json": schema},
        },
    )
    assert constrained.status_code == 200, constrained.text
    text = constrained.json()["output"][0]["content"][0]["text"]
    assert constrained.json()["status"] == "incomplete" or "n" in json.loads(text)
    # chat's stream_options.include_usage, which aiperf sends with --use-server-token-count
    # (a 400 failed every request): no effect, a streamed response's usage is in its last event
    streamed = await client.post(
        "/v1/responses",
        json={
            "model": "tiny",
            "input": "hi",
            "max_output_tokens": 12,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extras,
        },
    )
    assert streamed.status_code == 200, streamed.text
    events = [json.loads(line[6:]) for line in streamed.text.split("\n") if line[:6] == "data: "]
    assert events[-1]["type"] == "response.incomplete"  # (max_output_tokens, with ignore_eos)
    assert events[-1]["response"]["usage"]["output_tokens"] == 12
    for field, value in (("top_k", -2), ("stop_token_ids", [10**6]), ("logit_bias", {"x": 1})):
        bad = await client.post(
            "/v1/responses", json={"model": "tiny", "input": "hi", field: value}
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"].startswith(field), bad.text


async def test_logprobs_as_chat_computes_them(client: httpx.AsyncClient) -> None:
    """include message.output_text.logprobs (and top_logprobs): every answer token's entry,
    the same as chat's; streamed, the deltas' entries add up to the done event's."""
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 5, "temperature": 0}
    body |= {"include": ["message.output_text.logprobs"], "top_logprobs": 2}
    response = (await client.post("/v1/responses", json=body)).json()
    logprobs = response["output"][0]["content"][0]["logprobs"]
    assert len(logprobs) == response["usage"]["output_tokens"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in logprobs)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    chat |= {"temperature": 0, "logprobs": True, "top_logprobs": 2}
    expected = (await client.post("/v1/chat/completions", json=chat)).json()
    assert logprobs == expected["choices"][0]["logprobs"]["content"]
    async with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
        events = [
            json.loads(line[6:]) async for line in stream.aiter_lines() if line.startswith("data:")
        ]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert [entry for d in deltas for entry in d["logprobs"]] == done["logprobs"] == logprobs
    plain = (await client.post("/v1/responses", json={**body, "include": []})).json()
    assert plain["output"][0]["content"][0]["logprobs"] == []
    # An answer that ends on EOS: its entry (a token with no text) is the message's too.
    schema = {"type": "json_schema", "name": "n", "schema": SCHEMA}
    ended = {**body, "text": {"format": schema}, "max_output_tokens": 40}
    whole = (await client.post("/v1/responses", json=ended)).json()
    assert whole["status"] == "completed"
    async with client.stream("POST", "/v1/responses", json={**ended, "stream": True}) as stream:
        lines = [line async for line in stream.aiter_lines() if line.startswith("data:")]
    done = next(
        e for e in map(lambda x: json.loads(x[6:]), lines) if e["type"].endswith("text.done")
    )
    assert done["logprobs"] == whole["output"][0]["content"][0]["logprobs"]
    assert len(done["logprobs"]) == whole["usage"]["output_tokens"]


async def test_json_schema_output(sdk: openai.AsyncOpenAI) -> None:
    text = {"format": {"type": "json_schema", "name": "n", "schema": SCHEMA, "strict": True}}
    response = await sdk.responses.create(
        model="tiny", input="A number?", text=text, max_output_tokens=40, temperature=0.7
    )
    assert response.status == "completed"
    assert set(json.loads(response.output_text)) == {"n"}
    assert response.text.format.type == "json_schema" and response.text.verbosity == "medium"


async def test_streamed_events_as_the_sdk_accumulates_them(sdk: openai.AsyncOpenAI) -> None:
    """The SDK's own accumulator (responses.stream) rebuilds the non-streamed response."""
    body = {
        "model": "tiny",
        "input": "Weather in Oslo?",
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "temperature": 0,
        "max_output_tokens": 100,
    }
    whole = await sdk.responses.create(**body)
    async with sdk.responses.stream(**body) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [event.type for event in events]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.name == "get_weather"  # type: ignore[union-attr]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds
    assert final.output[0].arguments == whole.output[0].arguments
    assert final.usage.output_tokens == whole.usage.output_tokens


async def test_a_namespaces_functions_are_called_by_name_and_namespace(
    client: httpx.AsyncClient,
) -> None:
    """A namespace tool (Codex sends its MCP servers' tools so): its functions are offered
    to the model as namespace__name and their calls come back under their own name with the
    namespace, streamed or not, and go back into the prompt as they were offered; Codex's
    client_metadata and a function's defer_loading change nothing."""
    echo = {"type": "function", "name": "echo", "defer_loading": False, "strict": False}
    echo["parameters"] = {"type": "object", "properties": {"text": {"type": "string"}}}
    namespace = {"type": "namespace", "name": "mcp__demo", "description": "Demo.", "tools": [echo]}
    body = {
        "model": "tiny",
        "input": "Echo hi",
        "tools": [WEATHER, namespace],
        "tool_choice": {
            "type": "allowed_tools",
            "mode": "required",
            "tools": [{"type": "function", "name": "mcp__demo__echo"}],
        },
        "max_output_tokens": 60,
        "temperature": 0,
        "client_metadata": {"thread_id": "t1", "turn_id": "u1"},
    }
    response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    (call,) = [item for item in response.json()["output"] if item["type"] == "function_call"]
    assert (call["name"], call["namespace"]) == ("echo", "mcp__demo"), call
    async with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
        events = [
            json.loads(line[6:]) async for line in stream.aiter_lines() if line[:6] == "data: "
        ]
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(i["name"], i.get("namespace")) for i in added if i["type"] == "function_call"] == [
        ("echo", "mcp__demo")
    ]
    assert done[0]["name"] == "echo"
    ends = ("response.completed", "response.incomplete")  # (the tiny model's string may run on)
    (final,) = [e["response"] for e in events if e["type"] in ends]
    assert [i for i in final["output"] if i["type"] == "function_call"][0]["arguments"] == call[
        "arguments"
    ]
    # the call and its output back in the next input: offered to the model as it was
    sent_back = {k: call[k] for k in ("type", "call_id", "name", "arguments", "namespace")}
    history = [{"role": "user", "content": "Echo hi"}, sent_back]
    history.append({"type": "function_call_output", "call_id": call["call_id"], "output": "hi"})
    counted = {"model": "tiny", "tools": [namespace], "input": history}
    with_namespace = await client.post("/v1/responses/input_tokens", json=counted)
    history[1] = {**history[1], "namespace": None}
    bare = await client.post("/v1/responses/input_tokens", json=counted)
    assert with_namespace.json()["input_tokens"] > bare.json()["input_tokens"]
    answer = await client.post("/v1/responses", json={**body, "input": history})
    assert answer.status_code == 200, answer.text


async def test_namespace_tools_name_their_errors_and_clashes(client: httpx.AsyncClient) -> None:
    """Functions offered by one name are a 400 naming both (a call would not say which);
    a namespace and name too long together, a bad schema inside a namespace, a bad field in
    one: each named where it is in the request (chat's flattened tools[k] mapped back); a
    choice names a namespace's function by name and namespace."""

    def function(name: str, **extra: object) -> dict:
        return {"type": "function", "name": name, "parameters": {"type": "object"}, **extra}

    def space(name: str, *functions: dict, **extra: object) -> dict:
        return {"type": "namespace", "name": name, "tools": list(functions), **extra}

    long = "n" * 40
    unique = {"type": "array", "uniqueItems": True}  # (strict: cannot be enforced, a 400)
    schema = {"type": "object", "properties": {"a": unique}, "required": ["a"]}
    bad = function("bad", strict=True, parameters=schema | {"additionalProperties": False})
    for tools, param, words in (
        ([function("echo"), function("echo")], "tools[1].name", "as tools[0] is"),
        (
            [space("a", function("b__c")), space("a__b", function("c"))],
            "tools[1].tools[0].name",
            "'a__b__c'",
        ),
        (
            [function("mcp__x__echo"), space("mcp__x", function("echo"))],
            "tools[1].tools[0].name",
            "unique",
        ),
        ([space(long, function("e"), function("f" * 30))], "tools[0].tools[1].name", "fit 62"),
        ([space("x", function("ok"), extra=1)], "tools[0].extra", ""),
        ([space("x", {"type": "custom", "name": "p"})], "tools[0].tools[0].type", ""),
        ([{"type": {}}], "tools[0].type", ""),  # (an unhashable type was a 500)
    ):
        body = {"model": "tiny", "input": "Hi", "max_output_tokens": 2, "tools": tools}
        error = assert_error(await client.post("/v1/responses", json=body), 400, param)
        assert words in error["message"], error
    tools = [space("x", function("ok"), bad), function("echo")]
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 2, "tools": tools}
    body["tool_choice"] = {"type": "function", "name": "bad", "namespace": "x"}
    assert_error(await client.post("/v1/responses", json=body), 400, "tools[0].tools[1].parameters")
    tools = [space("mcp__demo_", function("_echo")), function("get_time")]  # (Codex's trims)
    choice = {"type": "function", "name": "_echo", "namespace": "mcp__demo_"}
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 30, "tools": tools}
    answer = await client.post("/v1/responses", json={**body, "tool_choice": choice})
    assert answer.status_code == 200, answer.text
    (call,) = answer.json()["output"]
    assert (call["name"], call["namespace"]) == ("_echo", "mcp__demo_")
    assert answer.json()["tool_choice"] == choice
    flat = {"type": "function", "name": "mcp__demo__echo"}  # (the name it is offered by)
    assert (
        await client.post("/v1/responses", json={**body, "tool_choice": flat})
    ).status_code == 200


async def test_streamed_text_and_its_sequence_numbers(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "input": image_input("Describe."), "max_output_tokens": 5}
    whole = (await client.post("/v1/responses", json={**body, "temperature": 0})).json()
    events = []
    async with client.stream(
        "POST", "/v1/responses", json={**body, "temperature": 0, "stream": True}
    ) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert text == done["text"] == whole["output"][0]["content"][0]["text"]
    last = events[-1]
    assert last["type"] in ("response.completed", "response.incomplete")
    assert last["response"]["output"][0]["content"][0]["text"] == text
    usage, expected = last["response"]["usage"], whole["usage"]
    for key in ("input_tokens", "output_tokens", "total_tokens"):  # (cached ones may differ)
        assert usage[key] == expected[key]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"store": "yes"}, "store"),
        ({"include": ["message.output_text.logprobs", "file_search_call.results"]}, "include[1]"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{**WEATHER, "bogus": 1}]}, "tools[0].bogus"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": []}]}, "tools[1].type"),
        ({"input": []}, "input"),
        ({"input": [{"type": "reasoning"}]}, "input"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),  # past the context
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, "input[0].content[0]"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
            "tool_choice.name",
        ),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}},
            "text.format",
        ),
        (
            {"input": [{"role": "assistant", "content": [IMAGE_PART]}]},
            "input[0].content[0]",
        ),
        # OpenAI's limits: 16 metadata pairs (keys to 64 characters, values to 512), a
        # format's name of letters, digits, _ and -
        ({"service_tier": "bogus"}, "service_tier"),  # (OpenAI's five only)
        ({"metadata": {f"k{n}": "v" for n in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        (
            {"text": {"format": {"type": "json_schema", "name": "bad name!", "schema": SCHEMA}}},
            "text.format.name",
        ),
    ],
)
async def test_what_cannot_be_honoured_is_a_400(
    client: httpx.AsyncClient, extra: dict, param: str
) -> None:
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 2, **extra}
    error = assert_error(await client.post("/v1/responses", json=body), 400, param)
    if param.startswith("tools") and param.endswith(".type"):  # a hosted tool: not here
        assert error["code"] == "unsupported_parameter" and "not available" in error["message"]


def test_a_failure_mid_stream_closes_what_was_sent() -> None:
    """The open message is closed with the text sent so far, then `error` and
    `response.failed` carry the output and its usage."""
    seq = Sequence(
        "r", ModelInputs({"input_ids": torch.tensor([[1, 2, 3]])}, 3, 0), SamplingParams(), 8
    )
    seq.output_token_ids += [5, 6]
    body = ResponsesRequest(model="tiny", input="Hi")
    events = ResponseEvents(
        ResponseObject.start("resp_x", body, SamplingParams(), store=True), None, reasoning=False
    )
    sent = events.begin() + events.feed(SequenceOutput("Hel", 2))
    sent += events.failed(ServerError("boom"), ChatRun([seq]))
    error = {"code": "server_error", "message": "boom", "param": None}
    parsed = [json.loads(e.split("data: ", 1)[1]) for e in sent]
    kinds = [p["type"] for p in parsed]
    assert kinds[-5:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "error",
        "response.failed",
    ]
    failed = parsed[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == {**error, "type": "server_error"}
    assert parsed[-2] == {
        "type": "error",
        "sequence_number": parsed[-2]["sequence_number"],
        **error,
    }
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "Hel"
    assert failed["usage"]["input_tokens"] == 3 and failed["usage"]["output_tokens"] == 2
    for event in parsed:
        TypeAdapter(ResponseStreamEvent).validate_python(event)
    # a request's own mistake: the error event has this server's code, the failed response
    # OpenAI's nearest (its SDK's enum), with the error's type and param
    refused = InvalidRequest("bad schema", param="text.format", code="invalid_schema")
    again = ResponseEvents(
        ResponseObject.start("resp_y", body, SamplingParams(), store=True), None, reasoning=False
    )
    sent = again.begin() + again.failed(refused, ChatRun([seq]))
    parsed = [json.loads(e.split("data: ", 1)[1]) for e in sent]
    assert parsed[-2]["code"] == "invalid_schema"
    assert parsed[-1]["response"]["error"] == {
        "code": "invalid_prompt",
        "message": "bad schema",
        "param": "text.format",
        "type": "invalid_request_error",
    }
    Response.model_validate(parsed[-1]["response"], strict=True)


async def test_return_image_sizes_on_a_response(client: httpx.AsyncClient) -> None:
    """A Responses computer-use loop learns the sizes its screenshots were read at (Qwen2.5-VL's
    boxes are in them), as chat does: in the response, streamed or not; left out unless
    asked."""
    screen = {"type": "input_image", "image_url": data_uri(make_image(1600, 900)), "detail": "auto"}
    call = {"type": "function_call", "call_id": "c1", "name": "click", "arguments": "{}"}
    result = {"type": "function_call_output", "call_id": "c1", "output": [screen]}
    body = {"model": "tiny", "input": [{"role": "user", "content": "go"}, call, result]}
    body |= {"max_output_tokens": 2, "return_image_sizes": True}
    answer = (await client.post("/v1/responses", json=body)).json()
    assert answer["image_sizes"] == [{"width": 1316, "height": 728}]
    stored = (await client.get(f"/v1/responses/{answer['id']}")).json()
    assert stored["image_sizes"] == answer["image_sizes"]
    async with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
        events = [
            json.loads(line[6:]) async for line in stream.aiter_lines() if line[:6] == "data: "
        ]
    assert events[-1]["response"]["image_sizes"] == answer["image_sizes"]
    plain = {key: value for key, value in body.items() if key != "return_image_sizes"}
    assert "image_sizes" not in (await client.post("/v1/responses", json=plain)).json()
