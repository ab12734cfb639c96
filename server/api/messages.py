"""Anthropic's Messages API (`POST /v1/messages`), served as a chat completion: the request
becomes a chat completion's body (so every check, limit and default of the chat route applies),
the answer becomes a `message` with content blocks (thinking, text, tool_use), and a streamed
answer becomes the events the Anthropic SDK reads (`message_start` ... `message_stop`).

Anthropic's clients send what its SDK sends: `x-api-key` for the key (accepted beside
`Authorization: Bearer`), `anthropic-version` (ignored), and they read errors in Anthropic's
envelope (`{"type": "error", "error": {"type", "message"}}`), which every answer under
/v1/messages uses (server/api/errors.py).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    PrivateAttr,
    StrictBool,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import from_json

from server.api.dialects import THINKING_SWITCH
from server.api.errors import (
    SERVER_ERROR,
    THREAD_UNSUPPORTED,
    anthropic_error_type,
    anthropic_message,
)
from server.api.fields import MAX_CACHE_SALT, PartModel, Priority, StopString, StrictModel, Text
from server.api.message_params import Turns
from server.api.sse import answer_pieces, named_event
from server.engine.sequence import SequenceOutput
from server.exceptions import AnswerTooLong, InvalidRequest, PromptTooLong, ServerError
from server.media.image import VIDEO_HINT, VIDEO_PART_HINT
from server.pipelines.chat import ChatResult, ChatRun, ChoiceResult
from server.pipelines.reasoning import Reasoning, ReasoningStream
from server.pipelines.tools import (
    Event,
    NamedCall,
    RequiredCalls,
    ToolCallDelta,
    Tools,
    call_stream,
)

# -- request ----------------------------------------------------------------------------------

MEDIA_TYPES = Literal["image/jpeg", "image/png", "image/gif", "image/webp"]


class TextBlock(PartModel):
    type: Literal["text"]
    text: Text
    # cache_control and citations: accepted and ignored (the prefix cache is automatic)


class Base64Source(PartModel):
    type: Literal["base64"]
    media_type: MEDIA_TYPES
    data: str = Field(min_length=1)


class UrlSource(PartModel):
    type: Literal["url"]
    url: str = Field(min_length=1)


class FileSource(PartModel):
    """An image uploaded to the Files API (POST /v1/files), by its id."""

    type: Literal["file"]
    file_id: str


ImageSource = Annotated[Base64Source | UrlSource | FileSource, Field(discriminator="type")]


class ImageBlock(PartModel):
    type: Literal["image"]
    source: ImageSource

    def to_chat(self) -> dict[str, Any]:
        source = self.source
        if isinstance(source, FileSource):
            return {"type": "input_image", "file_id": source.file_id}
        if isinstance(source, Base64Source):
            url = f"data:{source.media_type};base64,{source.data}"
        else:
            url = source.url
        return {"type": "image_url", "image_url": {"url": url}}


class ToolUseBlock(PartModel):
    """An earlier answer's tool call."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(PartModel):
    """The result of a tool call, for the model to read."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: Text | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] = ""
    is_error: bool | None = None


class ThinkingBlock(PartModel):
    """An earlier answer's thinking: its turn's reasoning_content (Qwen3's thinking template
    keeps it for a tool-use loop's steps, as Anthropic asks thinking blocks back for, and
    drops it before the last user query); a redacted one holds nothing readable here."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None


class OtherBlock(PartModel):
    """A block this server cannot read (documents, search results, server tools' blocks):
    refused, by name."""

    type: str


BLOCK_TYPES = frozenset({"text", "image", "tool_use", "tool_result", "thinking"})


def _block_kind(block: Any) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        return "other"  # (its type is then a 400 naming it)
    if kind == "redacted_thinking":
        return "thinking"
    return kind if kind in BLOCK_TYPES else "other"


Block = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ImageBlock, Tag("image")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_block_kind),
]


class InputMessage(PartModel):
    role: Literal["user", "assistant", "system"]
    content: Text | list[Block]


class CustomTool(PartModel):
    """A tool the client runs (Anthropic's "custom" tool: a name and a JSON schema)."""

    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None

    @field_validator("input_schema")
    @classmethod
    def _an_object(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type") != "object":  # (Anthropic's rule: input is an object)
            raise ValueError('input_schema: type must be "object"')
        return schema

    def to_chat(self) -> dict[str, Any]:
        function = {"name": self.name, "parameters": self.input_schema}
        if self.description is not None:
            function["description"] = self.description
        if self.strict is not None:
            function["strict"] = self.strict
        return {"type": "function", "function": function}


class ServerTool(PartModel):
    """A tool Anthropic's servers run (web search, code execution, bash, ...): refused."""

    type: str


def _tool_kind(tool: Any) -> str:
    kind = tool.get("type") if isinstance(tool, dict) else None
    return "custom" if kind in (None, "custom") else "server"


Tool = Annotated[
    Annotated[CustomTool, Tag("custom")] | Annotated[ServerTool, Tag("server")],
    Discriminator(_tool_kind),
]


class ToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(default=None, min_length=1)  # type "tool"'s
    disable_parallel_tool_use: bool | None = None

    def to_chat(self) -> str | dict[str, Any]:
        if self.type == "tool":
            if self.name is None:
                raise InvalidRequest(
                    "tool_choice of type tool needs the tool's name.",
                    param="tool_choice.name",
                    code="invalid_value",
                )
            return {"type": "function", "function": {"name": self.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class ThinkingConfig(PartModel):
    """Whether to think: "disabled" (or no `thinking`, as Anthropic's default) closes a
    thinking checkpoint's reasoning in the prompt (chat's `enable_thinking: false`); an
    -Instruct checkpoint never thinks.
    `budget_tokens` ends the reasoning once it has that many tokens (its "</think>" forced;
    max_tokens still counts the reasoning too); `display` "omitted" sends thinking blocks
    without their text."""

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(default=None, ge=1, lt=2**31)
    display: Literal["summarized", "omitted"] | None = None


class OutputFormat(StrictModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")

    def to_response_format(self) -> dict[str, Any]:
        schema = {"name": "output", "schema": self.schema_, "strict": True}
        return {"type": "json_schema", "json_schema": schema}


class OutputConfig(StrictModel):
    effort: str | None = None  # no Qwen-VL checkpoint has an effort level
    format: OutputFormat | None = None


class Metadata(StrictModel):
    user_id: str | None = None


class ThinkingTurns(StrictModel):
    type: Literal["thinking_turns"]
    value: int = Field(ge=1)  # (Anthropic's least)


class ClearThinking(StrictModel):
    """The context-management beta's thinking edit (Claude Code sends it with thinking on):
    the thinking of all but the last `keep` assistant turns left out of the prompt ("all":
    none; default: the last turn's, as Anthropic's). (A Qwen3 thinking template shows only
    the current tool loop's reasoning whatever is kept.)"""

    type: Literal["clear_thinking_20251015"]
    keep: Literal["all"] | ThinkingTurns = ThinkingTurns(type="thinking_turns", value=1)


class ContextManagement(StrictModel):
    edits: list[dict[str, Any]] = Field(default_factory=list)

    def thinking_turns_kept(self) -> int | None:
        """The assistant turns whose thinking stays in the prompt (None: all). An edit that
        clears tool results (clear_tool_uses_20250919) is refused: it is not done here."""
        kept: int | None = None
        for index, edit in enumerate(self.edits):
            param = f"context_management.edits[{index}]"
            if edit.get("type") != "clear_thinking_20251015":
                named = (
                    f"{edit['type']!r} edits are" if "type" in edit else "An edit without a type is"
                )
                raise InvalidRequest(
                    f"{named} not supported here: clear_thinking_20251015 only (tool results "
                    "are never cleared).",
                    param=f"{param}.type",
                    code="unsupported_parameter",
                )
            try:
                keep = ClearThinking.model_validate(edit).keep
            except ValidationError:
                raise InvalidRequest(
                    'A clear_thinking_20251015 edit takes type and keep: "all" or {"type": '
                    '"thinking_turns", "value": N}, N >= 1.',
                    param=param,
                    code="invalid_value",
                ) from None
            kept = None if keep == "all" else keep.value
        return kept


# Fields that would need what is not here: a code-execution container, MCP servers the host
# connects to, context edits the host makes between turns.
MESSAGES_UNSUPPORTED_WHEN = {
    "container": lambda v: v is not None,
    "mcp_servers": lambda v: bool(v),
}


class MessagesRequest(StrictModel):
    model: str
    max_tokens: int = Field(ge=1)
    messages: Annotated[list[InputMessage], Turns] = Field(min_length=1)
    system: Text | list[TextBlock] | None = None
    stop_sequences: list[StopString] | None = Field(default=None, max_length=16)
    stream: StrictBool | None = False
    # Sampling: Anthropic's ranges (temperature 0..1); top_k is a plain cut-off.
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's name
    metadata: Metadata | None = None
    # Accepted with no effect: hints for a hosted service (the prefix cache is automatic).
    cache_control: dict[str, Any] | None = None
    service_tier: str | None = None
    speed: str | None = None
    inference_geo: str | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    # extension (vLLM's): the prefix cache (and vision cache, grammars) shared only under the
    # same salt
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT)
    priority: Priority | None = None  # extension (vLLM's): --scheduling-policy priority
    # extension (vLLM's, as chat's): the answer runs to max_tokens past the end of text, as
    # benchmark clients (aiperf) ask of every endpoint
    ignore_eos: bool | None = None
    context_management: ContextManagement | None = None  # (its thinking edit only)
    # Refused when set (MESSAGES_UNSUPPORTED_WHEN).
    container: Any | None = None
    mcp_servers: list[Any] | None = None
    # The message-threads beta (the server keeps the conversation): refused as Anthropic
    # refuses a request threads cannot serve, so the SDK sends the whole conversation instead.
    thread: dict[str, Any] | None = None

    # Where each chat message, and each of its parts, came from ("messages[2].content[1]").
    _origins: list[list[str]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check_as_anthropic(self) -> MessagesRequest:
        """What Anthropic's API refuses that a chat completion would take."""
        thinking = self.thinking
        budget = thinking.budget_tokens if thinking and thinking.type == "enabled" else None
        # (count_tokens takes no max_tokens: only one the request sent is checked)
        if (
            budget is not None
            and "max_tokens" in self.model_fields_set
            and budget >= self.max_tokens
        ):
            raise ValueError("max_tokens must be greater than thinking.budget_tokens")
        names = [tool.name for tool in self.tools or () if isinstance(tool, CustomTool)]
        if len(set(names)) < len(names):
            raise ValueError("tools: tool names must be unique")
        if any(not stop.strip() for stop in self.stop_sequences or ()):
            raise ValueError("stop_sequences: each must contain non-whitespace characters")
        for index, message in enumerate(self.messages):
            final_assistant = index == len(self.messages) - 1 and message.role == "assistant"
            if not final_assistant and _empty(message.content):
                raise ValueError(
                    f"messages.{index}: all messages must have non-empty content except for "
                    "the optional final assistant message"
                )
            if final_assistant and _last_text(message.content).endswith((" ", "\n", "\t")):
                raise ValueError("final assistant content cannot end with trailing whitespace")
        if isinstance(self.system, list) and any(not block.text for block in self.system):
            raise ValueError("system: text content blocks must be non-empty")
        return self

    def unsupported_fields(self) -> list[str]:
        return [n for n, used in MESSAGES_UNSUPPORTED_WHEN.items() if used(getattr(self, n))]

    @property
    def omits_thinking(self) -> bool:
        return self.thinking is not None and self.thinking.display == "omitted"

    def to_chat_body(self) -> dict[str, Any]:
        """The chat completion's body this request is."""
        if self.thread is not None:
            raise InvalidRequest(
                "thread: this server keeps no message threads; send the whole conversation "
                "in messages, without thread.",
                param="thread",
                code=THREAD_UNSUPPORTED,
            )
        self._refuse_server_tools()
        messages = self._messages()
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "stop": self.stop_sequences,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "cache_salt": self.cache_salt,
            "priority": self.priority,
            "ignore_eos": self.ignore_eos,
        }
        # Disabled, or not asked for (Anthropic's default), answers at once: the reasoning
        # closed in the prompt, as chat's enable_thinking false closes it.
        thinks = THINKING_SWITCH.get(self.thinking.type) if self.thinking is not None else False
        if thinks is not None:
            body["chat_template_kwargs"] = {"enable_thinking": thinks}
        if self.thinking is not None and self.thinking.type == "enabled":
            body["thinking_token_budget"] = self.thinking.budget_tokens
        if messages[-1]["role"] == "assistant":  # prefill: the answer continues it
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        if self.tools is not None:  # ([]: none, whatever tool_choice says, as chat reads it)
            body["tools"] = [tool.to_chat() for tool in self.tools if isinstance(tool, CustomTool)]
        if self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice.to_chat()
            if self.tool_choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
        if self.output_config is not None and self.output_config.format is not None:
            if self.output_format is not None:
                raise InvalidRequest(
                    "output_format and output_config.format both set: send one.",
                    param="output_format",
                    code="invalid_value",
                )
            body["response_format"] = self.output_config.format.to_response_format()
        elif self.output_format is not None:
            body["response_format"] = self.output_format.to_response_format()
        return {key: value for key, value in body.items() if value is not None}

    def _refuse_server_tools(self) -> None:
        for index, tool in enumerate(self.tools or ()):
            if isinstance(tool, ServerTool):
                raise InvalidRequest(
                    f"The {tool.type} tool is not available on this server: it runs no server "
                    "tools (web search, code execution, bash, ...); custom tools only.",
                    param=f"tools[{index}].type",
                    code="unsupported_parameter",
                )

    def _messages(self) -> list[dict[str, Any]]:
        """Chat messages: consecutive turns of one role combined into one (as Anthropic does),
        tool results as tool messages before the rest of their turn, tool_use blocks as the
        assistant's tool calls."""
        chat = ChatMessages()
        if self.system:
            chat.add("system", _system_parts(self.system), "system")
        for i, message in enumerate(self.messages):
            where = f"messages[{i}]"
            if isinstance(message.content, str):
                chat.add(message.role, [(_text_part(message.content), where)], where)
                continue
            # A user turn's tool results first (Anthropic's order: they answer the calls just
            # before), then the rest of the turn.
            blocks = sorted(
                enumerate(message.content), key=lambda b: not isinstance(b[1], ToolResultBlock)
            )
            for j, block in blocks:
                chat.add_block(message.role, block, f"{where}.content[{j}]")
        chat.check_answered()
        if self.context_management is not None:
            chat.clear_thinking(self.context_management.thinking_turns_kept())
        self._origins = chat.origins
        if not chat.messages:
            raise InvalidRequest(
                "messages hold no content.", param="messages", code="invalid_value"
            )
        return chat.messages

    def truncatable(self) -> int:
        """Anthropic's API has no truncation: a prompt past the context is a 400."""
        return 0

    def truncate(self, spans: int) -> None:
        return None

    def truncated(self) -> int:
        return 0

    def name_error(self, exc: ServerError) -> None:
        """A chat error as this body names things: messages[k].content[j] -> the block it came
        from; response_format -> output_config.format; tools[i].function.x -> tools[i].x."""

        def origin(match: re.Match[str]) -> str:
            k, j = int(match.group(1)), match.group(3)
            if k >= len(self._origins):
                return match.group(0)
            parts = self._origins[k]
            if j is not None and int(j) < len(parts) - 1:
                return parts[int(j) + 1]
            return parts[0]

        if isinstance(exc, AnswerTooLong):  # (Anthropic's words, which its clients look for)
            exc.message = (
                "input length and `max_tokens` exceed context limit: "
                f"{exc.num_tokens} + {exc.answer_tokens} > {exc.max_tokens}, decrease input "
                "length or `max_tokens` and try again"
            )
            exc.param = None  # (as Anthropic's: the message starts with those words)
        elif isinstance(exc, PromptTooLong):
            exc.message = f"prompt is too long: {exc.num_tokens} tokens > {exc.max_tokens} maximum"
            exc.param = None
        elif exc.code == "context_length_exceeded" and exc.param == "messages":
            exc.message = f"prompt is too long: {exc.message}"  # (its tokens not counted)
            exc.param = None
        elif exc.param is not None and exc.param.startswith("messages"):
            message = exc.message.replace(VIDEO_HINT, VIDEO_HERE)
            message = message.replace(VIDEO_PART_HINT, VIDEO_HERE)
            exc.message = MESSAGE_PART.sub(origin, message)
            exc.param = MESSAGE_PART.sub(origin, exc.param)
        elif exc.param is not None and exc.param.startswith("response_format"):
            exc.rename_param(
                "output_config.format" if self.output_format is None else "output_format"
            )
        elif exc.param is not None and exc.param.startswith(("tools", "tool_choice")):
            exc.param = exc.param.replace(".function.parameters", ".input_schema", 1)
            exc.param = exc.param.replace(".function.", ".", 1)
        elif exc.param is not None and exc.param.startswith("stop["):
            exc.param = "stop_sequences" + exc.param.removeprefix("stop")
        elif exc.param == "stop":
            exc.param = "stop_sequences"


# A video sent as an image: Anthropic's blocks hold no video, chat's video_url part does.
VIDEO_HERE = (
    "; it is a video, and Anthropic's Messages API has no video blocks: send it to "
    "/v1/chat/completions as a video_url part"
)
MESSAGE_PART = re.compile(r"messages\[(\d+)\](\.content(?:\[(\d+)\])?)?")


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _part(block: TextBlock | ImageBlock) -> dict[str, Any]:
    return block.to_chat() if isinstance(block, ImageBlock) else _text_part(block.text)


def _system_parts(system: str | list[TextBlock]) -> list[tuple[dict[str, Any], str]]:
    if isinstance(system, str):
        return [(_text_part(system), "system")]
    return [(_text_part(b.text), f"system[{i}]") for i, b in enumerate(system)]


def _last_text(content: str | list[Any]) -> str:
    """The text a message ends with ("" when its last block is not text)."""
    if isinstance(content, str):
        return content
    return content[-1].text if content and isinstance(content[-1], TextBlock) else ""


def _empty(content: str | list[Any]) -> bool:
    """No content: an empty string or list, or text blocks that are all empty."""
    if isinstance(content, str):
        return not content
    return all(isinstance(block, TextBlock) and not block.text for block in content)


class ChatMessages:
    """The chat messages being built, and where each one and each of its parts came from
    (origins[k] = [the message's origin, its parts' origins...])."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.origins: list[list[str]] = []
        self.calls: set[str] = set()
        self.unanswered: dict[str, str] = {}  # tool_use ids with no result yet -> where
        self.reasoning = ""  # a thinking block's, for its turn's next text or tool_use

    def add(self, role: str, parts: list[tuple[dict[str, Any], str]], where: str) -> None:
        """Parts for a turn of `role`: into the last message if it is that role's turn."""
        last = self.messages[-1] if self.messages else None
        if last is None or last["role"] != role or role == "system":
            self.messages.append({"role": role, "content": []})
            self.origins.append([where])
        self.messages[-1]["content"] += [part for part, _ in parts]
        self.origins[-1] += [origin for _, origin in parts]

    def add_block(self, role: str, block: Any, where: str) -> None:
        if isinstance(block, OtherBlock):
            raise InvalidRequest(
                f"{block.type} blocks are not supported here: text, image, tool_use, "
                "tool_result and thinking only.",
                param=f"{where}.type",
                code="unsupported_parameter",
            )
        if isinstance(block, ThinkingBlock):
            if role == "assistant" and block.thinking:  # (for the turn's text or tool_use)
                self.reasoning += block.thinking
            return
        if isinstance(block, ToolUseBlock):
            self._call(role, block, where)
        elif isinstance(block, ToolResultBlock):
            self._result(role, block, where)
        else:
            self.add(role, [(_part(block), where)], where)
        if role == "assistant" and self.reasoning:
            message = self.messages[-1]
            message["reasoning_content"] = message.get("reasoning_content", "") + self.reasoning
        self.reasoning = ""  # (a turn of thinking alone: nothing for it to go with)

    def clear_thinking(self, kept: int | None) -> None:
        """The reasoning of all but the last `kept` assistant turns that have some left out
        (None: all kept)."""
        if kept is None:
            return
        thought = [m for m in self.messages if "reasoning_content" in m]
        for message in thought[: max(len(thought) - kept, 0)]:
            del message["reasoning_content"]

    def _call(self, role: str, block: ToolUseBlock, where: str) -> None:
        if role != "assistant":
            raise InvalidRequest(
                "tool_use blocks are the assistant's: a user turn cannot hold one.",
                param=f"{where}.type",
                code="invalid_value",
            )
        self.add(role, [], where)  # the assistant's message the call goes in
        arguments = json.dumps(block.input, ensure_ascii=False)
        call = {"id": block.id, "type": "function"}
        call["function"] = {"name": block.name, "arguments": arguments}
        self.messages[-1].setdefault("tool_calls", []).append(call)
        self.calls.add(block.id)
        self.unanswered[block.id] = where

    def check_answered(self) -> None:
        """Every tool_use has its tool_result (as Anthropic requires): a conversation that
        ends on a call is not a prefill to continue."""
        if self.unanswered:
            call_id, where = next(iter(self.unanswered.items()))
            raise InvalidRequest(
                f"tool_use block {call_id!r} has no tool_result block after it: send the "
                "result in the user turn that follows.",
                param=f"{where}.id",
                code="invalid_value",
            )

    def _result(self, role: str, block: ToolResultBlock, where: str) -> None:
        if role != "user":
            raise InvalidRequest(
                "tool_result blocks are the user's: an assistant turn cannot hold one.",
                param=f"{where}.type",
                code="invalid_value",
            )
        self.unanswered.pop(block.tool_use_id, None)
        if block.tool_use_id not in self.calls:
            raise InvalidRequest(
                f"tool_result block with tool_use_id {block.tool_use_id!r} has no tool_use "
                "block before it with that id.",
                param=f"{where}.tool_use_id",
                code="invalid_value",
            )
        if isinstance(block.content, str):
            parts = [(_text_part(block.content), where)]
        else:
            parts = [(_part(b), f"{where}.content[{i}]") for i, b in enumerate(block.content)]
        if block.is_error:
            parts.insert(0, (_text_part("Error: "), where))
        content = [p for p, _ in parts] or ""  # (its images among them, where they were)
        self.messages.append(
            {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}
        )
        self.origins.append([where, *(origin for _, origin in parts)])


class CountTokensRequest(MessagesRequest):
    """`POST /v1/messages/count_tokens`: a Messages body (max_tokens optional) -> the tokens
    its system prompt, messages and tools take."""

    max_tokens: int = Field(default=1, ge=1)  # nothing is generated


class TokensCount(BaseModel):
    input_tokens: int


# -- response ---------------------------------------------------------------------------------


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def usage_of(run: ChatRun) -> dict[str, Any]:
    """Anthropic's usage: input_tokens are the prompt's tokens not read from the cache."""
    usage = run.usage()
    return {
        "input_tokens": usage.num_prompt - usage.num_cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.num_cached,
        # (Anthropic's always says it; the prefix cache writes no billed cache entries)
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": usage.num_completion,
        "service_tier": "standard",
    }


def stop_of(reason: str, stop: str | int | None, called: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of an answer that ended for the engine's `reason`."""
    if reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if isinstance(stop, str):
        return "stop_sequence", stop
    return "end_turn", None


class MessageObject(BaseModel):
    """Anthropic's `message` (the fields this server can fill)."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: dict[str, Any]


class AnthropicErrorInfo(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    """Anthropic's error envelope (every error under /v1/messages)."""

    type: Literal["error"] = "error"
    error: AnthropicErrorInfo
    request_id: str | None = None


def thinking_block(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": text, "signature": ""}


def tool_use_block(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A call as Anthropic writes it: its id "toolu_..." (the chat layer's are "call_...")."""
    block_id = f"toolu_{call_id.removeprefix('call_')}"
    return {"type": "tool_use", "id": block_id, "name": name, "input": arguments}


def content_blocks(choice: ChoiceResult, omit_thinking: bool) -> list[dict[str, Any]]:
    """A whole answer as content blocks: its thinking, its text, its tool calls."""
    blocks = []
    if choice.reasoning_content:
        blocks.append(thinking_block("" if omit_thinking else choice.reasoning_content))
    text, calls = choice.content, [(c.id, c.name, _input(c.arguments)) for c in choice.tool_calls]
    if text:  # (an empty answer has no block at all: Anthropic's content is then [])
        blocks.append({"type": "text", "text": text})
    blocks += [tool_use_block(*call) for call in calls]
    return blocks


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as its input; of a call cut off by max_tokens, what was written
    (as Anthropic's cut-off tool_use blocks)."""
    value = _partial_json(arguments)
    return value if isinstance(value, dict) else {}


def _partial_json(text: str) -> Any:
    try:
        return from_json(text, allow_partial="trailing-strings")
    except ValueError:
        return None


def completed(body: MessagesRequest, result: ChatResult) -> MessageObject:
    choice = result.choices[0]
    reason, stop = stop_of(choice.finish_reason, choice.stop_reason, bool(choice.tool_calls))
    return MessageObject(
        id=message_id(),
        model=body.model,
        content=content_blocks(choice, body.omits_thinking),
        stop_reason=reason,
        stop_sequence=stop,
        usage=usage_of(result.run),
    )


SIGNATURE_DELTA = {"type": "signature_delta", "signature": ""}


def event(kind: str, **fields: Any) -> str:
    """One server-sent event, as Anthropic sends them: its type named twice."""
    return named_event(kind, {"type": kind, **fields})


class MessageEvents:
    """A streamed answer as the Messages events, in the order the Anthropic SDK accumulates
    them: message_start, ping; each content block started, its deltas, stopped (thinking,
    then text, then each tool call); message_delta with the stop reason and usage;
    message_stop."""

    def __init__(
        self,
        message: MessageObject,
        tools: Tools | None,
        reasoning: bool,
        omit: bool,
    ):
        self.message = message
        self.calls = call_stream(tools)
        self.reasoning = ReasoningStream() if reasoning else None
        self.omit_thinking = omit
        self.index = -1  # of the last block started
        self.open: str | None = None  # the open block's type
        self.called = False

    def begin(self) -> list[str]:
        # Anthropic's streams hold a ping near their start (clients are written to skip it)
        return [event("message_start", message=self.message.model_dump()), event("ping")]

    def feed(self, output: SequenceOutput) -> list[str]:
        pieces = answer_pieces(output, self.reasoning, self.calls)
        return [e for piece in pieces for e in self._piece(piece)]

    def end(self, output: SequenceOutput, run: ChatRun) -> list[str]:
        """The last events, once the answer is in."""
        events = self._stop()  # (an empty answer started no block, as Anthropic's streams)
        reason, stop = stop_of(output.finish_reason or "stop", output.stop_reason, self.called)
        usage = usage_of(run)
        return events + [
            event(
                "message_delta",
                delta={"stop_reason": reason, "stop_sequence": stop},
                # (as Anthropic's message_delta: the counts, not the tier or cache breakdown)
                usage={
                    k: v for k, v in usage.items() if k not in ("service_tier", "cache_creation")
                },
            ),
            event("message_stop"),
        ]

    def failed(self, exc: ServerError | None, run: ChatRun) -> list[str]:
        """An error after the stream began (None: the server's own fault): the open block
        stopped, then the error."""
        error = {"type": "api_error", "message": SERVER_ERROR}
        if exc is not None:
            message = anthropic_message(exc.message, exc.param)
            error = {"type": anthropic_error_type(exc.status_code), "message": message}
        return [*self._stop(), event("error", error=error)]

    def _piece(self, piece: Reasoning | Event) -> list[str]:
        if isinstance(piece, Reasoning):
            events = [] if self.open == "thinking" else self._start(thinking_block(""))
            if self.omit_thinking:
                return events
            delta = {"type": "thinking_delta", "thinking": piece.text}
            return events + [self._delta(delta)]
        if isinstance(piece, ToolCallDelta):
            if piece.id is None:  # more of a named call's arguments, as they come
                return [self._input_delta(piece.arguments)] if piece.arguments else []
            self.called = True
            if isinstance(self.calls, NamedCall | RequiredCalls):  # arguments stream from here
                events = self._start(tool_use_block(piece.id, piece.name or "", {}))
                return events + ([self._input_delta(piece.arguments)] if piece.arguments else [])
            return self._call(piece.id, piece.name or "", _input(piece.arguments))
        if not piece:
            return []
        events = [] if self.open == "text" else self._start({"type": "text", "text": ""})
        return events + [self._delta({"type": "text_delta", "text": piece})]

    def _call(self, call_id: str, name: str, arguments: dict[str, Any]) -> list[str]:
        """A whole call: its block, its input (an object) in one delta."""
        events = self._start(tool_use_block(call_id, name, {}))
        return events + [self._input_delta(json.dumps(arguments, ensure_ascii=False))]

    def _input_delta(self, partial_json: str) -> str:
        return self._delta({"type": "input_json_delta", "partial_json": partial_json})

    def _start(self, block: dict[str, Any]) -> list[str]:
        events = self._stop()
        self.index += 1
        self.open = block["type"]
        return events + [event("content_block_start", index=self.index, content_block=block)]

    def _delta(self, delta: dict[str, Any]) -> str:
        return event("content_block_delta", index=self.index, delta=delta)

    def _stop(self) -> list[str]:
        if self.open is None:
            return []
        # A thinking block's signature comes last, as Anthropic's streams send it (empty:
        # nothing here signs the reasoning).
        events = [self._delta(SIGNATURE_DELTA)] if self.open == "thinking" else []
        self.open = None
        return [*events, event("content_block_stop", index=self.index)]
