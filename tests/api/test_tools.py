"""Tool calling through the official openai client: a named or required tool_choice decodes
under the function's JSON schema, so even a random-weight model's arguments parse; auto
renders the tools in the prompt; tool calls and results in the history; the refusals."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.api.test_errors import assert_error
from tests.helpers import data_uri, make_image

pytestmark = pytest.mark.anyio

SHORT_TEXT = {"type": "string", "pattern": '^[^\\x00-\\x1f"\\\\]{1,12}$'}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": SHORT_TEXT,
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": SHORT_TEXT},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture
def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )


def check_weather(arguments: str) -> None:
    value = json.loads(arguments)
    assert set(value) == {"city", "unit"} and value["unit"] in ("celsius", "fahrenheit")
    assert isinstance(value["city"], str) and 1 <= len(value["city"]) <= 12


async def test_named_tool_choice(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice=NAMED,
        max_tokens=200,
        temperature=0.8,
        seed=1,
    )
    choice = response.choices[0]
    # OpenAI's (and vLLM's) finish_reason for a named choice: stop (the caller asked for it)
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    check_weather(call.function.arguments)


async def test_named_tool_choice_streamed_as_the_sdk_accumulates(sdk: openai.AsyncOpenAI) -> None:
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "tools": [WEATHER, TIME],
        "tool_choice": NAMED,
        "max_tokens": 200,
        "temperature": 0.8,
        "seed": 2,
    }
    full = await sdk.chat.completions.create(**body)
    state = ChatCompletionStreamState()
    async for chunk in await sdk.chat.completions.create(**body, stream=True):
        state.handle_chunk(chunk)
    streamed = state.get_final_completion().choices[0]
    assert streamed.finish_reason == "stop"  # as the whole answer's
    # the answer is the call: no content, as in the whole answer (OpenAI's null, not "")
    assert streamed.message.content is None and full.choices[0].message.content is None
    (call,) = streamed.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert call.function.arguments == full.choices[0].message.tool_calls[0].function.arguments
    check_weather(call.function.arguments)


async def test_a_forced_call_beside_a_response_format_is_the_call(
    client: httpx.AsyncClient,
) -> None:
    """instructor's Responses modes force the tool and mirror its schema in the text format
    (OpenAI takes the pair; it was a 400 here): the answer is the call, on both APIs."""
    schema = WEATHER["function"]["parameters"]
    json_schema = {"name": "get_weather", "schema": schema, "strict": True}
    for choice in (NAMED, "required"):
        body = {
            "model": "tiny",
            "messages": MESSAGES,
            "tools": [WEATHER],
            "tool_choice": choice,
            "response_format": {"type": "json_schema", "json_schema": json_schema},
            "max_tokens": 200,
            "seed": 4,
        }
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        calls = response.json()["choices"][0]["message"]["tool_calls"]
        assert calls and all(call["function"]["name"] == "get_weather" for call in calls)
        for call in calls:
            check_weather(call["function"]["arguments"])
        # the format is left aside, not unchecked: one that cannot be used is still its 400
        broken = {"name": "w", "schema": {"$ref": "#/nope"}, "strict": True}
        body["response_format"] = {"type": "json_schema", "json_schema": broken}
        response = await client.post("/v1/chat/completions", json=body)
        assert_error(response, 400, "response_format", "invalid_schema")
    function = {"type": "function", **WEATHER["function"], "strict": True}
    body = {
        "model": "tiny",
        "input": "What is the weather in Oslo?",
        "tools": [function],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", **json_schema}},
        "max_output_tokens": 200,
        "seed": 4,  # (vLLM's field; unseeded, one CI run's random answer broke the bound)
    }
    response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    (call,) = [item for item in response.json()["output"] if item["type"] == "function_call"]
    assert call["name"] == "get_weather"
    check_weather(call["arguments"])


async def test_auto_tools_beside_a_response_format_answer_in_it_or_call(
    client: httpx.AsyncClient, tiny_model_dir: Path
) -> None:
    """The Agents SDK sends an agent's tools and its output type's schema on every turn:
    OpenAI's model answers in the schema or calls a tool. The schema alone shaped the whole
    answer from its first token, so no call could ever begin (pushed to "<tool_call>", the
    model wrote it inside the JSON's string). Streamed as not."""
    from transformers import AutoTokenizer

    # (Qwen2-VL's tokenizer spells it in pieces; Qwen2.5-VL's and Qwen3-VL's have its token)
    call_open = AutoTokenizer.from_pretrained(tiny_model_dir).encode("<tool_call>")[0]
    schema = {
        "type": "object",
        "properties": {"answer": SHORT_TEXT},
        "required": ["answer"],
        "additionalProperties": False,
    }
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "tools": [WEATHER, TIME],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        "parallel_tool_calls": False,
        "max_tokens": 200,
        "temperature": 0,
    }
    answered = await client.post("/v1/chat/completions", json=body)
    assert answered.status_code == 200, answered.text
    message = answered.json()["choices"][0]["message"]
    assert message["tool_calls"] is None and set(json.loads(message["content"])) == {"answer"}
    pushed = {**body, "logit_bias": {str(call_open): 100}}
    called = await client.post("/v1/chat/completions", json=pushed)
    assert called.status_code == 200, called.text
    choice = called.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] in ("get_weather", "get_time")
    if call["function"]["name"] == "get_weather":
        check_weather(call["function"]["arguments"])
    async with client.stream("POST", "/v1/chat/completions", json={**pushed, "stream": True}) as s:
        lines = [line async for line in s.aiter_lines() if line.startswith("data: {")]
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in lines[:-1]]
    streamed = [c for d in deltas for c in d.get("tool_calls") or ()]
    assert streamed[0]["function"] == call["function"]
    assert not "".join(d.get("content") or "" for d in deltas)
    # the role chunk waited for the first piece: a call, so no content "" (OpenAI's null; an
    # SDK accumulating the stream had content "" beside the call)
    assert deltas[0] == {"role": "assistant"} and "tool_calls" in deltas[1]
    assert [d for d in deltas if "role" in d] == [deltas[0]]
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        lines = [line async for line in s.aiter_lines() if line.startswith("data: {")]
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in lines[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}  # text: as OpenAI streams it
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    # a tool whose parameters cannot be compiled is left out (never compiled under auto
    # before), the others still callable; with none left, answered in the schema
    broken = {"type": "function", "function": {"name": "odd", "parameters": {"$ref": "#/x"}}}
    response = await client.post(
        "/v1/chat/completions", json={**pushed, "tools": [broken, WEATHER]}
    )
    assert response.status_code == 200, response.text
    (call,) = response.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    response = await client.post("/v1/chat/completions", json={**pushed, "tools": [broken]})
    assert response.status_code == 200, response.text
    assert set(json.loads(response.json()["choices"][0]["message"]["content"])) == {"answer"}
    # a call's arguments no text can complete: the 400 names tools, not the format
    never = {"type": "string", "pattern": "^[^\\s\\S]$"}
    dead = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"code": never},
                "required": ["code"],
            },
        },
    }
    response = await client.post("/v1/chat/completions", json={**pushed, "tools": [dead]})
    assert_error(response, 400, "tools", "invalid_schema")
    # a strict tool is decoded under its parameters here too: what the grammar cannot enforce
    # in them is refused, as under a forced choice
    unique = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    strict = {
        "type": "function",
        "function": {
            "name": "tag",
            "strict": True,
            "parameters": {"type": "object", "properties": {"tags": unique}},
        },
    }
    response = await client.post("/v1/chat/completions", json={**body, "tools": [strict]})
    assert_error(response, 400, "tools[0].function.parameters", "invalid_schema")
    without_format = {k: v for k, v in body.items() if k != "response_format"}
    response = await client.post("/v1/chat/completions", json={**without_format, "tools": [strict]})
    assert response.status_code == 200, response.text  # (auto alone never decodes under it)
    # a strict tool's parameters are checked as the grammar takes them, every property
    # required: a discriminated union whose discriminator has a default (pydantic's
    # `kind: Literal["cat"] = "cat"`, sent by LangChain's bind_tools) is told apart then
    pet = {
        "oneOf": [
            {
                "type": "object",
                "properties": {"kind": {"const": k, "default": k}, "n": {"type": "integer"}},
                "required": ["n"],
            }
            for k in ("cat", "dog")
        ],
        "discriminator": {"propertyName": "kind"},
    }
    pets = {"type": "object", "properties": {"pet": pet}, "required": ["pet"]}
    forced = {
        **without_format,
        "tools": [
            {"type": "function", "function": {"name": "pet", "strict": True, "parameters": pets}}
        ],
        "tool_choice": {"type": "function", "function": {"name": "pet"}},
        "max_tokens": 60,
    }
    response = await client.post("/v1/chat/completions", json=forced)
    assert response.status_code == 200, response.text


async def test_a_strict_tool_too_odd_to_read_is_a_400(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever reading a strict tool's parameters raises is the request's 400, not a 500."""
    from server.engine import json_schema

    def odd(*args: object) -> bool:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(json_schema, "_told_apart", odd)
    parameters = {"type": "object", "properties": {"x": {"oneOf": [{}, {}]}}}
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 5,
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "strict": True, "parameters": parameters},
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
    }
    response = await client.post("/v1/chat/completions", json=body)
    error = assert_error(response, 400, "tools[0].function.parameters", "invalid_schema")
    assert "cannot be read (RecursionError)" in error["message"]


async def test_required_tool_choice(sdk: openai.AsyncOpenAI) -> None:
    for stream in (False, True):
        body = {
            "model": "tiny",
            "messages": MESSAGES,
            "tools": [WEATHER, TIME],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": 300,
            "temperature": 0.8,
            "seed": 3,
        }
        if stream:
            state = ChatCompletionStreamState()
            async for chunk in await sdk.chat.completions.create(**body, stream=True):
                state.handle_chunk(chunk)
            choice = state.get_final_completion().choices[0]
        else:
            choice = (await sdk.chat.completions.create(**body)).choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls  # parallel_tool_calls false: exactly one
        assert call.function.name in ("get_weather", "get_time")
        if call.function.name == "get_weather":
            check_weather(call.function.arguments)
        else:
            assert set(json.loads(call.function.arguments)) == {"zone"}


async def test_a_tool_that_declares_no_arguments_is_called_with_none(
    client: httpx.AsyncClient,
) -> None:
    """A function with no parameters, {} or a bare {"type": "object"} (MCP tools without
    inputs declare that) is called with {} under a forced choice, as vLLM calls it (random keys
    broke frameworks' calls with a TypeError); under strict, a bare object anywhere (a tool's
    or a response_format's) takes nothing: strict leaves no property unlisted."""
    bare = {"type": "object"}
    declared = [None, {}, bare, {"type": "object", "properties": {}}]
    strict = [{"type": "object", "properties": {"options": bare}, "required": ["options"]}]
    cases = [(p, False) for p in declared] + [(bare, True), (strict[0], True)]
    for parameters, is_strict in cases:
        function: dict = {"name": "refresh"}
        if parameters is not None:
            function["parameters"] = parameters
        if is_strict:
            function["strict"] = True
        for choice in ("required", {"type": "function", "function": {"name": "refresh"}}):
            for seed in range(5):
                body = {
                    "model": "tiny",
                    "messages": MESSAGES,
                    "tools": [{"type": "function", "function": function}],
                    "tool_choice": choice,
                    "parallel_tool_calls": False,
                    "max_tokens": 60,
                    "temperature": 1.0,
                    "seed": seed,
                }
                response = await client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                (call,) = response.json()["choices"][0]["message"]["tool_calls"]
                arguments = json.loads(call["function"]["arguments"])
                expected = {"options": {}} if parameters is strict[0] else {}
                assert arguments == expected, (parameters, choice, seed, arguments)
    for schema in (bare, strict[0]):
        for seed in range(5):
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "r", "schema": schema, "strict": True},
            }
            body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 60, "seed": seed}
            response = await client.post(
                "/v1/chat/completions", json={**body, "response_format": response_format}
            )
            content = json.loads(response.json()["choices"][0]["message"]["content"])
            assert content == ({} if schema is bare else {"options": {}}), (schema, seed)


async def test_required_cut_before_a_calls_arguments_is_no_content(
    sdk: openai.AsyncOpenAI,
) -> None:
    """max_tokens cutting `required`'s list before a call's arguments began: no call and no
    content (the list's JSON, `[{"name": "get_wea`, is no answer: vLLM's content is empty
    too), streamed or not."""
    for max_tokens in (1, 3, 6):
        body = {"model": "tiny", "messages": MESSAGES, "tools": [WEATHER, TIME]}
        body |= {"tool_choice": "required", "max_tokens": max_tokens}
        answer = (await sdk.chat.completions.create(**body)).choices[0]
        assert answer.finish_reason == "length"
        assert not answer.message.tool_calls and not answer.message.content, answer
        chunks = [c async for c in await sdk.chat.completions.create(**body, stream=True)]
        assert not any(c.choices and c.choices[0].delta.content for c in chunks)
        assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)


async def test_auto_renders_the_tools_and_none_does_not(sdk: openai.AsyncOpenAI) -> None:
    base = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3}
    plain = await sdk.chat.completions.create(**base)
    auto = await sdk.chat.completions.create(**base, tools=[WEATHER])
    none = await sdk.chat.completions.create(**base, tools=[WEATHER], tool_choice="none")
    tools_tokens = auto.usage.prompt_tokens - plain.usage.prompt_tokens
    assert tools_tokens > 50  # the "# Tools" block in the system prompt
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # tools: [] (a framework with none registered) is no tools, with any choice but a name
    greedy = await sdk.chat.completions.create(**base, temperature=0)
    for choice in ("auto", "required", "none"):
        empty = await sdk.chat.completions.create(
            **base, temperature=0, tools=[], tool_choice=choice
        )
        assert empty.usage.prompt_tokens == plain.usage.prompt_tokens
        assert empty.choices[0].message.content == greedy.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        named = {"type": "function", "function": {"name": "get_weather"}}
        await sdk.chat.completions.create(**base, tools=[], tool_choice=named)  # type: ignore[arg-type]


async def test_tool_calls_and_results_in_the_history(sdk: openai.AsyncOpenAI) -> None:
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'},
    }
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "-3 C, snow"},
    ]
    response = await sdk.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], max_tokens=4
    )
    assert response.choices[0].message.role == "assistant"


async def test_images_in_a_tool_message_reach_the_model(client: httpx.AsyncClient) -> None:
    """vLLM's clients send a tool's screenshot in its tool message (OpenAI's hold text only):
    the model reads it inside the tool's response, where it was (as Qwen3-VL's template writes
    it), the prompt Responses makes of a function_call_output with the same parts; a tool
    message of an image alone too."""
    url = data_uri(make_image(96, 64))
    call = {"id": "c1", "type": "function", "function": {"name": "shot", "arguments": "{}"}}

    def chat(content: object) -> dict:
        result = {"role": "tool", "tool_call_id": "c1", "content": content}
        turns = [{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call]}]
        return {"model": "tiny", "messages": [*turns, result]}

    text = {"type": "text", "text": "the screen:"}
    image = {"type": "image_url", "image_url": {"url": url, "detail": "low"}}
    tokenized, prompts = [], []
    for content in ([text, image], [image]):
        response = await client.post("/tokenize", json=chat(content))
        assert response.status_code == 200, response.text
        tokenized.append(response.json()["tokens"])
        body = {"model": "tiny", "tokens": tokenized[-1]}
        prompts.append((await client.post("/detokenize", json=body)).json()["prompt"])
    vision = "<|vision_start|><|image_pad|>"
    assert f"<|im_start|>user\n<tool_response>\nthe screen:{vision}" in prompts[0]
    assert f"<|im_start|>user\n<tool_response>\n{vision}" in prompts[1]
    assert prompts[0].count("<|im_start|>user") == 2  # (the question, the tool's response)
    output = [
        {"type": "input_text", "text": "the screen:"},
        {"type": "input_image", "image_url": url, "detail": "low"},
    ]
    responses_body = {
        "model": "tiny",
        "input": [
            {"role": "user", "content": "go"},
            {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": output},
        ],
    }
    counted = await client.post("/v1/responses/input_tokens", json=responses_body)
    assert counted.json()["input_tokens"] == len(tokenized[0])
    body = {**chat([text, image]), "max_tokens": 2}
    answer = await client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == len(tokenized[0])


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}
                ],
            },
            "tools[0].function.parameters",  # (not an object's schema)
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": 5}}},
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",  # (a grammar that cannot compile: the one tool)
        ),
    ],
)
async def test_refusals_name_the_field(sdk: openai.AsyncOpenAI, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.chat.completions.create(model="tiny", messages=MESSAGES, **extra)
    assert refused.value.body["param"] == param


async def test_a_call_cut_short_in_the_history_is_taken_back_as_written(
    client: httpx.AsyncClient,
) -> None:
    """A model cut short by max_tokens leaves a call's arguments unfinished; frameworks send
    it back in the next turn as it was (LangChain's invalid_tool_calls, a Responses item of
    status incomplete), and OpenAI takes it: a 400 there stuck their agent loops for good.
    Written into the prompt as it was; JSON arguments as Qwen's template writes them."""
    cut = '{"city": "],.,;'
    for arguments, written in ((cut, cut), ('{"city":"Oslo"}', '{"city": "Oslo"}'), ("", "{}")):
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
        messages = [
            *MESSAGES,
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c", "content": "sunny"},
        ]
        body = {"model": "tiny", "messages": messages, "max_tokens": 2}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        tokens = await client.post("/tokenize", json={"model": "tiny", "messages": messages})
        assert tokens.status_code == 200, tokens.text
        text = await client.post("/detokenize", json={"tokens": tokens.json()["tokens"]})
        assert f'"arguments": {written}}}' in text.json()["prompt"]
    item = {"type": "function_call", "call_id": "c", "name": "f", "arguments": cut}
    item["status"] = "incomplete"
    result = {"type": "function_call_output", "call_id": "c", "output": "sunny"}
    body = {"model": "tiny", "input": [item, result], "max_output_tokens": 2}
    response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text


async def test_bad_history_names_the_field(client: httpx.AsyncClient) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    surrogate = {**call, "function": {"name": "f", "arguments": '{"a": "\\ud800"}'}}
    bad_arguments = [*MESSAGES, {"role": "assistant", "tool_calls": [surrogate]}]
    tool_calls_on_user = [{"role": "user", "content": "hi", "tool_calls": [call]}]
    for messages, param in (
        (bad_arguments, "messages[1].tool_calls[0].function.arguments"),
        (tool_calls_on_user, "messages[0]"),
    ):
        response = await client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": messages}
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def _call(call_id: str | None) -> dict:
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    return {**call, "id": call_id} if call_id is not None else call


@pytest.mark.parametrize(
    ("messages", "param", "words"),
    [
        ([{"role": "tool", "tool_call_id": "c1", "content": "r"}], "messages[1].role", "preceding"),
        (
            [{"role": "assistant", "tool_calls": [_call("c1")]}, {"role": "user", "content": "y"}],
            "messages[1].role",
            "did not have response messages: c1",
        ),
        (
            [
                {"role": "assistant", "tool_calls": [_call("c1")]},
                {"role": "tool", "tool_call_id": "c2", "content": "r"},
            ],
            "messages[2].tool_call_id",
            "'c2' not found",
        ),
        (
            [
                {"role": "assistant", "tool_calls": [_call("c1"), _call("c2")]},
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
            ],
            "messages[1].role",
            "did not have response messages: c2",
        ),
        (
            [
                {"role": "assistant", "tool_calls": [_call("c1")]},
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
                {"role": "tool", "tool_call_id": "c1", "content": "again"},
            ],
            "messages[3].tool_call_id",
            "not found",
        ),
        (
            [
                {"role": "assistant", "tool_calls": [_call("c1")]},
                {"role": "tool", "content": "r"},
                {"role": "tool", "content": "one too many"},
            ],
            "messages[3]",
            "follows answers to every call",
        ),
        (
            [
                {"role": "assistant", "tool_calls": [_call("c1")]},
                {"role": "tool", "id": "c2", "content": "r"},
            ],
            "messages[2].tool_call_id",
            "'c2' not found",
        ),
    ],
    ids=[
        "tool-first",
        "unanswered",
        "wrong-id",
        "one-of-two",
        "answered-twice",
        "one-answer-too-many",
        "qwen-agent-wrong-id",
    ],
)
async def test_tool_messages_must_answer_the_calls_before_them(
    client: httpx.AsyncClient, messages: list, param: str, words: str
) -> None:
    """As OpenAI: a tool message answers a call of the assistant message before it, and every
    call is answered before the conversation goes on (a 400 naming the message)."""
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    body["messages"] += messages
    error = assert_error(await client.post("/v1/chat/completions", json=body), 400, param)
    assert words in error["message"], error


async def test_answered_calls_and_calls_without_ids_are_accepted(
    client: httpx.AsyncClient,
) -> None:
    def answer(call_id: str | None, key: str = "tool_call_id") -> dict:
        return {"role": "tool", "content": "r"} | ({key: call_id} if call_id else {})

    for calls, answers in (
        ([_call("c1"), _call("c2")], [answer("c2"), answer("c1")]),  # any order
        ([_call(None)], [answer("whatever")]),  # (no ids: nothing to match)
        # Qwen-Agent's tool messages name their call `id`
        ([_call("c1"), _call("c2")], [answer("c2", "id"), answer("c1", "id")]),
        # without an id, an answer is the first open call's (vLLM takes them)
        ([_call("c1"), _call("c2")], [answer(None), answer(None)]),
        ([_call("c1"), _call("c2")], [answer("c2"), answer(None)]),
    ):
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": calls}]
        messages += answers
        body = {"model": "tiny", "max_tokens": 2, "messages": messages}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
    # a continued assistant message may still have its calls open
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [_call("c1")]},
    ]
    body = {"model": "tiny", "max_tokens": 2, "messages": messages}
    continued = {**body, "continue_final_message": True, "add_generation_prompt": False}
    assert (await client.post("/v1/chat/completions", json=continued)).status_code == 200


async def test_allowed_tools_limit_what_may_be_called(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    """OpenAI's allowed_tools: of the tools, only these may be called; `required`: one of them
    must be (`auto`: the model decides, among them). A name not among the tools is a 400."""
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "required",
            "tools": [{"type": "function", "function": {"name": "get_time"}}],
        },
    }
    for seed in (1, 2):
        response = await sdk.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            tools=[WEATHER, TIME],
            tool_choice=allowed,  # type: ignore[arg-type]
            max_tokens=300,
            temperature=0.8,
            seed=seed,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert {call.function.name for call in choice.message.tool_calls} == {"get_time"}
    auto = {**allowed, "allowed_tools": {**allowed["allowed_tools"], "mode": "auto"}}
    body = {"model": "tiny", "messages": MESSAGES, "tools": [WEATHER, TIME], "max_tokens": 3}
    assert (
        await client.post("/v1/chat/completions", json={**body, "tool_choice": auto})
    ).status_code == 200
    unknown = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "auto",
            "tools": [{"type": "function", "function": {"name": "nope"}}],
        },
    }
    response = await client.post("/v1/chat/completions", json={**body, "tool_choice": unknown})
    assert_error(response, 400, "tool_choice.allowed_tools.tools[0].function.name")


async def test_tools_openai_refuses_are_refused(client: httpx.AsyncClient) -> None:
    """Two tools of one name, parameters that are not an object's schema: OpenAI's 400s (on
    the Responses API too, its fields named as it names them)."""
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3}
    response = await client.post("/v1/chat/completions", json={**body, "tools": [WEATHER, WEATHER]})
    assert_error(response, 400, "tools")
    text_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    response = await client.post("/v1/chat/completions", json={**body, "tools": [text_tool]})
    error = assert_error(response, 400, "tools[0].function.parameters")
    assert error["code"] == "invalid_function_parameters"
    responses_tool = {"type": "function", "name": "f", "parameters": {"type": "string"}}
    response = await client.post(
        "/v1/responses", json={"model": "tiny", "input": "Hi", "tools": [responses_tool]}
    )
    assert_error(response, 400, "tools[0].parameters")


async def test_required_calls_read_each_functions_own_definitions(sdk: openai.AsyncOpenAI) -> None:
    """Nested pydantic models become `$defs` with `$ref`s into them (the SDK's
    pydantic_function_tool writes them); under `required` each function's references resolve
    in its own definitions, even where two functions name theirs alike."""
    from typing import Literal

    from pydantic import BaseModel

    class Place(BaseModel):
        zone: Literal["utc", "cet"]

    class Clock(BaseModel):
        place: Place

    class Place2(BaseModel):  # the same definition name, another shape
        model_config = {"title": "Place"}
        indoor: bool

    class Lamp(BaseModel):
        place: Place2
        on: bool

    tools = [openai.pydantic_function_tool(Clock), openai.pydantic_function_tool(Lamp)]
    assert all("$defs" in t["function"]["parameters"] for t in tools)
    for seed in range(3):
        answer = await sdk.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            tools=tools,
            tool_choice="required",
            max_tokens=300,
            temperature=0.8,
            seed=seed,
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            model = {"Clock": Clock, "Lamp": Lamp}[call.function.name]
            model.model_validate_json(call.function.arguments)


NUMBERS = {
    "type": "function",
    "function": {
        "name": "move",
        "parameters": {
            "type": "object",
            "properties": {
                "x": {"type": "number"},
                "n": {"type": "integer"},
                "far": {"type": "number", "minimum": -0.5},  # (xgrammar writes a range)
                "xs": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
            },
            "required": ["x", "n", "far", "xs"],
            "additionalProperties": False,
        },
    },
}


def numbers_in(value: object) -> list[int | float]:
    """Every number in a JSON value (booleans are no numbers)."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_in(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return []


async def test_forced_numbers_are_finite_doubles(client: httpx.AsyncClient) -> None:
    """A random model under a forced call wrote 49756394008169e999911 and 144E-543 (read as
    Infinity and 0 by JavaScript clients, which wrote null back) and 44-digit integers: the
    grammar writes every number as a finite double, every integer as an exact one (at most 15
    digits), under a named tool_choice, `required`, a json_schema and json_object alike."""
    schema = {"name": "move", "schema": NUMBERS["function"]["parameters"]}
    constraints = [
        {"tools": [NUMBERS], "tool_choice": {"type": "function", "function": {"name": "move"}}},
        {"tools": [NUMBERS], "tool_choice": "required"},
        {"response_format": {"type": "json_schema", "json_schema": schema}},
        {"response_format": {"type": "json_object"}},
    ]
    bodies = [
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Move."}],
            "max_tokens": 200,
            "temperature": 1.0,
            "seed": seed,
            **constraints[seed % 4],
        }
        for seed in range(24)
    ]
    answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
    seen = []
    for answer in answers:
        assert answer.status_code == 200, answer.text
        message = answer.json()["choices"][0]["message"]
        texts = [c["function"]["arguments"] for c in message.get("tool_calls") or []]
        texts += [message["content"]] if message.get("content") else []
        for text in texts:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue  # (json_object cut by max_tokens)
            for number in numbers_in(value):
                seen.append(number)
                assert math.isfinite(number), text
                assert number == 0 or abs(number) > 1e-300, text  # (not underflowed to 0)
                if isinstance(number, int):
                    assert abs(number) < 10**15, text  # exact as a double (2**53 > 10**15)
    assert len(seen) > 20
