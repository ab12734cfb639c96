"""response_format: JSON constrained while decoding, valid even from a random-weight model, and
batched together with unconstrained requests."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.helpers import data_uri, make_image

pytestmark = pytest.mark.anyio

SHORT_TEXT = {"type": "string", "pattern": '^[^\\x00-\\x1f"\\\\]{1,16}$'}
SCHEMA = {
    "type": "object",
    "properties": {
        "label": SHORT_TEXT,
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": SHORT_TEXT, "maxItems": 3},
    },
    "required": ["label", "count", "tags"],
    "additionalProperties": False,
}


def body(i: int, response_format: dict | None) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": data_uri(make_image(64, 64, seed=i))}},
        {"type": "text", "text": "Describe it as JSON."},
    ]
    extra = {"response_format": response_format} if response_format else {}
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 400,
        "temperature": 0.8,
        "seed": i,
        **extra,
    }


def check_schema(value: dict) -> None:
    assert set(value) == {"label", "count", "tags"}
    assert isinstance(value["label"], str) and 1 <= len(value["label"]) <= 16
    assert isinstance(value["count"], int) and 0 <= value["count"] <= 99
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3


async def test_json_schema_batched_with_unconstrained_requests(client: httpx.AsyncClient) -> None:
    schema_format = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    formats = [schema_format, None, {"type": "json_object"}, None] * 3
    responses = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=body(i, f)) for i, f in enumerate(formats))
    )
    for response, fmt in zip(responses, formats, strict=True):
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        if fmt is None:
            continue
        content = choice["message"]["content"]
        if fmt["type"] == "json_schema":  # (bounded: it ends well within max_tokens)
            assert choice["finish_reason"] == "stop"  # the grammar let it end: complete JSON
            check_schema(json.loads(content))
        elif choice["finish_reason"] == "stop":  # json_object: an object, whatever its keys
            assert isinstance(json.loads(content), dict)
        else:  # (a random model's key or string may run past max_tokens: cut, but begun so)
            assert content.startswith("{")


async def test_min_tokens_does_not_fight_the_grammar(client) -> None:
    """The grammar ends the JSON; min_tokens must not ban the only token it then allows (the
    answer was invalid JSON, then a 500). A bounded schema, so the JSON ends well before
    min_tokens and max_tokens."""
    schema = {
        "type": "object",
        "properties": {"n": {"enum": [1, 2, 3]}},
        "required": ["n"],
        "additionalProperties": False,
    }
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "JSON please"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        "min_tokens": 200,
        "max_tokens": 400,
        "temperature": 0,
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert json.loads(choice["message"]["content"])["n"] in (1, 2, 3)
    assert response.json()["usage"]["completion_tokens"] < 200


async def test_ignore_eos_ends_with_the_grammar(client: httpx.AsyncClient) -> None:
    """ignore_eos goes on past EOS, but not past a complete answer under a grammar (what
    followed the JSON was unconstrained text); a pydantic-style bounded string is valid
    JSON (no raw control characters)."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"enum": [1, 2, 3]}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    for seed in range(6):
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "JSON"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema},
                },
                "ignore_eos": True,
                "max_tokens": 60,
                "temperature": 1,
                "seed": seed,
            },
        )
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        value = json.loads(choice["message"]["content"])  # (strict: control characters fail)
        assert len(value["name"]) <= 8 and value["n"] in (1, 2, 3)


async def test_a_strict_schema_writes_every_property(client: httpx.AsyncClient) -> None:
    """strict: true, as OpenAI's Structured Outputs: every property of every object is
    written, those the schema leaves out of `required` too (OpenAI refuses such a schema;
    here the promise holds and the answer still fits the schema as sent), also in a strict
    forced tool's arguments; without strict they may be left out."""
    inner = {"type": "object", "properties": {"x": SHORT_TEXT, "y": {"type": "boolean"}}}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": inner}}
    messages = [{"role": "user", "content": "JSON"}]
    for seed in range(3):
        json_schema = {"name": "s", "schema": schema, "strict": True}
        fmt = {"type": "json_schema", "json_schema": json_schema}
        body = {"model": "tiny", "messages": messages, "response_format": fmt, "max_tokens": 120}
        response = await client.post("/v1/chat/completions", json={**body, "seed": seed})
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        answer = json.loads(choice["message"]["content"])
        assert set(answer) == {"a", "b"} and set(answer["b"]) == {"x", "y"}, answer
        function = {"name": "f", "parameters": schema, "strict": True}
        forced = {"type": "function", "function": {"name": "f"}}
        tools = {"tools": [{"type": "function", "function": function}], "tool_choice": forced}
        body = {"model": "tiny", "messages": messages, "max_tokens": 120, "seed": seed}
        response = await client.post("/v1/chat/completions", json=body | tools)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        arguments = json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
        assert set(arguments) == {"a", "b"} and set(arguments["b"]) == {"x", "y"}, arguments


async def test_a_strict_schema_the_grammar_cannot_enforce_is_refused(
    client: httpx.AsyncClient,
) -> None:
    """strict: true promises the schema exactly: keywords the grammar reads past (uniqueItems,
    multipleOf, not, if, a pattern beside maxLength, ...) are a 400 naming where; without
    strict the schema is followed as far as it goes; property names are not keywords."""

    def ask(schema: dict, strict: bool | None, **extra: object) -> httpx.Response:
        json_schema = {"name": "x", "schema": schema} | (
            {} if strict is None else {"strict": strict}
        )
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "JSON"}],
            "response_format": {"type": "json_schema", "json_schema": json_schema},
            "max_tokens": 30,
            **extra,
        }
        return client.post("/v1/chat/completions", json=body)

    tags = {"type": "array", "items": {"type": "string", "maxLength": 3}, "uniqueItems": True}
    schema = {"type": "object", "properties": {"tags": tags}}
    refused = await ask(schema, True)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_schema" and error["param"] == "response_format"
    assert "properties.tags.uniqueItems" in error["message"]
    for strict in (False, None):
        assert (await ask(schema, strict)).status_code == 200
    for bad in (
        {"type": "integer", "multipleOf": 2.5},  # (a whole multipleOf on integers is enforced)
        {"type": "number", "multipleOf": 3},
        {"type": "string", "pattern": "^[a-z]+$", "maxLength": 4},
        {"not": {"type": "string"}},
        {"type": "string", "pattern": '^"[a-z]{2}"$'},  # (a quote xgrammar writes raw)
        {"type": "string", "pattern": "^[A-Z]:\\\\[a-z]+$"},  # (a backslash)
    ):
        response = await ask({"type": "object", "properties": {"a": bad}}, True)
        assert response.status_code == 400, (bad, response.text)
    names = {"type": "object", "properties": {"not": {"type": "integer"}, "if": {"type": "string"}}}
    assert (await ask(names, True)).status_code == 200
    # pydantic's Field(multiple_of=5) on an int: the grammar writes only multiples of 5
    fives = {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 500}
    schema = {"type": "object", "properties": {"n": fives}, "required": ["n"]}
    for seed in range(4):
        answer = await ask(schema, True, seed=seed, temperature=1)
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.json()["choices"][0]["message"]["content"])["n"] % 5 == 0
    # A required property no answer may write, strict or not: a 400 that names it.
    integer = {"type": "integer", "minimum": 0, "maximum": 9}
    missing = {"type": "object", "properties": {"a": integer}, "required": ["a", "z"]}
    for strict in (True, False):
        response = await ask(missing | {"additionalProperties": False}, strict)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_schema" and "required names 'z'" in error["message"]
        # the object may have others: answered (the grammar writes z as any value:
        # test_structured_schema.py checks what it takes)
        assert (await ask(missing, strict)).status_code == 200


def call(tools: list[dict], choice: object) -> dict:
    """A chat body asking for a call of `tools` under `choice`."""
    messages = [{"role": "user", "content": "Call"}]
    return {
        "model": "tiny",
        "messages": messages,
        "tools": tools,
        "tool_choice": choice,
        "max_tokens": 30,
    }


def tool(name: str, parameters: dict, strict: bool | None = None) -> dict:
    extra = {} if strict is None else {"strict": strict}
    return {"type": "function", "function": {"name": name, "parameters": parameters} | extra}


async def test_a_strict_tool_is_checked_alone_and_named(client: httpx.AsyncClient) -> None:
    """Under a forced tool_choice a strict function's schema is checked as response_format's
    is, the error naming that tool and the path inside its parameters; a tool that is not
    strict beside it is followed as far as the grammar goes (not refused for its neighbour's
    strict), and a strict tool the choice does not force is not checked."""

    def ask(tools: list[dict], choice: object) -> httpx.Response:
        return client.post("/v1/chat/completions", json=call(tools, choice))

    loose = {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}
    bad = {"type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}
    good = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}

    refused = await ask([tool("loose", loose), tool("bad", bad, True)], "required")
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "tools[1].function.parameters", error
    assert error["code"] == "invalid_schema"
    assert "'bad'" in error["message"] and "properties.n.multipleOf" in error["message"]
    assert "anyOf" not in error["message"]

    for tools, choice in (
        ([tool("loose", loose), tool("good", good, True)], "required"),  # (loose: not strict)
        ([tool("loose", loose), tool("bad", bad, True)], "auto"),
        ([tool("loose", loose), tool("bad", bad, True)], named("loose")),
    ):
        response = await ask(tools, choice)
        assert response.status_code == 200, (choice, response.text)

    named_bad = await ask([tool("loose", loose), tool("bad", bad, True)], named("bad"))
    assert named_bad.status_code == 400
    assert named_bad.json()["error"]["param"] == "tools[1].function.parameters"

    # the Responses API names the tool as its body has it
    response = await client.post(
        "/v1/responses",
        json={
            "model": "tiny",
            "input": "Call",
            "tools": [{"type": "function", "name": "bad", "parameters": bad, "strict": True}],
            "tool_choice": "required",
            "max_output_tokens": 30,
        },
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "tools[0].parameters"


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


# zod's z.tuple([z.string().max(2), z.number().int()]) as the Vercel AI SDK sends it (draft-07)
TUPLE = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "t": {
            "type": "array",
            "items": [{"type": "string", "maxLength": 2}, {"type": "integer"}],
            "additionalItems": False,
            "minItems": 2,
            "maxItems": 2,
        },
    },
    "required": ["t"],
    "additionalProperties": False,
}


async def test_a_draft_07_tuple_is_followed(client: httpx.AsyncClient) -> None:
    """draft-07's tuple (`items` a list, the rest under `additionalItems`) as response_format,
    a forced tool's parameters and the Responses API's text.format: each item its own schema
    (it was a 400: "items must be a boolean or an object")."""
    messages = [{"role": "user", "content": "JSON"}]
    base = {"model": "tiny", "messages": messages, "max_tokens": 60, "temperature": 1.0}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": TUPLE}}
    tools = {"tools": [tool("f", TUPLE)], "tool_choice": named("f")}
    answers = []
    for seed in range(3):
        response = await client.post(
            "/v1/chat/completions", json=base | {"response_format": fmt, "seed": seed}
        )
        assert response.status_code == 200, response.text
        answers.append(response.json()["choices"][0]["message"]["content"])
        response = await client.post("/v1/chat/completions", json=base | tools | {"seed": seed})
        assert response.status_code == 200, response.text
        call = response.json()["choices"][0]["message"]["tool_calls"][0]
        answers.append(call["function"]["arguments"])
    response = await client.post(
        "/v1/responses",
        json={
            "model": "tiny",
            "input": "JSON",
            "text": {"format": {"type": "json_schema", "name": "t", "schema": TUPLE}},
            "max_output_tokens": 60,
        },
    )
    assert response.status_code == 200, response.text
    answers.append(response.json()["output"][0]["content"][0]["text"])
    for answer in answers:
        first, second = json.loads(answer)["t"]
        assert isinstance(first, str) and len(first) <= 2, answer
        assert isinstance(second, int) and not isinstance(second, bool), answer


async def test_a_forced_tools_schema_error_names_the_tool(client: httpx.AsyncClient) -> None:
    """A forced call's schema that cannot be compiled, or that stops the answer, is a 400
    naming the one tool it could call (tools[i].function.parameters); `required` over several
    tools names them all (tools)."""
    nothing = {"type": "object", "properties": {"p": {"type": "string", "pattern": "[^\\s\\S]"}}}
    nothing["required"] = ["p"]
    broken = {"type": "object", "properties": {"p": {"type": "string", "minLength": -1}}}
    plain = {"type": "object", "properties": {"n": {"type": "integer"}}}
    for parameters, choice, param in (
        (nothing, named("bad"), "tools[1].function.parameters"),  # (stops the answer)
        (broken, named("bad"), "tools[1].function.parameters"),  # (cannot be compiled)
        (broken, "required", "tools"),
    ):
        tools = [tool("plain", plain), tool("bad", parameters)]
        response = await client.post("/v1/chat/completions", json=call(tools, choice))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, "invalid_schema"), error
