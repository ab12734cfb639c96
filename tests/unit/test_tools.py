"""Qwen's hermes tool-call format: the prompt block, and the parser (whole and streamed)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from server.pipelines.messages import ChatMessage, TextPart, ToolCall
from server.pipelines.tools import (
    CallParser,
    NamedCall,
    RequiredCalls,
    ToolCallDelta,
    Tools,
    parse_answer,
    render,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOLS = Tools((WEATHER,))
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def test_tools_go_into_the_system_prompt_as_qwen_writes_them() -> None:
    """After the template's default system prompt (Qwen2-VL's), or first (Qwen3-VL has none)."""
    rendered = render([ChatMessage("user", "Weather?")], TOOLS, "You are a helpful assistant.")
    assert [m.role for m in rendered] == ["system", "user"]
    expected = (
        "You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to "
        "assist with the user query.\n\nYou are provided with function signatures within "
        "<tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER)
        + "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
    assert rendered[0].content == expected
    assert render([ChatMessage("user", "Weather?")], TOOLS)[0].content == expected.removeprefix(
        "You are a helpful assistant.\n\n"
    )
    own = render([ChatMessage("system", [TextPart("Be brief.")]), ChatMessage("user", "Hi")], TOOLS)
    assert own[0].content[0] == TextPart("Be brief.") and "# Tools" in own[0].content[1].text
    assert render([ChatMessage("user", "Hi")], Tools((WEATHER,), "none"))[0].role == "user"


def test_calls_and_results_in_the_history() -> None:
    history = [
        ChatMessage("user", "Weather in Oslo and Rome?"),
        ChatMessage(
            "assistant",
            "",
            (
                ToolCall("call_1", "get_weather", '{"city":"Oslo"}'),
                ToolCall("call_2", "get_weather", '{"city": "Rome"}'),
            ),
        ),
        ChatMessage("tool", "-3 C"),
        ChatMessage("tool", [TextPart("21 C")]),
    ]
    rendered = render(history, None)
    assert [m.role for m in rendered] == ["user", "assistant", "user"]
    assert rendered[1].content == CALL + "\n" + CALL.replace("Oslo", "Rome")
    assert rendered[2].content == (
        "<tool_response>\n-3 C\n</tool_response>\n<tool_response>\n21 C\n</tool_response>"
    )


def test_parse_content_and_calls() -> None:
    answer = parse_answer(f"Let me look.\n{CALL}\n{CALL}", TOOLS)
    assert answer.content == "Let me look.\n"
    assert [(c.name, json.loads(c.arguments)) for c in answer.tool_calls] == [
        ("get_weather", {"city": "Oslo"})
    ] * 2
    assert all(c.id.startswith("call_") for c in answer.tool_calls)
    assert len({c.id for c in answer.tool_calls}) == 2
    only_call = parse_answer(CALL, TOOLS)
    assert only_call.content is None and len(only_call.tool_calls) == 1
    assert parse_answer("No tools needed.", TOOLS).tool_calls == []
    assert parse_answer(CALL, None).content == CALL  # no tools: text stays text


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        "a < b <tool_",  # a partial tag at the end is text after all
        # not JSON, though Python's json reads them: arguments no client could parse (Codex
        # failed on "max_output_tokens": Infinity)
        '<tool_call>{"name": "get_weather", "arguments": {"n": Infinity}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"n": NaN}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"n": 1e999}}</tool_call>',
    ],
)
def test_what_does_not_parse_stays_content(text: str) -> None:
    answer = parse_answer(text, TOOLS)
    assert answer.content == text and answer.tool_calls == []


@pytest.mark.parametrize("cut", ["", "\n", "\n</", "\n</tool_call"])
def test_an_unclosed_call_that_parses_counts(cut: str) -> None:
    """Cut by max_tokens after its JSON, in its closing tag too: still the call."""
    text = '<tool_call>{"name": "get_weather", "arguments": {}}' + cut
    for json_calls in (False, True):
        answer = parse_answer(text, replace(TOOLS, json_calls=json_calls))
        assert [(c.name, c.arguments) for c in answer.tool_calls] == [("get_weather", "{}")]
        assert answer.content is None
        parser = CallParser(json_calls=json_calls)
        events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
        assert [(e.name, e.arguments) for e in events] == [("get_weather", "{}")]  # type: ignore[union-attr]


def test_an_unclosed_call_that_does_not_parse_is_its_text() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {"ci\n</tool_'
    assert parse_answer(text, TOOLS).content == text


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    answer = parse_answer(CALL + CALL.replace("Oslo", "Rome"), Tools((WEATHER,), parallel=False))
    assert [json.loads(c.arguments) for c in answer.tool_calls] == [{"city": "Oslo"}]


def test_streamed_character_by_character_equals_whole() -> None:
    text = f"Checking <b>.\n{CALL}\n{CALL.replace('Oslo', 'Rome')}"
    parser = CallParser()
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert content == "Checking <b>.\n"
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Oslo"}),
        (1, "get_weather", {"city": "Rome"}),
    ]


def test_named_and_required_streams() -> None:
    named = NamedCall("get_weather")
    events = named.feed('{"city"') + named.feed(': "Oslo"}') + named.finish()
    assert events[0].id.startswith("call_") and events[0].name == "get_weather"
    assert events[1].id is None and events[1].name is None
    assert "".join(e.arguments for e in events) == '{"city": "Oslo"}'
    cut = RequiredCalls()
    cut.feed('[{"name": "get_wea')
    assert cut.finish() == []  # cut short before a call began: no content (the list's JSON)
    cut = RequiredCalls()
    events = cut.feed('[{"name": "f", "parameters": {"a":') + cut.finish()
    assert [(e.name, e.arguments) for e in events] == [("f", '{"a":')]  # kept
    # one cut before its arguments began is no call (a client would run it without them)
    cut = RequiredCalls()
    events = cut.feed('[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "') + cut.finish()
    assert [(e.name, e.arguments) for e in events] == [("f", '{"a": 1}')]
    cut = RequiredCalls()
    events = cut.feed('[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters":')
    assert [(e.name, e.arguments) for e in events + cut.finish()] == [("f", '{"a": 1}')]


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_required_calls_stream_as_they_come(step: int) -> None:
    """The list of calls read piece by piece, whatever the pieces: each call's name with its
    arguments' first piece, the rest as they come (braces and quotes inside strings do not end
    them), calls after calls; the same whatever the whitespace."""
    for text in (
        '[{"name": "get_weather", "parameters": {"city": "o\\"}{slo", "days": [1, 2]}}, '
        '{"name": "get_time", "parameters": {"zone": "UTC"}}]',
        '[{"name":"get_weather","parameters":{"city":"o\\"}{slo","days":[1,2]}},'
        '{"name":"get_time","parameters":{"zone":"UTC"}}]',
    ):
        required, events = RequiredCalls(), []
        for start in range(0, len(text), step):
            events += required.feed(text[start : start + step])
        events += required.finish()
        calls: dict[int, list] = {}
        for event in events:
            assert isinstance(event, ToolCallDelta)
            calls.setdefault(event.index, [event.name, ""])[1] += event.arguments
        assert [name for name, _ in calls.values()] == ["get_weather", "get_time"]
        assert json.loads(calls[0][1]) == {"city": 'o"}{slo', "days": [1, 2]}
        assert json.loads(calls[1][1]) == {"zone": "UTC"}
        if step == 1:  # the first arguments piece goes out before the list is whole
            first = next(i for i, e in enumerate(events) if e.arguments)
            assert first < len(events) - 3


def test_forced_choices_decode_under_a_schema() -> None:
    named = json.loads(Tools((WEATHER,), "get_weather").grammar().schema_json)
    assert named == WEATHER["function"]["parameters"]
    required = json.loads(Tools((WEATHER,), "required", parallel=False).grammar().schema_json)
    assert required["minItems"] == required["maxItems"] == 1
    assert required["items"]["anyOf"][0]["properties"]["name"]["enum"] == ["get_weather"]
    assert Tools((WEATHER,), "auto").grammar() is None


def test_rebased_moves_local_references_only() -> None:
    """A function's parameters placed inside `required`'s list schema: its own references
    ("#", "#/$defs/...") point into it; data (const, enum, ...), another document's and
    anchors stay as they were; a property may be named like a keyword."""
    from server.pipelines.tools import rebased

    schema = {
        "properties": {
            "enum": {"$ref": "#/$defs/A"},  # a property named "enum": a schema
            "b": {"const": {"$ref": "#/x"}},  # data
            "c": {"$ref": "#anchor"},
            "d": {"$ref": "https://example.com/s.json"},
            "kids": {"type": "array", "items": {"$ref": "#"}},
        },
        "$defs": {"A": {"enum": [{"$ref": "#"}]}},
    }
    moved = rebased(schema, "#/p")
    assert moved["properties"]["enum"] == {"$ref": "#/p/$defs/A"}
    assert moved["properties"]["b"] == {"const": {"$ref": "#/x"}}
    assert moved["properties"]["c"] == {"$ref": "#anchor"}
    assert moved["properties"]["d"] == {"$ref": "https://example.com/s.json"}
    assert moved["properties"]["kids"]["items"] == {"$ref": "#/p"}
    assert moved["$defs"]["A"] == {"enum": [{"$ref": "#"}]}


TAGGED = CALL.replace('"Oslo"', '"a </tool_call> b \\" } <tool_call>"')  # tags in a string


@pytest.mark.parametrize("piece", [1, 3, len(TAGGED) * 3])
def test_calls_written_under_a_grammar_end_after_their_json(piece: int) -> None:
    """Beside a response format the calls are the grammar's: a "</tool_call>" (or a brace, a
    quote) inside one of their strings is text, however the answer is streamed."""
    text = f"{TAGGED}\n{CALL}"
    parser = CallParser(json_calls=True)
    events = [e for k in range(0, len(text), piece) for e in parser.feed(text[k : k + piece])]
    events += parser.finish()
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [e for e in events if isinstance(e, str)] == []
    assert [json.loads(c.arguments)["city"] for c in calls] == [
        'a </tool_call> b " } <tool_call>',
        "Oslo",
    ]
    # The plain rule, for text no grammar shaped: the first tag closes the call (so that a
    # malformed call cannot swallow those after it).
    assert parse_answer(text, TOOLS).tool_calls[0].name == "get_weather"
    assert "</tool_call> b" not in parse_answer(text, TOOLS).tool_calls[0].arguments
    json_tools = Tools((WEATHER,), json_calls=True)
    assert len(parse_answer(text, json_tools).tool_calls) == 2


def test_a_formatted_answer_is_content_to_its_end() -> None:
    """Under a grammar, an answer that began in the format has no call after it: a tag in one
    of its strings is its text."""
    text = '{"note": "see <tool_call>\\n{\\"name\\": \\"get_weather\\"}"}' + CALL
    answer = parse_answer(text, Tools((WEATHER,), json_calls=True))
    assert answer.content == text and answer.tool_calls == []


@pytest.mark.parametrize(
    ("extra", "json_calls"),
    [
        ({"response_format": {"type": "json_object"}}, True),
        ({"response_format": {"type": "json_object"}, "tool_choice": "none"}, False),
        ({"response_format": {"type": "json_object"}, "tool_choice": "required"}, False),
        ({}, False),
    ],
)
def test_calls_are_read_as_json_where_a_grammar_wrote_them(
    extra: dict[str, object], json_calls: bool
) -> None:
    """Only auto calls beside a response format are written under a grammar."""
    from server.api.protocol import OPENAI_DEFAULTS, ChatCompletionRequest
    from server.api.routes.chat import to_chat_request

    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], **extra}
    request = to_chat_request(
        ChatCompletionRequest.model_validate(body), None, OPENAI_DEFAULTS, "native"
    )
    assert request.tools is not None and request.tools.json_calls is json_calls
