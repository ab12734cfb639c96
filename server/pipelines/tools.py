"""Tool calling the way Qwen models do it (the "hermes" format vLLM parses for them).

The tools go into the system prompt as Qwen2.5's chat template writes them (Qwen2-VL's and
Qwen2.5-VL's templates do not render tools, so we render them for every checkpoint): a
"# Tools" block listing each tool as JSON inside <tools></tools>. The model then answers
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, possibly several; earlier calls
in the history are written the same way and tool results go back as a user turn of
<tool_response> blocks. A named or `required` tool_choice decodes under a JSON-schema grammar
(the arguments object of that function; a list of calls), so the arguments always parse.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace
from typing import Any

from server.engine.json_schema import (
    DATA_KEYWORDS,
    NAMED_SCHEMAS,
    closed_if_bare,
    strict_normalized,
)
from server.engine.structured import StructuredOutput
from server.pipelines.messages import ChatMessage, Part, TextPart, ToolCall
from server.pipelines.reasoning import partial_suffix
from server.strict_json import dumps, loads

TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Tools:
    definitions: tuple[dict[str, Any], ...]  # {"type": "function", "function": {...}} each
    choice: str = "auto"  # none | auto | required | the name of the function to call
    parallel: bool = True  # several calls in one answer
    # auto calls beside a response format, written under a grammar (`beside`): the answer is
    # the format's text or calls whose bodies are JSON, so a "</tool_call>" in a string of
    # a call's arguments is text, not its end (text the grammar did not shape keeps the
    # plain rule: a malformed call there must not swallow the calls after it)
    json_calls: bool = False

    @property
    def named(self) -> str | None:
        return None if self.choice in ("none", "auto", "required") else self.choice

    @property
    def is_forced(self) -> bool:
        return self.choice not in ("none", "auto")

    def finish_reason(self, reason: str, called: bool) -> str:
        """`tool_calls` for an answer that called a tool and ended on its own, except under a
        named choice: OpenAI and vLLM say `stop` there (the caller asked for that call)."""
        if called and reason == "stop" and self.named is None:
            return "tool_calls"
        return reason

    def parameters(self, name: str) -> dict[str, Any]:
        """The function's parameters as its calls are decoded (a strict one's every property
        written, as OpenAI's; none, {} or a bare {"type": "object"}: no arguments, {})."""
        for tool in self.definitions:
            if tool["function"]["name"] == name:
                # (none, or {}: no arguments, as vLLM reads them)
                parameters = closed_if_bare(
                    tool["function"].get("parameters") or {"type": "object"}
                )
                strict = tool["function"].get("strict") is True
                return strict_normalized(parameters) if strict else parameters
        raise KeyError(name)

    def constrains(self, name: str) -> bool:
        """Whether a forced choice decodes the function's arguments under its schema."""
        if self.named is not None:
            return name == self.named
        return self.choice == "required" and name in self.names

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.definitions)

    def writes_beside(self, structured: StructuredOutput | None) -> bool:
        """Whether calls may be written beside the response format (`beside`)."""
        return structured is not None and self.choice == "auto"

    def beside(self, structured: StructuredOutput) -> StructuredOutput:
        """tool_choice auto beside a response format: the answer is in that format or calls
        the tools (OpenAI's rule; the format alone never let a call begin)."""
        names = [t["function"]["name"] for t in self.definitions]
        return structured.or_calls([(n, self.parameters(n)) for n in names], self.parallel)

    def grammar(self) -> StructuredOutput | None:
        """What a forced choice decodes under: the named function's arguments, or a list of
        {"name", "parameters"} calls (vLLM's form for `required`). Compiled without strict:
        each strict function's own schema was checked when the request was read (its error
        names that tool, and a tool that is not strict is followed as far as it goes)."""
        if self.named is not None:
            return StructuredOutput.json_schema(self.parameters(self.named))
        if self.choice != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t["function"]["name"]]},
                    # its own references ("#/$defs/A", "#") still point into it, placed here
                    "parameters": rebased(
                        self.parameters(t["function"]["name"]),
                        f"#/items/anyOf/{k}/properties/parameters",
                    ),
                },
                "required": ["name", "parameters"],
            }
            for k, t in enumerate(self.definitions)
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        # (array, items, anyOf, a call, its properties: then the client's parameters)
        return StructuredOutput.json_schema(schema, wrapper_depth=5)


def rebased(schema: Any, pointer: str) -> Any:
    """A schema moved to `pointer` inside another: each local `$ref` ("#/$defs/A", "#") is
    rewritten to start there, so a function's definitions ($defs, as pydantic writes nested
    models) resolve in the list schema `required` builds."""
    if isinstance(schema, list):
        return [rebased(item, pointer) for item in schema]
    if not isinstance(schema, dict):
        return schema
    moved: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref":
            moved[key] = _rebased_ref(value, pointer)
        elif key in DATA_KEYWORDS:
            moved[key] = value
        elif key in NAMED_SCHEMAS and isinstance(value, dict):
            moved[key] = {name: rebased(each, pointer) for name, each in value.items()}
        else:
            moved[key] = rebased(value, pointer)
    return moved


def _rebased_ref(ref: Any, pointer: str) -> Any:
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        return pointer + ref[1:]
    return ref  # (another document's, or an anchor: as it was)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- the prompt -------------------------------------------------------------------------------


def render(
    messages: list[ChatMessage], tools: Tools | None, default_system: str = ""
) -> list[ChatMessage]:
    """Messages as Qwen's tool-aware templates write them, for a template that knows only
    system / user / assistant: the tools in the system prompt (after the template's default
    system prompt when the conversation has none), calls and results as text."""
    rendered: list[ChatMessage] = []
    for k, message in enumerate(messages):
        if message.role == "tool":
            block = _tool_response(message.content)
            if k > 0 and messages[k - 1].role == "tool":  # (one turn, as Qwen's templates)
                block = _joined(rendered.pop().content, "\n", block)
            rendered.append(ChatMessage("user", block))
        elif message.tool_calls:
            calls = "\n".join(_call_text(c) for c in message.tool_calls)
            content = _text(message.content)
            text = f"{content}\n{calls}" if content else calls
            rendered.append(ChatMessage("assistant", text, reasoning=message.reasoning))
        else:
            rendered.append(message)
    if tools is None or tools.choice == "none" or not tools.definitions:
        return rendered
    block = TOOLS_HEADER + "".join(
        "\n" + json.dumps(t, ensure_ascii=False) for t in tools.definitions
    )
    block += TOOLS_FOOTER
    if rendered and rendered[0].role == "system":
        return [_append(rendered[0], block), *rendered[1:]]
    system = default_system + block if default_system else block.removeprefix("\n\n")
    return [ChatMessage("system", system), *rendered]


def _tool_response(content: str | list[Part]) -> str | list[Part]:
    """A tool's result as Qwen's templates write it: text, its images and videos in it where
    they were (Qwen3-VL's template puts them there; a later turn's template then still reads
    the turn as a tool's, not a new query)."""
    if isinstance(content, str) or all(isinstance(p, TextPart) for p in content):
        return f"<tool_response>\n{_text(content)}\n</tool_response>"
    return [TextPart("<tool_response>\n"), *content, TextPart("\n</tool_response>")]


def _joined(*pieces: str | list[Part]) -> str | list[Part]:
    if all(isinstance(piece, str) for piece in pieces):
        return "".join(pieces)  # type: ignore[arg-type]
    return [p for piece in pieces for p in ([TextPart(piece)] if isinstance(piece, str) else piece)]


def _call_text(call: ToolCall) -> str:
    # Qwen's template: '{"name": "' + name + '", "arguments": ' + arguments | tojson + '}';
    # arguments that are not JSON (a call cut short) as they were written, as Qwen3's does;
    # none at all (""), as no arguments ({})
    try:
        arguments = dumps(loads(call.arguments or "{}"))
    except (ValueError, RecursionError):
        arguments = call.arguments
    return f'<tool_call>\n{{"name": "{call.name}", "arguments": {arguments}}}\n</tool_call>'


def _text(content: str | list[Part]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content if isinstance(p, TextPart))


def _append(message: ChatMessage, text: str) -> ChatMessage:
    return replace(message, content=_joined(message.content, text))


# -- the answer -------------------------------------------------------------------------------


@dataclass
class ToolCallDelta:
    """A piece of a streamed call, as OpenAI streams them: the first piece of call `index`
    has its id and name, later pieces append to its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


Event = str | ToolCallDelta  # content text, or a piece of a tool call


class CallParser:
    """Hermes-format calls out of free text (tool_choice auto), fed as the text streams.
    Text outside <tool_call> blocks is content; a block whose JSON does not parse stays
    content too; a partial "<tool_call>" tag is held back until it is known.

    json_calls: the text was written under a grammar of the format's text or calls (see
    Tools.json_calls): an answer that begins as content is content to its end, and a call
    ends at the first "</tool_call>" after its JSON object, not inside one of its strings."""

    def __init__(self, parallel: bool = True, json_calls: bool = False):
        self.parallel = parallel
        self.json_calls = json_calls
        self.pending = ""
        self.in_call = False
        self.num_calls = 0
        self.as_content = False  # (json_calls) the answer is the format's text
        self.body = JsonExtent()  # (json_calls) the open call's JSON so far

    def feed(self, text: str) -> list[Event]:
        self.pending += text
        events: list[Event] = []
        while not self.as_content:
            at = self._close_at() if self.in_call else self.pending.find(CALL_OPEN)
            if at < 0:
                break
            if self.json_calls and not self.in_call and self.pending[:at].strip():
                self.as_content = True  # (text before the tag: the format's, to its end)
                break
            tag = CALL_CLOSE if self.in_call else CALL_OPEN
            before, self.pending = self.pending[:at], self.pending[at + len(tag) :]
            events += self._call(before) if self.in_call else self._content(before)
            self.in_call, self.body = not self.in_call, JsonExtent()
        if not self.in_call:
            keep = 0 if self.as_content else partial_suffix(self.pending, CALL_OPEN)
            events += self._content(self.pending[: len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep :]
        return events

    def _close_at(self) -> int:
        """Where the open call's closing tag starts in `pending`, or -1 while unseen."""
        if not self.json_calls:
            return self.pending.find(CALL_CLOSE)
        if self.body.ended < 0:  # (while a call is open its text only grows)
            self.body.feed(self.pending[self.body.read :])
        return -1 if self.body.ended < 0 else self.pending.find(CALL_CLOSE, self.body.ended)

    def finish(self) -> list[Event]:
        """The end of the text: an unclosed call that parses still counts (vLLM's rule), also
        one whose closing tag max_tokens cut part-way."""
        rest, self.pending = self.pending, ""
        if self.in_call:
            self.in_call = False
            cut = partial_suffix(rest, CALL_CLOSE)
            if cut and parse_call(rest[:-cut]) is not None:
                rest = rest[:-cut]
            return self._call(rest, unclosed=True)
        return self._content(rest)

    def _content(self, text: str) -> list[Event]:
        if self.json_calls and text.strip():
            self.as_content = True  # (the grammar lets no call follow the format's text)
        # Whitespace between and after calls is layout, not an answer.
        return [text] if text and (not self.num_calls or text.strip()) else []

    def _call(self, body: str, unclosed: bool = False) -> list[Event]:
        call = parse_call(body)
        if call is None:
            raw = CALL_OPEN + body + ("" if unclosed else CALL_CLOSE)
            return [raw]
        if self.num_calls and not self.parallel:
            return []  # parallel_tool_calls false: the first call only
        self.num_calls += 1
        return [ToolCallDelta(self.num_calls - 1, new_call_id(), *call)]


class JsonExtent:
    """Where a JSON value ends in text read piece by piece: brackets counted outside its
    strings (a brace in a string is text)."""

    def __init__(self) -> None:
        self.read = 0  # characters read
        self.depth, self.in_string, self.escaped = 0, False, False
        self.ended = -1  # characters read through the value's last bracket, once it closed

    def feed(self, piece: str) -> int:
        """Reads on: the index in `piece` just past the value's end, or -1 while it is open."""
        for i, char in enumerate(piece):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.read += i + 1
                    self.ended = self.read
                    return i + 1
        self.read += len(piece)
        return -1


def parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a {"name": ..., "arguments": {...}} object, or None: also
    for one whose arguments hold NaN, Infinity or a number past a float's range (1e999),
    which no JSON parser a client has reads (Codex failed on `"max_output_tokens": Infinity`)."""
    try:
        call = loads(body)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if not isinstance(arguments, str):
            arguments = dumps(arguments)
    except (ValueError, RecursionError):
        return None
    return call["name"], arguments


class NamedCall:
    """tool_choice names a function: the whole answer is its arguments (under a grammar),
    streamed as they come."""

    def __init__(self, name: str):
        self.name = name
        self.started = False

    def feed(self, text: str) -> list[Event]:
        if not text:
            return []
        if self.started:
            return [ToolCallDelta(0, arguments=text)]
        self.started = True
        return [ToolCallDelta(0, new_call_id(), self.name, text)]

    def finish(self) -> list[Event]:
        return []


class RequiredCalls:
    """tool_choice required: the answer is a JSON list of {"name", "parameters"} (under a
    grammar: name first), streamed as it comes: each call's id and name with the first
    piece of its arguments object, then the rest piece by piece (vLLM streams them so). A
    call cut short (by max_tokens) keeps what was written, as a named call's does; one cut
    before its arguments began is no call (a client would run it without arguments, strict
    or not). The list's own JSON is never content: an answer cut short before any call's
    arguments began is empty (as vLLM's), not a fragment like `[{"name": "get_wea`."""

    # The JSON tokens before a call's name and before its arguments (whitespace may part
    # them, as the grammar's separators do).
    CALL_OPEN = ("{", '"name"', ":", '"')
    PARAMETERS = (",", '"parameters"', ":")

    def __init__(self) -> None:
        self.pending = ""  # not yet read
        self.state = "call"  # call (next, or the list's end), name, arguments, done
        self.tokens: tuple[str, ...] = ("[",)  # what to read before the state's own, in order
        self.index, self.name = 0, ""
        self.arguments = JsonExtent()  # the open call's arguments object

    def feed(self, text: str) -> list[Event]:
        self.pending += text
        events: list[Event] = []
        while self.pending and self.state != "done" and self._step(events):
            pass
        return events

    def _step(self, events: list[Event]) -> bool:
        """Reads what the state expects; False when more text is needed."""
        if self.tokens:
            return self._token()
        if self.state == "call":
            self.pending = self.pending.lstrip()
            if self.pending[:1] in (",", "]"):
                self.state = "call" if self.pending[0] == "," else "done"
                self.pending = self.pending[1:]
                return True
            if self.pending:
                self._then("name", self.CALL_OPEN)
            return bool(self.pending)
        if self.state == "name":
            end = self.pending.find('"')  # (function names hold no quotes or escapes)
            self.name += self.pending if end < 0 else self.pending[:end]
            self.pending = "" if end < 0 else self.pending[end + 1 :]
            if end >= 0:
                self._then("arguments", self.PARAMETERS)
            return end >= 0
        if self.state == "arguments":
            if self.arguments.depth == 0:
                self.pending = self.pending.lstrip()
            index = self.index  # (the object's end moves on to the next call)
            if piece := self._object_piece():
                if self.name:  # the call's first piece: its id and name with it
                    events.append(ToolCallDelta(index, new_call_id(), self.name, piece))
                    self.name = ""
                else:
                    events.append(ToolCallDelta(index, arguments=piece))
            return True
        return False

    def _then(self, state: str, tokens: tuple[str, ...]) -> None:
        self.state, self.tokens = state, tokens

    def _token(self) -> bool:
        """The next expected token: read (True), partly here (False: wait), or not what
        the grammar writes (done: nothing more is read)."""
        self.pending = self.pending.lstrip()
        token = self.tokens[0]
        if self.pending.startswith(token):
            self.pending, self.tokens = self.pending[len(token) :], self.tokens[1:]
            return True
        if not token.startswith(self.pending):
            self.state = "done"
        return False

    def _object_piece(self) -> str:
        """The arguments object's text in `pending`, up to its closing brace (then the call
        closes)."""
        at = self.arguments.feed(self.pending)
        if at < 0:
            piece, self.pending = self.pending, ""
            return piece
        piece, self.pending = self.pending[:at], self.pending[at:]
        self.index += 1
        self.arguments = JsonExtent()
        self._then("call", ("}",))
        return piece

    def finish(self) -> list[Event]:
        return []


CallStream = CallParser | NamedCall | RequiredCalls


def call_stream(tools: Tools | None) -> CallStream | None:
    """How one choice's text becomes content and calls; None when tools play no part."""
    if tools is None or tools.choice == "none":
        return None
    if tools.named is not None:
        return NamedCall(tools.named)
    if tools.choice == "required":
        return RequiredCalls()
    return CallParser(tools.parallel, tools.json_calls)


@dataclass
class ParsedAnswer:
    content: str | None
    tool_calls: list[ToolCall]


def parse_answer(text: str, tools: Tools | None) -> ParsedAnswer:
    """A whole answer's content and calls (the same parser the stream uses)."""
    stream = call_stream(tools)
    if stream is None:
        return ParsedAnswer(text, [])
    events = stream.feed(text) + stream.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls: dict[int, ToolCall] = {}
    for event in events:
        if isinstance(event, ToolCallDelta):
            known = calls.get(event.index)
            if known is None:
                calls[event.index] = ToolCall(event.id or "", event.name or "", event.arguments)
            else:
                calls[event.index] = replace(known, arguments=known.arguments + event.arguments)
    if calls and not content.strip():
        return ParsedAnswer(None, list(calls.values()))
    return ParsedAnswer(content, list(calls.values()))
