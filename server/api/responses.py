"""The Responses API (`POST /v1/responses`), OpenAI's newer interface, served as a chat
completion: the request becomes a chat completion's body (so every check, limit and default of
the chat route applies), the answer becomes a `response` object, and a streamed answer becomes
the Responses events (`response.created` ... `response.completed`) the OpenAI SDK reads.

Answers are stored (`store`, the default; server/jobs/responses.py): a request continues
one with `previous_response_id`, and `background: true` runs one as a durable job
(server/pipelines/background.py) that GET /v1/responses/{id} polls.
"""

from __future__ import annotations

import base64
import logging
import re
import string
import time
import uuid
from itertools import pairwise
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    PrivateAttr,
    StrictBool,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from server.api.dialects import REPETITION_PENALTY_NAMES, llama_cpp_options
from server.api.errors import SERVER_ERROR
from server.api.fields import (
    MAX_CACHE_SALT,
    LogitBias,
    MetadataPairs,
    PartModel,
    Priority,
    ReasoningEffort,
    Stop,
    StopTokenId,
    StrictModel,
    Text,
)
from server.api.message_params import CallArguments, ContentPart, Turns
from server.api.protocol import SCHEMA_NAME, ChatCompletionTokenLogprob, StructuredOutputsParam
from server.api.sse import answer_pieces, named_event
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence, SequenceOutput
from server.exceptions import InvalidRequest, PromptTooLong, ServerError
from server.pipelines.chat import ChatResult, ChatRun, ChoiceResult
from server.pipelines.logprobs import TokenLogprob, TokenTexts
from server.pipelines.messages import ChatMessage
from server.pipelines.reasoning import Reasoning, ReasoningStream, answer_start
from server.pipelines.tools import Event, ToolCallDelta, Tools, call_stream

logger = logging.getLogger(__name__)

# -- request ----------------------------------------------------------------------------------


class InputMessage(PartModel):
    """A message: the user's, the system's, or an earlier answer replayed (its id and status
    are ignored: stored, it gets an id of its own)."""

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]


TOOL_NAME = r"^[A-Za-z0-9_-]+$"  # (OpenAI's rule for a function's and a namespace's name)


class FunctionCallItem(PartModel):
    """An earlier answer's function call."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: CallArguments  # (one cut off by max_output_tokens is sent back as it is)
    # a namespace tool's function's (NamespaceTool)
    namespace: str | None = Field(default=None, max_length=64, pattern=TOOL_NAME)

    @property
    def offered_name(self) -> str:
        """The name the model was offered the function by."""
        return self.name if self.namespace is None else qualified(self.namespace, self.name)


class FunctionCallOutputItem(PartModel):
    """The result of a function call, for the model to read."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Text | list[ContentPart]


class ItemReference(PartModel):
    """An item of a stored response by id (`item_reference`), in a request's input: the item
    itself goes there (resolve_references)."""

    type: Literal["item_reference"] = "item_reference"
    id: str


class ReasoningItem(PartModel):
    """An earlier answer's reasoning: the next assistant message's reasoning_content (Qwen3's
    thinking template keeps it for a tool-call loop's steps, drops it before the last user
    query). Read from its content, else its encrypted_content (one this server wrote), else
    its summary (this server's is the reasoning itself)."""

    type: Literal["reasoning"]
    content: list[dict[str, Any]] | None = None  # [{"type": "reasoning_text", "text"}]
    encrypted_content: str | None = None
    summary: list[dict[str, Any]] | None = None  # [{"type": "summary_text", "text"}]

    def text(self) -> str:
        if written := _texts(self.content):
            return written
        if self.encrypted_content and (unsealed := unsealed_reasoning(self.encrypted_content)):
            return unsealed
        return _texts(self.summary)


def _texts(parts: list[dict[str, Any]] | None) -> str:
    return "".join(part["text"] for part in parts or () if isinstance(part.get("text"), str))


class ReasoningShown(NamedTuple):
    """What a reasoning item carries beside its reasoning_text: the reasoning as its summary
    (reasoning.summary asked for), sealed as its encrypted_content (include asked for it)."""

    summary: bool = False
    encrypted: bool = False


# A reasoning item's encrypted_content as this server writes it (include
# ["reasoning.encrypted_content"]): the reasoning, for a client that stores nothing (store
# false) to send back. Encoded, not encrypted: it holds what the client was shown anyway.
SEALED_PREFIX = "qvr1."


def sealed_reasoning(text: str) -> str:
    return SEALED_PREFIX + base64.urlsafe_b64encode(text.encode()).decode()


def unsealed_reasoning(sealed: str) -> str | None:
    """The reasoning in an encrypted_content this server wrote; None for another's (another
    provider's: its reasoning is not readable here, and is left out, logged)."""
    try:
        if sealed.startswith(SEALED_PREFIX):
            return base64.urlsafe_b64decode(sealed[len(SEALED_PREFIX) :]).decode()
    except (ValueError, UnicodeDecodeError):
        pass
    logger.debug("a reasoning item's encrypted_content is not this server's: left out")
    return None


def _item_kind(item: Any) -> str:
    if not isinstance(item, dict):
        return "message"
    if "type" not in item and "role" not in item and "id" in item:
        return "item_reference"  # the SDK's {"id": ...} form
    return item.get("type", "message")


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[ItemReference, Tag("item_reference")],
    Discriminator(_item_kind),
]
HISTORY = TypeAdapter(list[InputItem])
# Ids of stored input items, by type, as OpenAI's look.
ITEM_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
}


class FunctionTool(StrictModel):
    """A function the model may call (the Responses API's flat form of chat's tool)."""

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None  # (tool search's: every tool is offered at once here)

    def to_chat(self, name: str | None = None) -> dict[str, Any]:
        function = self.model_dump(exclude={"type", "defer_loading"}, exclude_none=True)
        return {"type": "function", "function": function | {"name": name or self.name}}


def qualified(namespace: str, name: str) -> str:
    """A namespace tool's function's name as the model is offered it: Codex's flat form of
    it (mcp__server__tool; the namespace's trailing and the name's leading "_" trimmed)."""
    return f"{namespace.rstrip('_')}__{name.lstrip('_')}"


class NamespaceTool(StrictModel):
    """Function tools grouped under a name, a client's own (Codex sends its MCP servers' and
    its agents' tools so): each is offered to the model as qualified()'s name, and its calls
    come back under their own name with the `namespace`, by which the client routes them."""

    type: Literal["namespace"]
    name: str = Field(min_length=1, max_length=64, pattern=TOOL_NAME)
    description: str | None = None
    tools: list[FunctionTool] = Field(min_length=1, max_length=128)


class Offered(NamedTuple):
    """A function offered to the model: the name it is offered by, where it is in the
    request, and the namespace it is in (None: a plain function tool)."""

    name: str
    function: FunctionTool
    where: str
    namespace: str | None = None


class HostedTool(PartModel):
    """A tool the host runs (web search, file search, MCP, ...): refused, by name."""

    type: str


def _tool_kind(tool: Any) -> str:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind == "function":
        return "function_tool"
    return "namespace_tool" if kind == "namespace" else "hosted_tool"  # (a type {}: a 400)


# (Tags the error handler leaves out of a field's name: tools[0].name, not tools[0].function...)
Tool = Annotated[
    Annotated[FunctionTool, Tag("function_tool")]
    | Annotated[NamespaceTool, Tag("namespace_tool")]
    | Annotated[HostedTool, Tag("hosted_tool")],
    Discriminator(_tool_kind),
]


class NamedFunction(StrictModel):
    type: Literal["function"]
    name: str = Field(min_length=1)
    namespace: str | None = Field(default=None, max_length=64, pattern=TOOL_NAME)

    def to_chat(self) -> dict[str, Any]:
        name = self.name if self.namespace is None else qualified(self.namespace, self.name)
        return {"type": "function", "function": {"name": name}}


class AllowedTools(StrictModel):
    """OpenAI's allowed_tools: only these of the tools may be called (chat's, as it names
    them)."""

    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[NamedFunction] = Field(min_length=1)

    def to_chat(self) -> dict[str, Any]:
        tools = [named.to_chat() for named in self.tools]
        return {"type": "allowed_tools", "allowed_tools": {"mode": self.mode, "tools": tools}}


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=SCHEMA_NAME)  # json_schema's
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    def to_response_format(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        if self.schema_ is None or not self.name:
            raise InvalidRequest(
                "text.format of type json_schema needs a name and a schema.",
                param="text.format",
                code="invalid_value",
            )
        schema = {
            "name": self.name,
            "description": self.description,
            "schema": self.schema_,
            "strict": self.strict,
        }
        return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v}}


class TextConfig(StrictModel):
    format: TextFormat | None = None
    # OpenAI's levels, echoed; no Qwen-VL checkpoint has an answer-length level
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(StrictModel):
    """`reasoning`: "effort": "none" turns a -Thinking checkpoint's reasoning off; the other
    levels change nothing (no Qwen-VL checkpoint has levels). A summary (any style) is the
    reasoning itself, whole: no checkpoint writes summaries, and clients that show only a
    summary (the Vercel AI SDK's Responses mode) would show nothing."""

    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # its old name


class ResponseStreamOptions(StrictModel):
    # OpenAI's random padding of deltas against length side channels: not sent by this server.
    include_obfuscation: bool | None = None
    # chat's, which benchmark clients (aiperf) send here too and vLLM takes: no effect (a
    # response's usage is always in its response.completed event)
    include_usage: bool | None = None


LOGPROBS = "message.output_text.logprobs"
# What `include` may ask for: the answer's logprobs; the reasoning's encrypted content
# (sealed_reasoning).
ENCRYPTED_REASONING = "reasoning.encrypted_content"
INCLUDABLE = frozenset({LOGPROBS, ENCRYPTED_REASONING})
# Fields that would need what is not here: prompt templates kept by the host, a cap on calls
# the host runs, other outputs to include.
RESPONSES_UNSUPPORTED_WHEN = {
    "prompt": lambda v: v is not None,
    "max_tool_calls": lambda v: v is not None,
    # screening, or compaction of the context between turns: work the answer would lack
    "moderation": lambda v: v is not None,
    "context_management": lambda v: bool(v),
    "include": lambda v: any(i not in INCLUDABLE for i in v or ()),
}


class ConversationRef(StrictModel):
    id: str = Field(min_length=1, max_length=200)


# What truncation "auto" never leaves out (see _spans).
TRUNCATION_KEEPS = "system and developer messages, the last turn's user message and its latest step"

# vLLM's chat fields its Responses API takes too: each goes to the chat completion as it is.
VLLM_CHAT_FIELDS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_reasoning",
    "structured_outputs",
    "chat_template_kwargs",
    "mm_processor_kwargs",
    "media_io_kwargs",
    "request_id",
)


class ResponsesRequest(StrictModel):
    @model_validator(mode="before")
    @classmethod
    def _llama_cpp_options(cls, data: Any) -> Any:
        return llama_cpp_options(data)  # (Open WebUI sends them here too)

    model: str
    # (optional, as OpenAI's: a conversation's next answer may need no new input)
    input: Annotated[Text | list[InputItem], Turns] = Field(default_factory=list)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    text: TextConfig | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | AllowedTools | None = None
    parallel_tool_calls: bool | None = None
    stream: StrictBool | None = False
    stream_options: ResponseStreamOptions | None = None
    # Whether the response is kept for previous_response_id and GET (OpenAI's default: yes;
    # the operator's --no-store-responses keeps none).
    store: StrictBool | None = None
    # The stored response this request continues: its conversation goes before `input`.
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=200)
    # Accepted with no effect: hints for a hosted service.
    metadata: MetadataPairs = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None  # (the prefix cache is automatic)
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    client_metadata: dict[str, str] | None = None  # (Codex's: its thread and turn ids)
    background_options: dict[str, Any] | None = None  # (a completion window: jobs run first come)
    image: dict[str, Any] | None = None  # (image context compression: images are sent whole)
    access_programs: dict[str, Any] | None = None
    reasoning: ReasoningConfig | None = None
    # "auto": a conversation too long for the context loses its oldest turns, then a tool
    # loop's oldest steps (_spans)
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    # extension (ours, as chat's): the response's image_sizes, each image as the model read it
    return_image_sizes: bool | None = None
    # extension (vLLM's): the prefix cache (and vision cache, grammars) shared only under the
    # same salt
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT)
    priority: Priority | None = None  # extension (vLLM's): see Priority
    # extension (vLLM's, as chat's): a thinking checkpoint's reasoning ends after this many
    # tokens (-1: no budget)
    thinking_token_budget: int | None = Field(default=None, ge=-1, lt=2**31)
    # extensions (vLLM's, which its Responses API takes as its chat API does; benchmarks send
    # ignore_eos): passed to the chat completion this request is (VLLM_CHAT_FIELDS)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=10, validation_alias=REPETITION_PENALTY_NAMES
    )
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    seed: int | None = None
    stop: Stop = None
    stop_token_ids: list[StopTokenId] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_reasoning: bool | None = None
    structured_outputs: StructuredOutputsParam | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    request_id: str | None = Field(default=None, max_length=256)
    # Run as a durable job: answered at once as queued, polled with GET /v1/responses/{id}.
    background: StrictBool | None = None
    # A conversation (POST /v1/conversations): its items go before `input`, and this
    # response's input and output items are added to it.
    conversation: str | ConversationRef | None = None
    # Refused when set (RESPONSES_UNSUPPORTED_WHEN).
    prompt: dict[str, Any] | None = None
    max_tool_calls: int | None = None
    moderation: dict[str, Any] | None = None
    context_management: list[dict[str, Any]] | None = None
    # With include [LOGPROBS]: how many likeliest tokens each token's entry lists.
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    # Where each message of the chat body came from ("input[3]", "instructions"), so a chat
    # error is named as this body has it: messages[4].content[1] -> input[3].content[1].
    _origins: list[str] = PrivateAttr(default_factory=list)
    # The conversation before `input` (previous_response_id's or conversation's items, oldest
    # first).
    _history: list[Any] = PrivateAttr(default_factory=list)
    _history_ids: list[str | None] = PrivateAttr(default_factory=list)  # (errors name them)
    _own: list[dict[str, Any]] | None = PrivateAttr(default=None)  # own_items(), made once
    # truncation "auto": how many of the conversation's oldest spans (_spans) the prompt
    # leaves out
    _dropped: int = PrivateAttr(default=0)

    def truncatable(self) -> int:
        """How many spans truncation "auto" may leave out of the prompt (none unless it is
        "auto"), oldest first (_spans), as OpenAI drops items to fit. (What is stored as the
        request's items does not change.)"""
        return len(self._spans()) if self.truncation == "auto" else 0

    def truncate(self, spans: int) -> None:
        """The prompt leaves the oldest `spans` out (at most truncatable())."""
        self._dropped = min(spans, self.truncatable())

    def truncated(self) -> int:
        """How many spans the prompt leaves out now."""
        return self._dropped

    def _items(self) -> list[tuple[Any, str]]:
        """The conversation's items and where each came from, oldest first."""
        items = [
            (item, f"{self.history_field} item {item_id}")
            for item, item_id in zip(self._history, self._history_ids, strict=True)
        ]
        if isinstance(self.input, str):
            items.append((InputMessage(role="user", content=self.input), "input"))
        else:
            items += [(item, f"input[{index}]") for index, item in enumerate(self.input)]
        return items

    def _spans(self) -> list[range]:
        """What truncation may leave out, in the order it does: each turn before the last (a
        user message and what follows it up to the next), then the last turn's oldest steps
        (an answer's calls and what came with them, and their outputs: a tool loop's task is
        one turn, a screenshot each step). System and developer messages stay, and so do the
        last turn's user message and its latest step."""
        items = [item for item, _ in self._items()]
        turns = [i for i, item in enumerate(items) if _is_user_message(item)]
        if not turns:
            return []
        steps = [turns[-1] + 1] if turns[-1] + 1 < len(items) else []
        unanswered: set[str] = set()  # (a step ends only once its calls have their outputs)
        for i in range(turns[-1] + 1, len(items)):
            if i > steps[0] and not unanswered and _step_ends_before(items, i):
                steps.append(i)
            if isinstance(items[i], FunctionCallItem):
                unanswered.add(items[i].call_id)
            elif isinstance(items[i], FunctionCallOutputItem):
                unanswered.discard(items[i].call_id)
        return [range(a, b) for a, b in pairwise([0, *turns[1:]])] + [
            range(a, b) for a, b in pairwise(steps)
        ]

    def _kept_items(self) -> list[tuple[Any, str]]:
        """The items the prompt holds: all, or with truncation's oldest spans left out."""
        items = self._items()
        if not self._dropped:
            return items
        left_out = {i for span in self._spans()[: self._dropped] for i in span}
        return [
            (item, where)
            for i, (item, where) in enumerate(items)
            if i not in left_out or _is_system_message(item)
        ]

    def continue_from(self, items: list[dict[str, Any]]) -> None:
        """The conversation before `input`: a stored response's items (inputs and outputs,
        which the Responses API makes readable as inputs)."""
        self._history_ids = [item.get("id") for item in items]
        try:
            self._history = HISTORY.validate_python(items)
        except ValidationError as exc:  # (a model's call whose JSON escapes a lone surrogate)
            error = exc.errors()[0]
            bad = items[error["loc"][0]].get("id")  # type: ignore[index]
            way_on = (
                f"delete that item from the conversation (DELETE .../items/{bad})"
                if self.conversation is not None
                else "send the conversation as input, without that item"
            )
            why = str(error["msg"]).removeprefix("Value error, ")
            raise InvalidRequest(
                f"The conversation of {self.history_field} cannot be read back as input: its "
                f"item {bad} cannot be read ({why}). To go on, {way_on}.",
                param=self.history_field,
                code="invalid_value",
            ) from None

    def own_items(self, rid: str) -> list[dict[str, Any]]:
        """What this request (response rid) adds to the conversation, as items to store (each
        with an id, as GET /v1/responses/{id}/input_items lists them; the same ids at every
        call)."""
        if self._own is None:
            items = self.input
            if isinstance(items, str):
                items = [InputMessage(role="user", content=items)]
            self._own = item_records(items, rid)
        return self._own

    def references(self) -> list[tuple[int, str]]:
        """The input's item_reference items: (index, the id each names)."""
        if isinstance(self.input, str):
            return []
        return [(i, it.id) for i, it in enumerate(self.input) if isinstance(it, ItemReference)]

    def resolve(self, index: int, item: dict[str, Any]) -> None:
        """input[index], an item_reference, replaced by the stored item it names."""
        try:
            (self.input[index],) = HISTORY.validate_python([item])  # type: ignore[index]
        except ValidationError:  # (a model's call whose JSON escapes a lone surrogate)
            raise InvalidRequest(
                f"input[{index}] refers to item {item.get('id')}, which cannot be read back as "
                "input: send the item itself.",
                param=f"input[{index}]",
                code="invalid_value",
            ) from None

    def unsupported_fields(self) -> list[str]:
        """The fields (for include: the value, `include[i]`) that are refused."""
        fields = [n for n, used in RESPONSES_UNSUPPORTED_WHEN.items() if used(getattr(self, n))]
        if "include" in fields:  # name the value: others are taken
            index = next(i for i, v in enumerate(self.include or ()) if v not in INCLUDABLE)
            fields[fields.index("include")] = f"include[{index}]"
        return fields

    @property
    def history_field(self) -> str:
        """The field the conversation before `input` comes from (its errors name it)."""
        return "conversation" if self.conversation is not None else "previous_response_id"

    @property
    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, ConversationRef):
            return self.conversation.id
        return self.conversation

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS in (self.include or ())

    @property
    def reasoning_shown(self) -> ReasoningShown:
        """What the answer's reasoning items carry beside the reasoning_text."""
        config = self.reasoning or ReasoningConfig()
        return ReasoningShown(
            summary=(config.summary or config.generate_summary) is not None,
            encrypted=ENCRYPTED_REASONING in (self.include or ()),
        )

    def name_error(self, exc: ServerError) -> None:
        """A chat error as this body names things: its field (messages[k] -> the input item
        the message came from, response_format -> text.format, ...) and the messages its
        text names."""

        def origin(match: re.Match[str]) -> str:
            k, part = int(match.group(1)), match.group(3) or ""
            if k >= len(self._origins):
                return match.group(0)
            item = self._origins[k]
            if item.startswith(self.history_field):  # an earlier item: no place in this body
                return item
            # A tool message's content is the function_call_output's output.
            return item + part if item.endswith(".output") else item + (match.group(2) or "") + part

        if exc.param is None or not exc.param.startswith("messages"):
            param = responses_param(exc.param)  # (already in this body's names too)
            if param and (tool := TOOL_INDEX.match(param)):  # (chat's tools are flattened)
                offered = self._functions()
                if (k := int(tool.group(1))) < len(offered):
                    param = offered[k].where + param[tool.end() :]
            exc.rename_param(param)
            return
        exc.message = MESSAGE_INDEX.sub(origin, exc.message)
        exc.param = MESSAGE_INDEX.sub(origin, exc.param)
        if isinstance(exc, PromptTooLong):
            exc.message = self._too_long(exc.message)
        if exc.param == "messages":
            exc.param = "input"
        elif exc.param.startswith(self.history_field):  # the message names the item
            exc.param = self.history_field

    def messages_of(self, messages: list[ChatMessage], item_ids: list[str]) -> list[ChatMessage]:
        """Of the chat messages this body became, those that came from these conversation
        items (by their ids)."""
        names = {f"{self.history_field} item {item_id}" for item_id in item_ids}
        origins = [origin.removesuffix(".output") for origin in self._origins]  # (a tool's)
        return [m for m, origin in zip(messages, origins, strict=True) if origin in names]

    def _too_long(self, message: str) -> str:
        """A chat's context overflow in this API's words, with what truncation can do."""
        said = message.replace("your messages", "your input")
        said = said.replace("the length of the messages", "the input")
        if not self._spans():  # (nothing truncation could leave out)
            return said
        if self.truncation == "auto":
            return f'{said} Truncation "auto" left out all it may (it keeps {TRUNCATION_KEEPS}).'
        return f'{said} Set truncation "auto" to leave the oldest turns and steps out to fit.'

    def _functions(self) -> list[Offered]:
        """The functions offered to the model, in the chat body's order. Two offered by one
        name are a 400 (a call would not say which it is)."""
        offered: list[Offered] = []
        for i, tool in enumerate(self.tools or ()):
            if isinstance(tool, FunctionTool):
                offered.append(Offered(tool.name, tool, f"tools[{i}]"))
            elif isinstance(tool, NamespaceTool):
                offered += [
                    Offered(qualified(tool.name, f.name), f, f"tools[{i}].tools[{j}]", tool.name)
                    for j, f in enumerate(tool.tools)
                ]
        seen: dict[str, str] = {}
        for name, _, where, _ in offered:
            if name in seen:
                problem = f"is offered to the model as {name!r}, as {seen[name]} is: tool "
                raise _tool_name(where, problem + "names must be unique")
            if len(name) > 64:  # (chat's limit, OpenAI's)
                problem = f"is offered to the model as {name!r} ({len(name)} characters): a "
                raise _tool_name(where, problem + "namespace and its function's name fit 62")
            seen[name] = where
        return offered

    @property
    def namespaced(self) -> dict[str, tuple[str, str]]:
        """A namespace tool's functions: the name each is offered by -> (namespace, name)."""
        return {
            o.name: (o.namespace, o.function.name)
            for o in self._functions()
            if o.namespace is not None
        }

    def refuse_hosted_tools(self) -> None:
        for index, tool in enumerate(self.tools or ()):
            if isinstance(tool, HostedTool):
                why = (
                    "custom tools (free-form text input) are not supported"
                    if tool.type == "custom"
                    else "it runs no hosted tools (web search, file search, MCP, ...)"
                )
                raise InvalidRequest(
                    f"The {tool.type} tool is not available on this server: {why}; function "
                    "tools (and namespaces of them) only.",
                    param=f"tools[{index}].type",
                    code="unsupported_parameter",
                )

    def to_chat_body(self) -> dict[str, Any]:
        """The chat completion's body this request is."""
        self.refuse_hosted_tools()
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self._messages(),
            "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "parallel_tool_calls": self.parallel_tool_calls,
            "cache_salt": self.cache_salt,
            "priority": self.priority,
            "reasoning_effort": self.reasoning.effort if self.reasoning else None,
            "thinking_token_budget": self.thinking_token_budget,
        }
        if self.wants_logprobs:
            body |= {"logprobs": True, "top_logprobs": self.top_logprobs or 0}
        if self.tools is not None:  # ([]: none, whatever tool_choice says, as chat reads it)
            body["tools"] = [o.function.to_chat(o.name) for o in self._functions()]
        if isinstance(self.tool_choice, NamedFunction | AllowedTools):
            body["tool_choice"] = self.tool_choice.to_chat()
        else:
            body["tool_choice"] = self.tool_choice
        if self.text is not None and self.text.format is not None:
            body["response_format"] = self.text.format.to_response_format()
        body |= self.model_dump(include=set(VLLM_CHAT_FIELDS), exclude_none=True, by_alias=True)
        return {key: value for key, value in body.items() if value is not None}

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        self._origins = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
            self._origins.append("instructions")
        items = self._kept_items()
        calls: set[str] = set()
        unanswered: dict[str, str] = {}  # call_id -> where its call is
        reasoning = ""  # a reasoning item's, for the assistant message after it
        for item, where in items:
            if isinstance(item, ReasoningItem):
                reasoning += item.text()
                continue
            if isinstance(item, ItemReference):  # (one that resolve_references did not)
                raise InvalidRequest(
                    f"{where} refers to a stored item ({item.id}) outside this request's "
                    "input: send the item itself.",
                    param=where,
                    code="unsupported_parameter",
                )
            first_new = len(messages)
            if isinstance(item, InputMessage):
                messages.append({"role": item.role, "content": _dump(item.content)})
                self._origins.append(where)
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function"}
                call["function"] = {"name": item.offered_name, "arguments": item.arguments}
                calls.add(item.call_id)
                unanswered[item.call_id] = where
                if not messages or messages[-1]["role"] != "assistant":
                    messages.append({"role": "assistant", "content": None})
                    self._origins.append(where)
                messages[-1].setdefault("tool_calls", []).append(call)
            elif isinstance(item, FunctionCallOutputItem):
                if item.call_id not in calls:
                    raise InvalidRequest(
                        f"No function call found for function call output with call_id "
                        f"{item.call_id!r} (at {where}): the function_call item goes before "
                        "its output.",
                        param=f"{where}.call_id",
                        code="invalid_value",
                    )
                unanswered.pop(item.call_id, None)
                self._call_output(messages, item, where)
            # The reasoning goes with the assistant turn this item starts; with none, it
            # has nothing to go with.
            started = messages[first_new : first_new + 1]
            if reasoning and started and started[0]["role"] == "assistant":
                started[0]["reasoning_content"] = reasoning
            reasoning = ""
        if unanswered:  # (as OpenAI's: the model would read a call with no result)
            call_id, where = next(iter(unanswered.items()))
            raise InvalidRequest(
                f"No tool output found for function call {call_id} (at {where}): send its "
                "function_call_output in input.",
                param="input" if where.startswith("input") else self.history_field,
                code="invalid_value",
            )
        if not messages:
            raise InvalidRequest("input holds no message.", param="input", code="invalid_value")
        return messages

    def _call_output(
        self, messages: list[dict[str, Any]], item: FunctionCallOutputItem, where: str
    ) -> None:
        """A function's result as a tool message, its images (OpenAI's outputs may hold them)
        among its parts, where they were."""
        content = _dump(item.output) or ""  # ([]: nothing said, as an empty string)
        self._origins.append(f"{where}.output")
        messages.append({"role": "tool", "tool_call_id": item.call_id, "content": content})


def _step_ends_before(items: list[Any], i: int) -> bool:
    """Item i starts a new step of a tool loop: it follows the outputs of the step before."""
    return isinstance(items[i - 1], FunctionCallOutputItem) and not isinstance(
        items[i], FunctionCallOutputItem
    )


def _is_user_message(item: Any) -> bool:
    return isinstance(item, InputMessage) and item.role == "user"


def _is_system_message(item: Any) -> bool:
    return isinstance(item, InputMessage) and item.role in ("system", "developer")


def item_records(items: list[Any], rid: str | None = None) -> list[dict[str, Any]]:
    """Input items as they are stored and listed, as OpenAI lists them: each with an id of
    its own (a new one: an id sent, an earlier output's, would repeat in the conversation),
    a message, a function call and its output with a status, a message's string content as
    its part (input_text, an assistant's output_text), output_text with its annotations (the
    SDK's types require them)."""
    records = []
    for item in items:
        record = item.model_dump(exclude_none=True)
        if record["type"] in ("message", "function_call", "function_call_output"):
            record.setdefault("status", "completed")
        if record["type"] == "message":
            if isinstance(record["content"], str):
                kind = "output_text" if record["role"] == "assistant" else "input_text"
                record["content"] = [{"type": kind, "text": record["content"]}]
            for part in record["content"]:
                if part.get("type") == "output_text":
                    part.setdefault("annotations", [])
        records.append({"id": _item_id(ITEM_PREFIXES.get(record["type"], "item"), rid), **record})
    return records


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def page(
        cls,
        items: list[dict[str, Any]],
        limit: int,
        order: Literal["asc", "desc"],
        after: str | None,
        owner: str,
    ) -> InputItemList:
        """A page of items (oldest first as given): newest first unless order is asc, after
        the item with id `after`."""
        if order == "desc":
            items = items[::-1]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise InvalidRequest(
                    f"No item {after!r} in {owner}.", param="after", code="invalid_value"
                )
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
        return cls(data=page, first_id=first, last_id=last, has_more=len(items) > limit)


class InputTokensRequest(ResponsesRequest):
    """`POST /v1/responses/input_tokens`: a Responses body (model optional) -> the tokens its
    input would take."""

    model: str | None = None  # type: ignore[assignment]


class InputTokens(BaseModel):
    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int


def _dump(content: str | list[Any]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    return [part.model_dump(exclude_none=True) for part in content]


TOOL_INDEX = re.compile(r"^tools\[(\d+)\]")
MESSAGE_INDEX = re.compile(r"messages\[(\d+)\](\.content)?(\[(\d+)\])?")


def responses_param(param: str | None) -> str | None:
    """A chat field as the Responses body names it: response_format -> text.format,
    max_tokens -> max_output_tokens, tools[i].function.x -> tools[i].x."""
    if param is None:
        return None
    if param.startswith("response_format"):
        return "text.format"
    if param in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    if param.startswith(("tools", "tool_choice")):
        return param.replace(".allowed_tools.", ".", 1).replace(".function.", ".", 1)
    return param


# -- response ---------------------------------------------------------------------------------


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def _item_id(prefix: str, rid: str | None = None) -> str:
    """A new item's id. A response's own items (its input's and its output's) begin with the
    response's hex, `msg_<response><16 more>`: an item_reference then finds the stored
    response that holds the item (holder_of) without an index of items."""
    if rid is None:  # (a conversation's own items: held by no response)
        return f"{prefix}_{uuid.uuid4().hex}"
    return f"{prefix}_{rid.removeprefix('resp_')}{uuid.uuid4().hex[:16]}"


def holder_of(item_id: str) -> str | None:
    """The id of the response whose item this is (None: no response's, or made before items
    carried it)."""
    own = item_id.partition("_")[2]
    if len(own) != 48 or not all(c in string.hexdigits for c in own):
        return None
    return f"resp_{own[:32]}"


# A failed response's error.code is one of OpenAI's ResponseError codes (its SDK's enum): this
# server's own code is shown as the nearest of them, its type and param beside it.
RESPONSE_ERROR_CODES = {
    "media_fetch_failed": "failed_to_download_image",
    "media_url_not_allowed": "invalid_image_url",
    "media_too_large": "image_too_large",
    "media_budget_exceeded": "image_too_large",
    "image_too_large": "image_too_large",
    "unsupported_media_type": "unsupported_image_media_type",
    "invalid_media": "invalid_image",
    "file_not_found": "image_file_not_found",
}


def response_error(
    code: str | None, message: str, param: str | None = None, error_type: str | None = None
) -> dict[str, Any]:
    """A failed response's error object: OpenAI's code nearest to this server's (server_error
    for the server's own faults, invalid_prompt for a request's other mistakes)."""
    if error_type == "server_error" or code in (None, "server_error"):
        shown = "server_error"
    else:
        shown = RESPONSE_ERROR_CODES.get(code, "invalid_prompt")
    return {"code": shown, "message": message, "param": param, "type": error_type}


DEFAULT_TIER = "default"  # the service tier OpenAI's response shows for "auto" or none


class ResponseObject(BaseModel):
    """OpenAI's `response` object (the fields this server can fill)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed", "queued", "cancelled"]
    completed_at: int | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[dict[str, Any]]
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    conversation: dict[str, str] | None = None  # {"id": ...}: the conversation it adds to
    background: bool = False  # run as a job, polled with GET /v1/responses/{id}
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    store: bool = True  # kept for previous_response_id and GET /v1/responses/{id}
    temperature: float | None = None
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]]
    top_p: float | None = None
    truncation: str = "disabled"
    usage: dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    # Echoed as OpenAI's response shows them (hints for a hosted service, no effect here).
    max_tool_calls: int | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    service_tier: str = DEFAULT_TIER
    top_logprobs: int = 0
    # extension (return_image_sizes): each image's {width, height} as the model read it
    image_sizes: list[dict[str, int]] | None = Field(default=None, exclude_if=lambda v: v is None)

    @classmethod
    def start(
        cls, rid: str, body: ResponsesRequest, sampling: SamplingParams, store: bool
    ) -> ResponseObject:
        """The response as it begins: in progress, no output yet; the sampling it runs with."""
        text = {"format": {"type": "text"}, "verbosity": "medium"}  # (OpenAI's echo)
        if body.text is not None:
            text |= body.text.model_dump(by_alias=True, exclude_none=True)
        return cls(
            id=rid,
            created_at=int(time.time()),
            status="in_progress",
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            model=body.model,
            output=[],
            parallel_tool_calls=body.parallel_tool_calls is not False,
            temperature=sampling.temperature,
            text=text,
            truncation=body.truncation or "disabled",
            reasoning=_reasoning(body.reasoning),
            tool_choice=_tool_choice(body.tool_choice),
            tools=[_echoed_tool(t) for t in body.tools or ()],
            top_p=sampling.top_p if body.top_p != 0 else 0.0,  # (as sent: MIN_TOP_P)
            user=body.user,
            metadata=body.metadata or {},
            prompt_cache_key=body.prompt_cache_key,
            prompt_cache_retention=body.prompt_cache_retention,
            safety_identifier=body.safety_identifier,
            service_tier=DEFAULT_TIER if body.service_tier in (None, "auto") else body.service_tier,
            top_logprobs=body.top_logprobs or 0,
            previous_response_id=body.previous_response_id,
            conversation={"id": body.conversation_id} if body.conversation_id else None,
            store=store,
            image_sizes=[] if body.return_image_sizes else None,  # (filled by finish)
        )

    def finish(self, output: list[dict[str, Any]], reason: str, run: ChatRun) -> ResponseObject:
        """The response once the answer is in: its items, status and usage."""
        incomplete = reason == "length"
        self.output = output
        self.status = "incomplete" if incomplete else "completed"
        self.incomplete_details = {"reason": "max_output_tokens"} if incomplete else None
        self.completed_at = None if incomplete else int(time.time())  # (OpenAI's: completed)
        self.usage = usage_of(run)
        if self.image_sizes is not None:
            self.image_sizes = [{"width": w, "height": h} for w, h in run.seq.inputs.image_sizes]
        return self


def _reasoning(config: ReasoningConfig | None) -> dict[str, Any]:
    """The response's `reasoning` as OpenAI's shows it: both keys, null where not asked."""
    config = config or ReasoningConfig()
    return {"effort": config.effort, "summary": config.summary or config.generate_summary}


def _echoed_tool(tool: BaseModel) -> dict[str, Any]:
    """A tool as the response shows it: as sent, and a function's description and strict (the
    OpenAPI type's required fields) as applied when left out: null, false."""
    echoed = tool.model_dump(exclude_none=True)
    if isinstance(tool, FunctionTool):
        echoed = {"description": None, **echoed, "strict": tool.strict is True}
    return echoed


def _tool_choice(choice: str | NamedFunction | AllowedTools | None) -> Any:
    if isinstance(choice, NamedFunction | AllowedTools):
        return choice.model_dump(exclude_none=True)
    return choice or "auto"


def usage_of(run: ChatRun) -> dict[str, Any]:
    usage = run.usage()
    return {
        "input_tokens": usage.num_prompt,
        "input_tokens_details": {"cached_tokens": usage.num_cached, "cache_write_tokens": 0},
        "output_tokens": usage.num_completion,
        "output_tokens_details": {"reasoning_tokens": usage.num_reasoning or 0},
        "total_tokens": usage.num_prompt + usage.num_completion,
    }


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def output_items(
    rid: str,
    choice: ChoiceResult,
    num_reasoning: int | None = None,
    namespaced: dict[str, tuple[str, str]] | None = None,
    shown: ReasoningShown = ReasoningShown(),
) -> list[dict[str, Any]]:
    """A whole answer as response rid's output items: its reasoning (shown), its message (its
    text's logprobs: past the num_reasoning tokens and their "</think>"), its function calls
    (namespaced: ResponsesRequest.namespaced)."""
    status = _status(choice.finish_reason)  # of the last item: the one a cut-off ends
    calls = choice.tool_calls
    items = []
    if choice.reasoning_content:
        items.append(reasoning_item(_item_id("rs", rid), choice.reasoning_content, shown))
    if choice.content or not (calls or choice.reasoning_content):
        message = message_item(_item_id("msg", rid), choice.content or "", "completed")
        skip = 0 if num_reasoning is None else num_reasoning + 1
        message["content"][0]["logprobs"] = logprobs_of((choice.logprobs or [])[skip:])
        items.append(message)
    for call in calls:
        item = call_item(_item_id("fc", rid), call.id, call.name, call.arguments, "completed")
        items.append(in_namespace(item, namespaced))
    if items and items[-1]["type"] != "reasoning":
        items[-1]["status"] = status
    return items


def reasoning_item(
    item_id: str, text: str, shown: ReasoningShown = ReasoningShown()
) -> dict[str, Any]:
    item = {"type": "reasoning", "id": item_id, "summary": [], "content": []}
    return reasoning_done(item, text, shown)


def reasoning_done(item: dict[str, Any], text: str, shown: ReasoningShown) -> dict[str, Any]:
    """A reasoning item with its whole text in it."""
    item["content"] = [{"type": "reasoning_text", "text": text}]
    if shown.summary:
        item["summary"] = [{"type": "summary_text", "text": text}]
    if shown.encrypted:
        item["encrypted_content"] = sealed_reasoning(text)
    return item


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [output_text(text)] if status != "in_progress" else []
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def output_text(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def logprobs_of(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Tokens' logprobs as the Responses API lists them (chat's entries, the same fields)."""
    return [ChatCompletionTokenLogprob.of(entry).model_dump() for entry in entries]


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _tool_name(where: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{where} {problem}.", param=f"{where}.name", code="invalid_value")


def in_namespace(
    item: dict[str, Any], namespaced: dict[str, tuple[str, str]] | None
) -> dict[str, Any]:
    """A function call item of a namespace tool's function: its own name and its namespace."""
    if namespaced and (found := namespaced.get(item["name"])) is not None:
        item["namespace"], item["name"] = found
    return item


def completed(rid: str, body: ResponsesRequest, result: ChatResult, store: bool) -> ResponseObject:
    choice, num_reasoning = result.choices[0], result.run.usage().num_reasoning
    response = ResponseObject.start(rid, body, result.run.seq.sampling, store)
    items = output_items(rid, choice, num_reasoning, body.namespaced, body.reasoning_shown)
    return response.finish(items, choice.finish_reason, result.run)


def event(kind: str, number: int, **fields: Any) -> str:
    """One server-sent event, as OpenAI sends them: its type named twice."""
    return named_event(kind, {"type": kind, "sequence_number": number, **fields})


class ResponseEvents:
    """A streamed answer as the Responses events, in the order the OpenAI SDK accumulates
    them: the response created; each output item added, its deltas, its text and the item
    done (reasoning, then the message, then each function call); the response completed (or
    incomplete, at max_output_tokens)."""

    def __init__(
        self,
        response: ResponseObject,
        tools: Tools | None,
        reasoning: bool,
        logprobs: tuple[Sequence, TokenTexts] | None = None,
        think_close: int | None = None,
        namespaced: dict[str, tuple[str, str]] | None = None,
        shown: ReasoningShown = ReasoningShown(),
    ):
        self.response = response
        self.namespaced = namespaced  # ResponsesRequest.namespaced
        # A summary asked for: the reasoning streams as both reasoning_text and summary
        # events (clients read one or the other: vLLM's the first, OpenAI's the second).
        self.shown = shown
        self.number = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item the deltas go to
        self._buffer = ""  # the open item's text so far
        self.calls = call_stream(tools)
        self.reasoning = ReasoningStream() if reasoning else None
        # include [LOGPROBS]: the sequence's tokens' logprobs ride on the next text delta
        self.logprobs = logprobs
        self.think_close = think_close  # "</think>": the message's logprobs start past it
        self._scored = 0  # tokens whose logprobs were taken
        self._pending: list[dict[str, Any]] = []  # taken, not sent yet
        self._sent: list[dict[str, Any]] = []  # sent with the open message's deltas

    def begin(self) -> list[str]:
        snapshot = self.response.model_dump()
        created = self._event("response.created", response=snapshot)
        return [created, self._event("response.in_progress", response=snapshot)]

    def feed(self, output: SequenceOutput) -> list[str]:
        if self.logprobs is not None:
            seq, texts = self.logprobs
            end, start = output.num_completion_tokens, self._scored
            if self.think_close is not None:  # (the reasoning's tokens are not the text's)
                start = max(start, answer_start(seq.output_token_ids[:end], self.think_close))
            new = texts.logprobs(seq, start, end)
            self._pending += logprobs_of(new)
            self._scored = output.num_completion_tokens
        pieces = answer_pieces(output, self.reasoning, self.calls)
        events = [event for piece in pieces for event in self._piece(piece)]
        if output.finished:
            events += self._close(_status(output.finish_reason))
        return events

    def end(self, output: SequenceOutput, run: ChatRun) -> list[str]:
        """The last events, once the answer is in."""
        reason = output.finish_reason or "stop"
        events = []
        if not self.output:  # an empty answer is still a message
            events = self._open_message() + self._close(_status(reason))
        final = self.response.finish(self.output, reason, run).model_dump()
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return events + [self._event(kind, response=final)]

    def failed(self, exc: ServerError | None, run: ChatRun) -> list[str]:
        """An error after the stream began (None: the server's own fault): the open item
        closed as it stands, the error, then the response failed (with what was sent, and
        its usage)."""
        exc = exc or ServerError(SERVER_ERROR)  # (a server_error, no code of its own)
        # the error event takes this server's code; the failed response OpenAI's nearest
        said = {"code": exc.code or exc.error_type, "message": exc.message, "param": exc.param}
        events = self._close("incomplete")
        error = response_error(said["code"], exc.message, exc.param, exc.error_type)
        self.response.status, self.response.error = "failed", error
        self.response.output, self.response.usage = self.output, usage_of(run)
        return events + [
            self._event("error", **said),
            self._event("response.failed", response=self.response.model_dump()),
        ]

    # -- items ---------------------------------------------------------------------------------
    def _item_id(self, prefix: str) -> str:
        return _item_id(prefix, self.response.id)

    def _piece(self, piece: Reasoning | Event) -> list[str]:
        if isinstance(piece, Reasoning):
            return self._reasoning(piece.text)
        if isinstance(piece, ToolCallDelta):
            return self._call(piece)
        return self._text(piece) if piece else []

    def _reasoning(self, text: str) -> list[str]:
        events = []
        if self.open is None or self.open["type"] != "reasoning":
            item = {"type": "reasoning", "id": self._item_id("rs"), "summary": [], "content": []}
            events += self._close() + self._add(item)
            self._buffer = ""
            if self.shown.summary:
                part = {"type": "summary_text", "text": ""}
                events.append(self._summary_event("part.added", part=part))
        self._buffer += text
        events.append(self._event("response.reasoning_text.delta", **self._where(), delta=text))
        if self.shown.summary:
            events.append(self._summary_event("text.delta", delta=text))
        return events

    def _summary_event(self, kind: str, **fields: Any) -> str:
        """A reasoning summary's event (response.reasoning_summary_{kind}) of the open item."""
        where = self._where()
        del where["content_index"]
        return self._event(f"response.reasoning_summary_{kind}", **where, summary_index=0, **fields)

    def _text(self, text: str) -> list[str]:
        events = []
        if self.open is None or self.open["type"] != "message":
            events += self._close() + self._open_message()
        self._buffer += text
        logprobs, self._pending = self._pending, []
        self._sent += logprobs
        return events + [
            self._event(
                "response.output_text.delta", **self._where(), delta=text, logprobs=logprobs
            )
        ]

    def _open_message(self) -> list[str]:
        events = self._add(message_item(self._item_id("msg"), "", "in_progress"))
        self._buffer, self._sent = "", []
        part = output_text("")
        return events + [self._event("response.content_part.added", **self._where(), part=part)]

    def _call(self, delta: ToolCallDelta) -> list[str]:
        events = []
        if delta.id is not None:  # a new call: its id and name come first
            item = call_item(self._item_id("fc"), delta.id, delta.name or "", "", "in_progress")
            events += self._close() + self._add(in_namespace(item, self.namespaced))
            self._buffer = ""
        if delta.arguments:
            self._buffer += delta.arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=self.open["id"],  # type: ignore[index]
                    output_index=len(self.output) - 1,
                    delta=delta.arguments,
                )
            )
        return events

    def _add(self, item: dict[str, Any]) -> list[str]:
        self.output.append(item)
        self.open = item
        return [
            self._event("response.output_item.added", output_index=len(self.output) - 1, item=item)
        ]

    def _close(self, status: str = "completed") -> list[str]:
        """The open item's done events, its whole text in it."""
        item, self.open = self.open, None
        if item is None:
            return []
        index = len(self.output) - 1
        text = self._buffer
        events = []
        if item["type"] == "reasoning":
            reasoning_done(item, text, self.shown)
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            events.append(self._event("response.reasoning_text.done", **where, text=text))
            if self.shown.summary:
                where = {"item_id": item["id"], "output_index": index, "summary_index": 0}
                part = item["summary"][0]
                events += [
                    self._event("response.reasoning_summary_text.done", **where, text=text),
                    self._event("response.reasoning_summary_part.done", **where, part=part),
                ]
        elif item["type"] == "message":
            # Tokens with no text of their own (the EOS that ended it) are the message's too.
            self._sent, self._pending = self._sent + self._pending, []
            part = output_text(text, self._sent)
            item["content"], item["status"] = [part], status
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            done = {"text": text, "logprobs": self._sent}
            events.append(self._event("response.output_text.done", **where, **done))
            events.append(self._event("response.content_part.done", **where, part=part))
        else:
            item["arguments"], item["status"] = text, status
            where = {"item_id": item["id"], "output_index": index}
            done = {**where, "name": item["name"], "arguments": text}  # (the SDK's type has name)
            events.append(self._event("response.function_call_arguments.done", **done))
        return events + [self._event("response.output_item.done", output_index=index, item=item)]

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {
            "item_id": self.open["id"],
            "output_index": len(self.output) - 1,
            "content_index": 0,
        }

    def _event(self, kind: str, **fields: Any) -> str:
        self.number += 1
        return event(kind, self.number - 1, **fields)
