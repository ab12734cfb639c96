"""Guided decoding's edges: bounded constraints (a compile grows with their text), new grammars
refused with a 503 once too many compile (a cached one never is), choices with any character,
and constraints that must not be lost or turn into 500s."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from server.engine.engine import AsyncEngine
from server.engine.grammar_compiles import GrammarCompiles
from server.engine.sequence import Sequence, SequenceOutput
from tests.api.test_errors import assert_error
from tests.helpers import make_settings, start_client

pytestmark = pytest.mark.anyio

URL = "/v1/chat/completions"


def chat(**extra: object) -> dict:
    messages = [{"role": "user", "content": "Answer."}]
    return {"model": "tiny", "messages": messages, "max_tokens": 24, **extra}


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("guided_choice", [f"c{i}" for i in range(257)], "guided_choice"),
        ("guided_choice", ["x" * 9000, "y" * 9000], "guided_choice"),
        ("guided_regex", "a" * 16385, "guided_regex"),
        ("guided_grammar", "root ::= " + '"a" ' * 5000, "guided_grammar"),
        ("structured_outputs", {"choice": [f"c{i}" for i in range(300)]}, "structured_outputs"),
        ("structured_outputs", {}, "structured_outputs"),
        ("guided_json", '{"a":' * 5000 + "1" + "}" * 5000, "guided_json"),
    ],
    ids=["choices", "choice-chars", "regex", "grammar", "so-choices", "so-empty", "deep-json"],
)
async def test_oversized_or_empty_constraints_are_400s(
    client: httpx.AsyncClient, field: str, value: object, param: str
) -> None:
    response = await client.post(URL, json=chat(**{field: value}))
    error = assert_error(response, 400)
    assert error["param"].startswith(param), error


async def test_a_schema_nested_too_deep_is_refused_before_it_compiles(
    client: httpx.AsyncClient,
) -> None:
    """Compiling grows with the cube of the nesting: past 128 JSON levels it is a 400 at once
    (450 levels of arrays took 32 s of a compile thread all requests share); 120 compile."""

    def nested(depth: int) -> dict:
        schema: dict = {"type": "string"}
        for _ in range(depth):
            schema = {"type": "array", "items": schema}
        return {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}

    response = await client.post(URL, json=chat(response_format=nested(450)))
    error = assert_error(response, 400, "response_format", "invalid_schema")
    assert "nested 451 levels deep" in error["message"], error
    assert (await client.post(URL, json=chat(response_format=nested(127)))).status_code == 200
    # a forced tool's parameters: the limit is the client's schema's, whatever the server wraps
    # around it (tool_choice required: a list of calls)
    params = nested(125)["json_schema"]["schema"]  # 126 levels
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    tool["function"]["parameters"] = {"type": "object", "properties": {"a": params}}  # 128
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        body = chat(tools=[tool], tool_choice=choice, max_tokens=2)
        assert (await client.post(URL, json=body)).status_code == 200, choice
    tool["function"]["parameters"]["properties"]["a"] = nested(126)["json_schema"]["schema"]
    error = assert_error(
        await client.post(URL, json=chat(tools=[tool], tool_choice="required")),
        400,
        "tools[0].function.parameters",
    )
    assert "nested 129 levels deep" in error["message"], error
    # nor through a Lark grammar's inline schema (%json)
    schema = json.dumps(nested(450)["json_schema"]["schema"])
    response = await client.post(URL, json=chat(guided_grammar=f"start: %json {schema}"))
    error = assert_error(response, 400, "guided_grammar", "invalid_schema")
    assert "nested 451 levels deep" in error["message"], error


async def test_a_schema_past_openais_size_limits_is_refused_before_it_compiles(
    client: httpx.AsyncClient,
) -> None:
    """OpenAI's bounds: 5,000 properties, 120,000 characters of names, enum and const values
    (50,000 enum strings took a minute to compile); descriptions are not counted."""

    def schema_format(schema: dict) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}

    enum = {"enum": [f"value-{i:06d}" for i in range(20_000)]}
    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5001)}}
    for schema, said in ((enum, "characters; the limit is 120,000"), (many, "5001 properties")):
        response = await client.post(URL, json=chat(response_format=schema_format(schema)))
        error = assert_error(response, 400, "response_format", "invalid_schema")
        assert said in error["message"], error
    # a character is one, whatever JSON's escapes; descriptions and examples are not counted
    japanese = ["\u65e5\u672c" * 7_500, "\u8a9e" * 15_000]  # 30,000 characters (180,004 escaped)
    described = {"type": "string", "description": "d" * 200_000, "examples": ["e" * 200_000]}
    for schema in ({"enum": japanese}, {**described, "enum": ["a", "b"]}):
        response = await client.post(URL, json=chat(response_format=schema_format(schema)))
        assert response.status_code == 200, response.text


async def test_constraints_no_text_matches_are_400s(client: httpx.AsyncClient) -> None:
    """The request's fault, not the server's: one that no token can start is refused before
    it runs (naming the field); one that allows no next token part-way (a pattern nothing
    matches, found after the opening quote) ends as a 400 too, or the stream's error event,
    and the Messages API answers it in Anthropic's envelope."""
    for field, value in [("guided_grammar", "root ::= root"), ("guided_regex", "[^\\s\\S]")]:
        error = assert_error(await client.post(URL, json=chat(**{field: value})), 400)
        assert error["param"] == field and error["code"] == "invalid_schema", error
        assert "matches no text" in error["message"]
    never = {"type": "string", "pattern": "[^\\s\\S]"}
    format_ = {"type": "json_schema", "json_schema": {"name": "n", "schema": never}}
    error = assert_error(await client.post(URL, json=chat(response_format=format_)), 400)
    assert error["code"] == "invalid_schema" and "allows no next token" in error["message"]
    async with client.stream("POST", URL, json=chat(response_format=format_, stream=True)) as s:
        lines = [line async for line in s.aiter_lines()]
    # The stream's error event; or, when the engine's two steps (the opening quote, then no
    # token allowed) reach the route together (a busy machine), the 400 before any event.
    data = [line for line in lines if line.startswith("data: {")]
    streamed = json.loads(data[-1][6:] if data else "".join(lines))["error"]
    assert streamed["code"] == "invalid_schema" and streamed["param"] == "response_format"
    text = {"model": "tiny", "prompt": "Answer:", "max_tokens": 8, "response_format": format_}
    error = assert_error(await client.post("/v1/completions", json=text), 400, "response_format")
    async with client.stream("POST", "/v1/completions", json={**text, "stream": True}) as s:
        lines = [line async for line in s.aiter_lines()]
    data = [line for line in lines if line.startswith("data: {")]  # (or the 400, as above)
    assert (
        json.loads(data[-1][6:] if data else "".join(lines))["error"]["param"] == "response_format"
    )
    anthropic = {
        "model": "tiny",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Answer."}],
        "output_config": {"format": {"type": "json_schema", "schema": never}},
    }
    response = await client.post("/v1/messages", json=anthropic)
    assert (
        response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    )
    assert (await client.post(URL, json=chat())).status_code == 200  # (the server goes on)


async def test_a_dead_end_read_late_is_a_400_naming_the_field(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream whose route reads its first output only after the engine has stopped it (the
    opening quote, then no token allowed, both in before the route's first read: what a busy
    machine does) is the 400 before any event, and it still names the constraint's field
    (chat's streamed route left param null: CI saw it once)."""
    stream = AsyncEngine.stream

    async def read_late(self: AsyncEngine, seq: Sequence) -> AsyncIterator[SequenceOutput]:
        while not seq.is_finished:
            await asyncio.sleep(0.01)
        async for output in stream(self, seq):
            yield output

    monkeypatch.setattr(AsyncEngine, "stream", read_late)
    never = {"type": "string", "pattern": "[^\\s\\S]"}
    format_ = {"type": "json_schema", "json_schema": {"name": "n", "schema": never}}
    text = {"format": {"type": "json_schema", "name": "n", "schema": never}}
    for url, body in [
        (URL, chat(response_format=format_)),
        ("/v1/completions", {"model": "tiny", "prompt": "A:", "response_format": format_}),
        ("/v1/responses", {"model": "tiny", "input": "A.", "text": text}),
    ]:
        response = await client.post(url, json={**body, "stream": True})
        error = assert_error(response, 400)
        assert error["code"] == "invalid_schema" and "allows no next token" in error["message"]
        assert error["param"] in ("response_format", "text.format"), (url, error)


async def test_choices_with_newlines_quotes_and_control_characters(
    client: httpx.AsyncClient,
) -> None:
    choices = ['say "hi"\nthen go', "tab\tand \\ backslash"]
    response = await client.post(URL, json=chat(guided_choice=choices, max_tokens=64))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] in choices


async def test_a_text_response_format_keeps_the_guided_field(client: httpx.AsyncClient) -> None:
    body = chat(response_format={"type": "text"}, guided_regex="[ab]{5}", temperature=1.0)
    response = await client.post(URL, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]["message"]["content"]
    assert len(answer) == 5 and set(answer) <= {"a", "b"}, answer


async def test_new_grammars_past_the_limit_are_503s_cached_ones_are_not(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = chat(guided_regex="(yes|no)")
    assert (await client.post(URL, json=cached)).status_code == 200
    monkeypatch.setattr(GrammarCompiles, "MAX_WAITING", 0)
    response = await client.post(URL, json=chat(guided_regex="(maybe|never)"))
    assert_error(response, 503)
    assert response.headers["retry-after"]
    assert (await client.post(URL, json=cached)).status_code == 200


async def test_many_first_requests_for_one_grammar_compile_it_once(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty requests at once for a grammar nobody asked for before: one compile, no 503."""
    monkeypatch.setattr(GrammarCompiles, "MAX_WAITING", 1)
    compiled = []
    compile_grammar = AsyncEngine.compile_grammar

    def counted(engine: AsyncEngine, spec) -> None:
        compiled.append(spec)
        compile_grammar(engine, spec)

    monkeypatch.setattr(AsyncEngine, "compile_grammar", counted)
    body = chat(guided_regex="(first|second|third)", max_tokens=8)
    responses = await asyncio.gather(*(client.post(URL, json=body) for _ in range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert len(compiled) == 1, compiled


async def test_new_grammars_past_the_limit_wait_for_a_place_before_a_503(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of distinct new grammars, more than compile at once: each waits for a place
    (16 new schemas at once had half of them refused at once, each compile a quarter second);
    past MAX_QUEUE_S of waiting, the 503."""
    monkeypatch.setattr(GrammarCompiles, "MAX_WAITING", 1)
    bodies = [chat(guided_regex=f"(burst{i}|other{i})", max_tokens=8) for i in range(4)]
    responses = await asyncio.gather(*(client.post(URL, json=body) for body in bodies))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    monkeypatch.setattr(GrammarCompiles, "MAX_QUEUE_S", 0.0)
    compile_grammar = AsyncEngine.compile_grammar

    def slow(engine: AsyncEngine, spec) -> None:  # (outlasts the others' arrival, loaded or not)
        time.sleep(0.5)
        compile_grammar(engine, spec)

    monkeypatch.setattr(AsyncEngine, "compile_grammar", slow)
    bodies = [chat(guided_regex=f"(late{i}|never{i})", max_tokens=8) for i in range(4)]
    responses = await asyncio.gather(*(client.post(URL, json=body) for body in bodies))
    assert sorted(r.status_code for r in responses) == [200, 503, 503, 503]


# Every text of a's parses in more ways the longer it is: matching it costs more at every token.
AMBIGUOUS = 'root ::= x\nx ::= "a" | x x | x x x'


async def test_an_ambiguous_grammar_fails_alone_once_too_slow(tiny_model_dir: Path) -> None:
    """A grammar whose matching costs more CPU per token than --max-grammar-ms-per-token,
    token after token, fails its own request with a 400 naming the field (streamed: the
    error event), while a request beside it finishes; the same grammar cut short (before it
    gets slow) is answered."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # (a grammar decides when its text may end, min_tokens does not: the enders are biased out)
    enders = {tokenizer.convert_tokens_to_ids(t): -100 for t in ("<|im_end|>", "<|endoftext|>")}
    settings = make_settings(tiny_model_dir, max_grammar_ms_per_token=0.2)
    async for client in start_client(settings):
        slow = chat(guided_grammar=AMBIGUOUS, logit_bias=enders, max_tokens=400)
        beside = chat(max_tokens=64, min_tokens=64)
        failed, answered = await asyncio.gather(
            client.post(URL, json=slow), client.post(URL, json=beside)
        )
        error = assert_error(failed, 400, "guided_grammar")
        assert error["code"] == "invalid_schema" and "ambiguous" in error["message"], error
        assert answered.status_code == 200, answered.text
        async with client.stream("POST", URL, json={**slow, "stream": True}) as s:
            lines = [line async for line in s.aiter_lines() if line.startswith("data: {")]
        streamed = json.loads(lines[-1][6:])["error"]
        assert streamed["code"] == "invalid_schema" and streamed["param"] == "guided_grammar"
        short = await client.post(URL, json=chat(guided_grammar=AMBIGUOUS, max_tokens=4))
        assert short.status_code == 200, short.text
        assert set(short.json()["choices"][0]["message"]["content"]) <= {"a"}


async def test_translated_bodies_name_their_own_constraint_field(
    client: httpx.AsyncClient,
) -> None:
    """A constraint error on /v1/responses and /v1/messages speaks of the body's field
    (text.format, output_config.format), in param and message, streamed or not."""
    never = {"type": "object", "properties": {"a": {"type": "string", "pattern": "[^\\s\\S]"}}}
    never["required"] = ["a"]
    nonsense = {"type": "nonsense"}
    fmt = {"type": "json_schema", "name": "n", "schema": nonsense}
    responses = {"model": "tiny", "input": "Hi", "max_output_tokens": 16, "text": {"format": fmt}}
    error = assert_error(await client.post("/v1/responses", json=responses), 400, "text.format")
    assert error["message"].startswith("text.format:") and "response_format" not in error["message"]
    streamed = {**responses, "stream": True, "text": {"format": {**fmt, "schema": never}}}
    async with client.stream("POST", "/v1/responses", json=streamed) as s:
        blocks = [b async for b in s.aiter_lines() if b.startswith("data: ")]
    errors = [json.loads(b[6:]) for b in blocks if '"type":"error"' in b.replace(" ", "")]
    assert errors and errors[0]["param"] == "text.format", blocks[-3:]
    anthropic = {
        "model": "tiny",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Hi"}],
        "output_config": {"format": {"type": "json_schema", "schema": nonsense}},
    }
    response = await client.post("/v1/messages", json=anthropic)
    message = response.json()["error"]["message"]
    assert message.startswith("output_config.format:") and "response_format" not in message
    anthropic["output_config"] = {"format": {"type": "json_schema", "schema": never}}
    async with client.stream("POST", "/v1/messages", json={**anthropic, "stream": True}) as s:
        blocks = [b async for b in s.aiter_lines() if b.startswith("data: ")]
    error = json.loads(blocks[-1][6:])["error"]
    assert error["message"].startswith("output_config.format:"), error
