"""The wire protocol of chat and text completions, the media endpoints and tokenize: request
and response bodies, as pydantic models (the field types they share are in fields.py, messages
and content parts in message_params.py, other servers' dialects in dialects.py).

Fields follow OpenAI's order; our extensions are marked `# extension`. A field OpenAI defines
that we do not support yet is accepted by the schema but refused with a 400 naming it
(`unsupported_fields`), never silently dropped. Unknown fields are refused too, as OpenAI does.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    ValidationInfo,
    computed_field,
    field_validator,
    model_validator,
)

from server.api.dialects import (
    REPETITION_PENALTY_NAMES,
    dashscope_options,
    generate_options,
    hosted_options,
    integer_logprobs,
    llama_cpp_options,
    reasoning_switches,
)
from server.api.fields import (
    MAX_CACHE_SALT,
    BadWords,
    LogitBias,
    MetadataPairs,
    Priority,
    ReasoningEffort,
    Stop,
    StopTokenId,
    StrictModel,
    Text,
    TokenId,
    thinking_kwargs,
)
from server.api.message_params import (
    TRANSLATED,
    ChatMessageParam,
    ContentPart,
    FileContentPart,
    ImageContentPart,
    InputFileContentPart,
    InputImageContentPart,
    RefusalContentPart,
    TextContentPart,
    Turns,
    VideoContentPart,
    check_tool_turns,
)
from server.engine.inputs import TemplateOptions, Truncation
from server.engine.json_schema import InvalidSchema, strict_normalized, strict_refusal, unenforced
from server.engine.sampling import MIN_TOP_P, SamplingDefaults, SamplingParams
from server.engine.structured import StructuredOutput
from server.exceptions import InvalidRequest
from server.jobs.store import Job
from server.media.fetch import is_data_uri
from server.media.frames import FrameRequest
from server.media.kind import url_kind
from server.pipelines.categories import METADATA_KEYS
from server.pipelines.chat import ChatResult, ChoiceResult
from server.pipelines.choices import SEED_MODULUS
from server.pipelines.logprobs import EchoedPrompt, PromptLogprobs, TokenInfo, TokenLogprob
from server.pipelines.messages import (
    ChatMessage,
    ImagePart,
    Part,
    TextPart,
    ToolCall,
    VideoPart,
    with_parts,
)
from server.pipelines.tools import Tools

OPENAI_DEFAULTS = SamplingDefaults()
ANIMUS_DEFAULTS = SamplingDefaults(temperature=0.1)  # the Animus reference's default


# A guided regex, grammar or choice: never empty (an answer that can only be empty is
# nothing a grammar can generate), and bounded: compiling grows with the text (a few choices
# of 16k characters in all compile in under a second; 260k characters took 30 s), so one
# request cannot hold the grammar compiler for minutes.
MAX_CONSTRAINT_CHARS = 16384
MAX_CHOICES = 256
Constraint = Annotated[str, Field(min_length=1, max_length=MAX_CONSTRAINT_CHARS)]

# OpenAI's rule for a json_schema's name (chat's response_format, the Responses text.format)
SCHEMA_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class JsonSchemaFormat(StrictModel):
    name: str = Field(default="response", pattern=SCHEMA_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


def _bare_schema(value: Any) -> bool:
    """A JSON Schema itself, not json_schema's {name, schema, strict, description}."""
    return (
        isinstance(value, dict)
        and "schema" not in value
        and bool(value.keys() & {"type", "properties", "$schema", "$defs", "anyOf"})
    )


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JsonSchemaFormat | None = None
    # TGI's (and Hugging Face InferenceClient's) {"type": "regex", "value"}, Fireworks' {"type":
    # "grammar", "grammar"}: vLLM's guided_regex and guided_grammar
    value: Constraint | None = None
    grammar: Constraint | None = None

    @model_validator(mode="before")
    @classmethod
    def _hosted_json_modes(cls, data: Any) -> Any:
        """Hosted APIs' JSON modes with a schema: TGI's and Hugging Face InferenceClient's
        {"type": "json" | "json_object", "value": schema} (the client rewrites OpenAI's
        json_schema so), Together's and Fireworks' {"type": "json_object", "schema": schema}:
        that schema, not strict; "json" without one is json_object."""
        if not isinstance(data, dict):
            return data
        if data.get("type") == "json_schema" and _bare_schema(data.get("json_schema")):
            # (a JSON Schema itself where {name, schema} goes: Dify passes its user's so)
            return {**data, "json_schema": {"schema": data["json_schema"]}}
        if data.get("type") not in ("json", "json_object"):
            return data
        given = [key for key in ("value", "schema") if data.get(key) is not None]
        rest = {key: value for key, value in data.items() if key not in ("value", "schema")}
        if len(given) > 1:
            raise ValueError("a JSON mode takes its schema as value or as schema, not both")
        if not given:
            return {**rest, "type": "json_object"}
        return {**rest, "type": "json_schema", "json_schema": {"schema": data[given[0]]}}

    @model_validator(mode="after")
    def _own_fields(self) -> ResponseFormat:
        own = {"regex": "value", "grammar": "grammar"}.get(self.type)
        for name in ("value", "grammar"):
            if (getattr(self, name) is None) == (name == own):
                problem = "needs" if name == own else "takes no"
                raise InvalidRequest(
                    f"response_format of type {self.type} {problem} {name}.",
                    param=f"response_format.{name}",
                    code="invalid_value",
                )
        return self

    def to_structured(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput("json_object")
        if self.type == "regex":
            return StructuredOutput.regex(self.value or "")
        if self.type == "grammar":
            return StructuredOutput.grammar(self.grammar or "")
        if self.json_schema is None:
            raise InvalidRequest(
                "response_format of type json_schema needs a json_schema object.",
                param="response_format.json_schema",
                code="invalid_value",
            )
        schema = self.json_schema
        return StructuredOutput.json_schema(schema.schema_, strict=bool(schema.strict))


class StreamOptions(StrictModel):
    include_usage: bool | None = None
    # OpenAI's random padding of deltas against length side channels: not sent by this
    # server, so there is nothing to switch; accepted as the SDK sends it.
    include_obfuscation: bool | None = None
    # extension (vLLM's): with include_usage, the usage so far on every chunk too
    continuous_usage_stats: bool | None = False

    def usage_wanted(self) -> tuple[bool, bool]:
        """(a final usage chunk, usage on every chunk). continuous_usage_stats alone asks for
        usage too (vLLM's include_usage defaults to true); only an explicit include_usage
        false turns both off. `{}` is OpenAI's: no usage."""
        every = bool(self.continuous_usage_stats)
        final = every if self.include_usage is None else self.include_usage
        return final, final and every


def usage_wanted(stream_options: StreamOptions | None) -> tuple[bool, bool]:
    return stream_options.usage_wanted() if stream_options else (False, False)


def _choices_size(choices: list[str] | None) -> list[str] | None:
    if choices is not None and sum(len(c) for c in choices) > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"the choices may hold at most {MAX_CONSTRAINT_CHARS} characters in all")
    return choices


Choices = Annotated[
    list[Constraint], Field(min_length=1, max_length=MAX_CHOICES), AfterValidator(_choices_size)
]


class StructuredOutputsParam(StrictModel):
    """vLLM's `structured_outputs`: exactly one of its constraints, and its options."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: Constraint | None = None
    choice: Choices | None = None
    grammar: Constraint | None = None
    json_object: bool | None = None
    # Options asking for what is done anyway: JSON answers are always compact and closed
    # (xgrammar's strict mode: no whitespace runs to eat max_tokens, no properties the schema
    # does not name), there is one backend, and no fallback to turn off.
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    disable_fallback: bool | None = None
    backend: str | None = None
    # Refused when set (STRUCTURED_UNSUPPORTED_WHEN).
    whitespace_pattern: str | None = None
    structural_tag: Any | None = None

    def constraints(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, include=set(CONSTRAINT_FIELDS))


CONSTRAINT_FIELDS = ("json_", "regex", "choice", "grammar", "json_object")
# What vLLM's structured outputs can also do that xgrammar's JSON and EBNF grammars here
# cannot express: refused, never ignored.
STRUCTURED_UNSUPPORTED_WHEN = {
    "guided_whitespace_pattern": lambda body: body.guided_whitespace_pattern is not None,
    "structured_outputs.whitespace_pattern": lambda body: (
        body.structured_outputs is not None
        and body.structured_outputs.whitespace_pattern is not None
    ),
    "structured_outputs.structural_tag": lambda body: (
        body.structured_outputs is not None and body.structured_outputs.structural_tag is not None
    ),
    "structural_tag": lambda body: body.structural_tag is not None,
}


class StructuredFields(StrictModel):
    """The constraints an answer can be held to (chat and text completions alike):
    OpenAI's response_format, or vLLM's guided_* fields or structured_outputs."""

    response_format: ResponseFormat | None = None
    # extensions (vLLM's): guided decoding, onto the structured-output grammar
    guided_json: dict[str, Any] | str | None = None
    guided_regex: Constraint | None = None
    guided_choice: Choices | None = None
    guided_grammar: Constraint | None = None
    structured_outputs: StructuredOutputsParam | None = None
    guided_decoding_backend: str | None = None  # one backend here (xgrammar): no effect
    guided_whitespace_pattern: str | None = None  # refused when set
    structural_tag: Any | None = None  # refused when set

    def structured_unsupported(self) -> list[str]:
        return [name for name, used in STRUCTURED_UNSUPPORTED_WHEN.items() if used(self)]

    def to_structured(self) -> StructuredOutput | None:
        """The one grammar the answer follows: response_format, a vLLM guided_* field or
        structured_outputs (more than one: 400, as vLLM)."""
        given = self._constraints()
        if len(given) > 1:
            raise InvalidRequest(
                f"Only one kind of structured output per request; got {', '.join(given)}.",
                param=list(given)[1],
                code="invalid_value",
            )
        if "response_format" in given:  # a text response_format leaves a guided field on
            return self.response_format.to_structured()
        if self.structured_outputs is not None:
            return _guided(self.structured_outputs.constraints(), "structured_outputs")
        guided = {f.removeprefix("guided_"): getattr(self, f) for f in GUIDED_FIELDS}
        return _guided(guided, next(iter(given), ""))

    def structured_param(self) -> str:
        """The field the grammar came from, for errors about it."""
        return next(iter(self._constraints()), "response_format")

    def _constraints(self) -> dict[str, Any]:
        given = {
            name: value
            for name, value in (
                ("response_format", self.response_format),
                *((f, getattr(self, f)) for f in GUIDED_FIELDS),
                ("structured_outputs", self.structured_outputs),
            )
            if value is not None
        }
        if self.response_format is not None and self.response_format.type == "text":
            given.pop("response_format")
        return given


# vLLM's fields that ask for what this server does not do: refused when set, never ignored.
VLLM_UNSUPPORTED_WHEN = {
    "use_beam_search": bool,
    "logprob_token_ids": lambda v: v is not None,
    "watermarking": bool,
    "repetition_detection": lambda v: v is not None,
    "kv_transfer_params": bool,  # disaggregated prefill: one server does the whole request
    "ec_transfer_params": bool,
}
# vLLM's vllm_xargs: extra arguments for its logits processors (SamplingParams.extra_args). Read
# here: no_repeat_ngram_size (MinerU's processor reads it; see repeated_ngrams.py). Other keys
# change nothing (logged at debug), as in a vLLM with no processor that reads them.
VLLM_XARGS_READ = frozenset({"no_repeat_ngram_size"})
MAX_VLLM_XARGS = 64
XargValue = (
    bool | str | int | float | list[bool | str | int | float]
)  # (MinerU sends "debug": false)


def _few_xargs(value: Any) -> Any:
    """Counted before the pairs are validated (as metadata's)."""
    if isinstance(value, dict) and len(value) > MAX_VLLM_XARGS:
        raise ValueError(f"at most {MAX_VLLM_XARGS} keys")
    return value


VllmXargs = Annotated[dict[str, XargValue] | None, BeforeValidator(_few_xargs)]
# vLLM's fields accepted with no effect (logged at debug): beam search's shaping (no beams
# here), chunking hints (each chunk goes as soon as it is ready), an identity hint, and what
# vLLM's render endpoints alone read.
VLLM_IGNORED_FIELDS = (
    "length_penalty",
    "early_stopping",
    "session_id",
    "stream_interval",
    "return_token_offsets",
    "return_mm_kwargs",
    "routed_experts_prompt_start",
    "spaces_between_special_tokens",  # Qwen's fast tokenizers join special tokens as one
    "guided_decoding_backend",
)


class VllmFields(StrictModel):
    """vLLM's request fields beyond OpenAI's, shared by chat and text completions."""

    @model_validator(mode="before")
    @classmethod
    def _foreign_options(cls, data: Any) -> Any:
        return generate_options(llama_cpp_options(data))

    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: disabled
    stop_token_ids: list[StopTokenId] | None = None
    # (also by llama.cpp's name, which Open WebUI sends: LLAMA_CPP_IGNORED)
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=10, validation_alias=REPETITION_PENALTY_NAMES
    )
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None  # for benchmarks
    min_p: float | None = Field(default=None, ge=0, le=1)
    # an empty list would allow nothing (vLLM refuses it too)
    allowed_token_ids: list[TokenId] | None = Field(default=None, min_length=1)
    include_stop_str_in_output: bool | None = None
    # logprobs' tokens as "token_id:{id}" (exact ids, whatever the text)
    return_tokens_as_token_ids: bool | None = None
    # the prompt's and the answer's token ids beside the text
    return_token_ids: bool | None = None
    # each prompt token's logprob (and the k most likely tokens there); not in streams
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    bad_words: BadWords | None = None  # strings the answer must not hold
    vllm_xargs: VllmXargs = None  # (VLLM_XARGS_READ)
    # the prefix cache (and vision cache, grammars) shared only under the same salt
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT)
    skip_special_tokens: bool | None = None  # false keeps them in the text
    spaces_between_special_tokens: bool | None = None
    # the prompt cut to its last (or, truncation_side "right", first) n tokens; -1: as many
    # as leave room for max_tokens (see Truncation)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    # special tokens around a text prompt: passed to the tokenizer on /v1/completions, no
    # effect on chat (the template writes them); Qwen's tokenizers add none either way
    add_special_tokens: bool | None = None
    priority: Priority | None = None  # see Priority
    request_id: str | None = Field(default=None, max_length=256)  # logged
    # Refused when set (VLLM_UNSUPPORTED_WHEN).
    use_beam_search: bool | None = None
    logprob_token_ids: list[TokenId] | None = None
    watermarking: bool | None = None
    repetition_detection: dict[str, Any] | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    # Accepted with no effect (VLLM_IGNORED_FIELDS).
    length_penalty: float | None = None
    early_stopping: bool | None = None
    session_id: str | None = Field(default=None, max_length=256)
    stream_interval: int | None = Field(default=None, ge=1)
    return_token_offsets: bool | None = None
    return_mm_kwargs: bool | None = None
    routed_experts_prompt_start: int | None = Field(default=None, ge=0)

    def vllm_unsupported(self) -> list[str]:
        return [n for n, check in VLLM_UNSUPPORTED_WHEN.items() if check(getattr(self, n))]

    def vllm_ignored(self) -> list[str]:
        xargs = sorted((self.vllm_xargs or {}).keys() - VLLM_XARGS_READ)
        ignored = [f for f in VLLM_IGNORED_FIELDS if getattr(self, f) is not None]
        return ignored + [f"vllm_xargs.{key}" for key in xargs]

    def no_repeat_ngram_size(self) -> int:
        """vllm_xargs' no_repeat_ngram_size (0: off, as MinerU's processor reads a negative
        or missing one); an integer, else a 400 naming it."""
        size = (self.vllm_xargs or {}).get("no_repeat_ngram_size")
        if size is None:
            return 0
        if type(size) is not int or size >= 2**31:
            raise InvalidRequest(
                "vllm_xargs.no_repeat_ngram_size must be an integer (0 or less: off).",
                param="vllm_xargs.no_repeat_ngram_size",
                code="invalid_value",
            )
        return max(size, 0)

    def check_prompt_logprobs(self) -> None:
        if self.prompt_logprobs is not None and getattr(self, "stream", False):
            raise InvalidRequest(
                "prompt_logprobs are not available when stream is true.",
                param="prompt_logprobs",
                code="invalid_value",
            )

    def truncation(self) -> Truncation | None:
        if self.truncate_prompt_tokens is None:
            return None
        return Truncation(self.truncate_prompt_tokens, self.truncation_side or "left")


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None  # arguments always follow the schema under a forced choice


class ChatCompletionToolParam(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition
    defer_loading: bool | None = None  # vLLM's (tool search): every tool is loaded here


class ToolChoiceFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: ToolChoiceFunction


class AllowedTools(StrictModel):
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice] = Field(min_length=1)


class AllowedToolsChoice(StrictModel):
    """OpenAI's allowed_tools: only these of the tools may be called (`required`: one must
    be). The prompt lists only them (a model cannot call what it is not shown)."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice


def _check_tools(tools: list[ChatCompletionToolParam]) -> None:
    """As OpenAI refuses them: two tools of one name (which would a call be?), and parameters
    that are not an object's schema (a call's arguments are an object)."""
    names = [tool.function.name for tool in tools]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise InvalidRequest(
            f"tools: two tools are named '{twice}'; tool names must be unique.",
            param="tools",
            code="invalid_value",
        )
    for i, tool in enumerate(tools):
        kind = (tool.function.parameters or {}).get("type", "object")
        if kind != "object":
            raise InvalidRequest(
                f"Invalid schema for function '{tool.function.name}': schema must be a JSON "
                f"Schema of 'type: \"object\"', got 'type: {json.dumps(kind)}'.",
                param=f"tools[{i}].function.parameters",
                code="invalid_function_parameters",
            )


def _check_strict(
    tools: list[ChatCompletionToolParam], chosen: Tools, beside_a_format: bool = False
) -> None:
    """A strict function whose arguments a forced choice (or tool_choice auto beside a
    response format) constrains: what the grammar cannot enforce in its parameters is a 400
    naming that tool (as response_format's strict schema)."""
    for i, tool in enumerate(tools):
        name = tool.function.name
        constrained = (beside_a_format and name in chosen.names) or chosen.constrains(name)
        if tool.function.strict is not True or not constrained:
            continue
        # (as the grammar will take them: every property required, as response_format's)
        try:
            found = unenforced(strict_normalized(tool.function.parameters or {}))
            refusal = strict_refusal(found) if found else None
        except InvalidSchema as exc:
            refusal = str(exc)
        if refusal:
            raise InvalidRequest(
                f"Invalid schema for function '{tool.function.name}': {refusal}.",
                param=f"tools[{i}].function.parameters",
                code="invalid_schema",
            )


def _named_tool(
    named: NamedToolChoice, tools: list[ChatCompletionToolParam], param: str
) -> NamedToolChoice:
    """A tool named by tool_choice, which must be among the tools."""
    if named.function.name not in {t.function.name for t in tools}:
        raise InvalidRequest(
            f"{param} names '{named.function.name}', which is not among the tools.",
            param=f"{param}.function.name",
            code="invalid_value",
        )
    return named


# -- request: chat completions ----------------------------------------------------------------

# OpenAI fields we accept in the schema but do not support yet: name -> "is this value a use?".
UNSUPPORTED_WHEN = {
    "audio": lambda v: v is not None,
    "function_call": lambda v: v is not None,
    "functions": lambda v: bool(v),
    "modalities": lambda v: v not in (None, [], ["text"]),
    # Each asks for what the answer would silently lack: screening, a predicted output to
    # check against, fresh web results.
    "moderation": lambda v: v is not None,
    "prediction": lambda v: v is not None,
    "web_search_options": lambda v: v is not None,
}
# Accepted with no effect (logged at debug): hints for a hosted service (caching, abuse
# tracking, tiers, storage, answer length); reasoning_effort is read on its own.
IGNORED_FIELDS = (
    "metadata",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
    "safety_identifier",
    "service_tier",
    "store",
    "user",
    "verbosity",
)
# vLLM's chat-only fields that need what is not here: documents and a per-request template
# (Qwen-VL's templates have no documents section, and a request's own Jinja template is
# code the server would run), echo, logits processors, the rendered prompt's text.
CHAT_VLLM_UNSUPPORTED_WHEN = {
    "echo": bool,
    "documents": bool,
    "chat_template": lambda v: v is not None,
    "logits_processors": bool,
    "return_prompt_text": bool,
    "best_of": lambda v: v not in (None, 1),  # one choice per sample, as on /v1/completions
}
# vLLM's guided decoding fields: each maps onto the structured-output grammar.
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class ChatCompletionRequest(StructuredFields, VllmFields):
    @model_validator(mode="before")
    @classmethod
    def _other_servers_options(cls, data: Any) -> Any:
        return hosted_options(integer_logprobs(dashscope_options(reasoning_switches(data))))

    messages: Annotated[list[ChatMessageParam], Turns] = Field(min_length=1)
    model: str | None = None  # left out: the served model (vLLM's leniency; OpenAI requires it)
    audio: Any | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    function_call: Any | None = None
    functions: list[Any] | None = None
    logit_bias: LogitBias | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    metadata: MetadataPairs = None
    modalities: list[str] | None = None
    moderation: dict[str, Any] | None = None
    n: int | None = Field(default=None, ge=1)
    parallel_tool_calls: bool | None = None
    prediction: Any | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    reasoning_effort: ReasoningEffort | None = None
    safety_identifier: str | None = None
    seed: int | None = None
    service_tier: str | None = None
    stop: Stop = None
    store: bool | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    tool_choice: ToolChoice | None = None
    tools: list[ChatCompletionToolParam] | None = Field(default=None, max_length=128)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    top_p: float | None = Field(default=None, ge=0, le=1)
    user: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    # extension (vLLM's): a thinking checkpoint's reasoning ends after this many tokens
    thinking_token_budget: int | None = Field(default=None, ge=-1, lt=2**31)  # -1: no budget
    # extension (vLLM's): false leaves a thinking checkpoint's reasoning out of the answer
    include_reasoning: bool | None = None
    # extensions (vLLM's): the chat template's rendering
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    # extensions (vLLM's): how images and videos are read (see MediaWishes)
    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    # extensions (vLLM's) refused when set (CHAT_VLLM_UNSUPPORTED_WHEN)
    echo: bool | None = None
    documents: list[dict[str, Any]] | None = None
    best_of: int | None = Field(default=None, ge=1)
    chat_template: str | None = None
    logits_processors: list[Any] | None = None
    return_prompt_text: bool | None = None
    # extension (ours): each image's size as the model read it, in the answer (a box or point
    # Qwen2.5-VL writes is in that image's pixels)
    return_image_sizes: bool | None = None
    # extension (DashScope's): images without a detail read at the model's full resolution
    vl_high_resolution_images: bool | None = None
    # extension (ours): how videos are read; default native on /v1, captions on /v2/media
    video_mode: Literal["native", "captions"] | None = None
    # extension (ours, Animus' name): one frame per detected scene instead of uniform frames
    use_scenes: bool | None = None

    @model_validator(mode="after")
    def _check_template_flags(self, info: ValidationInfo) -> ChatCompletionRequest:
        # As vLLM: a prefill is continued, so no new assistant turn may be opened after it.
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        # (a body translated from /v1/responses or /v1/messages had its own API's checks, which
        # name its own fields)
        if not (info.context or {}).get(TRANSLATED):
            check_tool_turns(self.messages, bool(self.continue_final_message))
        return self

    def unsupported_fields(self) -> list[str]:
        openai = [name for name, used in UNSUPPORTED_WHEN.items() if used(getattr(self, name))]
        chat = [n for n, used in CHAT_VLLM_UNSUPPORTED_WHEN.items() if used(getattr(self, n))]
        return openai + chat + self.vllm_unsupported() + self.structured_unsupported()

    def ignored_fields(self) -> list[str]:
        """Fields the request set that change nothing here (for the debug log)."""
        ignored = [f for f in IGNORED_FIELDS if getattr(self, f) is not None]
        if self.reasoning_effort not in (None, "none"):
            ignored.append("reasoning_effort")
        ignored += self.vllm_ignored()
        if self.add_special_tokens is not None:  # (the template writes them; Qwen's add none)
            ignored.append("add_special_tokens")
        if self.stream_options and self.stream_options.include_obfuscation is not None:
            ignored.append("stream_options.include_obfuscation")
        return ignored

    def num_choices(self, max_n: int) -> int:
        return check_n(self.n, max_n)

    def to_template(self) -> TemplateOptions:
        return TemplateOptions(
            add_generation_prompt=self.add_generation_prompt is not False
            and not self.continue_final_message,
            continue_final_message=bool(self.continue_final_message),
            kwargs=thinking_kwargs(self.reasoning_effort, self.chat_template_kwargs),
        )

    def to_tools(self) -> Tools | None:
        """The tools and how they may be used; None when the request has none."""
        if not self.tools:
            # `tools: []` (a framework with none registered) with auto or required is none,
            # as vLLM reads it; a named choice, or any without a `tools` list, cannot be.
            empty = self.tools is not None and self.tool_choice in ("auto", "required")
            if self.tool_choice not in (None, "none") and not empty:
                raise InvalidRequest(
                    "tool_choice needs tools.", param="tool_choice", code="invalid_value"
                )
            return None
        _check_tools(self.tools)
        tools_here = list(self.tools)
        choice = self.tool_choice or "auto"
        if isinstance(choice, NamedToolChoice):
            choice = _named_tool(choice, self.tools, "tool_choice").function.name
        elif isinstance(choice, AllowedToolsChoice):
            where = "tool_choice.allowed_tools.tools"
            names = {
                _named_tool(named, self.tools, f"{where}[{i}]").function.name
                for i, named in enumerate(choice.allowed_tools.tools)
            }
            tools_here = [t for t in self.tools if t.function.name in names]
            choice = choice.allowed_tools.mode
        definitions = tuple(t.model_dump(exclude_none=True) for t in tools_here)
        tools = Tools(definitions, choice, self.parallel_tool_calls is not False)
        _check_strict(self.tools, tools)
        return tools

    def forced_tool_param(self, tools: Tools | None) -> str:
        """Where a forced call's schema came from, for errors about it: the one tool it can
        call (tools[i].function.parameters, i as sent), else all of them (tools)."""
        if tools is None or not tools.is_forced:
            return "tools"
        names = {tool["function"]["name"] for tool in tools.definitions}
        if tools.named is not None:
            names = {tools.named}
        indices = [i for i, t in enumerate(self.tools or []) if t.function.name in names]
        return f"tools[{indices[0]}].function.parameters" if len(indices) == 1 else "tools"

    def to_video_mode(
        self, default: Literal["native", "captions"]
    ) -> Literal["native", "captions"]:
        return self.video_mode or default

    def to_sampling_params(
        self,
        defaults: SamplingDefaults,
        tools: Tools | None = None,
        structured: StructuredOutput | None = None,
    ) -> SamplingParams:
        """tools, structured: this body's to_tools() and to_structured(), when the caller has
        them already."""
        if structured is None:
            structured = self.to_structured()
        if tools is None:
            tools = self.to_tools()
        if tools is not None and tools.is_forced:
            # The answer is the call: its grammar wins over a response_format beside it (sent
            # on purpose by clients that mirror the tool's schema there, as instructor does;
            # OpenAI takes the pair), which shapes text no forced answer has.
            structured = tools.grammar()
        elif tools is not None and tools.writes_beside(structured):
            _check_strict(self.tools or [], tools, beside_a_format=True)
            structured = tools.beside(structured)
        max_tokens = self.max_completion_tokens or self.max_tokens
        params = sampling_params(self, defaults, max_tokens, structured)
        if tools is not None and tools.is_forced:
            # Stop strings cut text, and a forced answer has none: they cut the call's JSON
            # (smolagents sends "Observation:" with tool_choice required), its wrapper leaking.
            params = replace(params, stop=())
        if self.top_logprobs and not self.logprobs:  # 0 is neutral, as OpenAI takes it
            raise InvalidRequest(
                "top_logprobs needs logprobs set to true.",
                param="top_logprobs",
                code="invalid_value",
            )
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        budget = None if self.thinking_token_budget == -1 else self.thinking_token_budget
        return replace(params, logprobs=logprobs, thinking_token_budget=budget)

    def to_messages(self) -> list[ChatMessage]:
        messages = self.typed([_to_chat_message(m, i) for i, m in enumerate(self.messages)])
        if self.vl_high_resolution_images:
            messages = with_parts(messages, _high_resolution)
        wishes = MediaWishes.of(self.mm_processor_kwargs, self.media_io_kwargs)
        return messages if wishes is None else wishes.apply(messages)

    def typed(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """The media parts as the route reads them (here: as the client typed them)."""
        return messages


def _high_resolution(part: Part) -> Part:
    """DashScope's vl_high_resolution_images: its default budget (1,280 tokens, as --auto-image-
    tokens') becomes the model's ceiling (16,384 tokens), as detail high is here."""
    return (
        replace(part, detail="high")
        if isinstance(part, ImagePart) and part.detail == "auto"
        else part
    )


@dataclass(frozen=True)
class MediaWishes:
    """vLLM's per-request media options, as Qwen-VL clients send them: mm_processor_kwargs'
    min_pixels / max_pixels (or size's shortest_edge / longest_edge, transformers' newer
    names) and fps, media_io_kwargs' video num_frames and fps. Images are resized into the
    pixel range (in place of `detail`'s budget, as an image part's own range); for videos
    each is a wish that only lowers the server's ceilings, as a video part's own fps,
    max_frames and pixel fields are (which win)."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    fps: float | None = None
    num_frames: int | None = None

    @classmethod
    def of(
        cls, processor: dict[str, Any] | None, io: dict[str, dict[str, Any]] | None
    ) -> MediaWishes | None:
        if not processor and not io:
            return None
        processor, io = dict(processor or {}), dict(io or {})
        size = processor.pop("size", None) or {}
        if not isinstance(size, dict) or set(size) - {"shortest_edge", "longest_edge"}:
            raise _media_option("mm_processor_kwargs.size", "takes shortest_edge, longest_edge")
        video = io.pop("video", None) or {}
        if not isinstance(video, dict):
            raise _media_option("media_io_kwargs.video", "takes num_frames and fps")
        mm, vio = "mm_processor_kwargs", "media_io_kwargs.video"
        _always(processor, "do_sample_frames", "video frames are always sampled (fps, num_frames)")
        _always(processor, "do_resize", "images and frames are always resized to visual tokens")
        fps = _positive(video.pop("fps", None), f"{vio}.fps", number=True)
        frames = [
            _positive(options.pop(name, None), f"{where}.{name}")
            for options, where, name in (
                (video, vio, "num_frames"),
                (processor, mm, "num_frames"),
                (processor, mm, "max_frames"),
            )
        ]
        wishes = cls(
            min_pixels=_pixels(processor, size, "min_pixels", "shortest_edge"),
            max_pixels=_pixels(processor, size, "max_pixels", "longest_edge"),
            fps=_positive(processor.pop("fps", None), f"{mm}.fps", number=True) or fps,
            num_frames=min((n for n in frames if n), default=None),
        )
        if (wishes.min_pixels or 0) > (wishes.max_pixels or wishes.min_pixels or 0):
            raise _media_option(f"{mm}.min_pixels", "is above max_pixels")
        for name, left in (("mm_processor_kwargs", processor), ("media_io_kwargs", io)):
            if left:
                raise _media_option(
                    f"{name}.{next(iter(left))}",
                    "is not an option here: mm_processor_kwargs takes min_pixels, max_pixels, "
                    "size, fps, num_frames, max_frames, do_sample_frames and do_resize; "
                    "media_io_kwargs takes video.num_frames and video.fps",
                )
        if video:
            raise _media_option(f"media_io_kwargs.video.{next(iter(video))}", "is not an option")
        return wishes

    def apply(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        return with_parts(messages, self._part)

    def _part(self, part: Part) -> Part:
        if isinstance(part, ImagePart):
            video = None if part.or_video is None else self._frames(part.or_video)
            if part.min_pixels or part.max_pixels:  # (the part's own range wins)
                return replace(part, or_video=video)
            pixels = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
            return replace(part, or_video=video, **pixels)
        if isinstance(part, VideoPart):
            return replace(part, frames=self._frames(part.frames))
        return part

    def _frames(self, given: FrameRequest) -> FrameRequest:
        return replace(
            given,
            fps=given.fps or self.fps,
            max_frames=given.max_frames or self.num_frames,
            min_pixels=given.min_pixels or self.min_pixels,
            max_pixels=given.max_pixels or self.max_pixels,
        )


def _always(processor: dict[str, Any], name: str, why: str) -> None:
    """A processor switch that is always on here (Qwen's own vLLM examples send
    do_sample_frames true): true or absent is taken, false is a 400 saying why."""
    value = processor.pop(name, None)
    if value is not None and value is not True:
        param = f"mm_processor_kwargs.{name}"
        raise _media_option(param, f"takes only true ({why} here)")


def _pixels(processor: dict[str, Any], size: dict[str, Any], name: str, edge: str) -> int | None:
    """min_pixels / max_pixels, or their newer names in size (the older name wins)."""
    if name in processor:
        return _positive(processor.pop(name), f"mm_processor_kwargs.{name}")
    return _positive(size.get(edge), f"mm_processor_kwargs.size.{edge}")


# The largest media option taken: past any real pixel count or rate, and exact as a float
# (a 400-digit integer is refused here, not an OverflowError where it is multiplied later).
MAX_MEDIA_OPTION = 2**53


def _positive(value: Any, param: str, number: bool = False) -> Any:
    kinds = (int, float) if number else (int,)
    if value is None:
        return None
    # (NaN fails the comparison, infinity the bound)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value <= MAX_MEDIA_OPTION:
        kind = "number" if number else "integer"
        raise _media_option(param, f"takes a positive {kind} (at most 2**53)")
    return value


def _media_option(param: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{param} {problem}.", param=param, code="invalid_value")


def _guided(fields: dict[str, Any], param: str) -> StructuredOutput | None:
    """vLLM's constraint fields (json, regex, choice, grammar, json_object) -> the grammar."""
    if len([v for v in fields.values() if v not in (None, False)]) > 1:
        raise InvalidRequest(f"{param} takes one constraint.", param=param, code="invalid_value")
    if (schema := fields.get("json")) is not None:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError):  # nested past the parser's depth: not a 500
                raise InvalidRequest(
                    f"{param}: the JSON schema is not valid JSON.",
                    param=param,
                    code="invalid_schema",
                ) from None
        return StructuredOutput.json_schema(schema)
    if fields.get("regex") is not None:
        return StructuredOutput.regex(fields["regex"])
    if fields.get("choice") is not None:
        return StructuredOutput.choice(fields["choice"])
    if fields.get("grammar") is not None:
        return StructuredOutput.grammar(fields["grammar"])
    if fields.get("json_object"):
        return StructuredOutput("json_object")
    if param == "structured_outputs":  # vLLM's form names its one constraint: {} is a mistake
        raise InvalidRequest(
            "structured_outputs takes one constraint: json, regex, choice, grammar or json_object.",
            param=param,
            code="invalid_value",
        )
    return None


def check_n(n: int | None, max_n: int) -> int:
    if n is not None and n > max_n:
        raise InvalidRequest(
            f"n must be at most {max_n} on this server (--max-n).",
            param="n",
            code="invalid_value",
        )
    return n or 1


def check_stream_options(body: Any) -> None:
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest(
            "stream_options is only allowed when stream is true.",
            param="stream_options",
            code="invalid_value",
        )


def sampling_params(
    body: Any,
    defaults: SamplingDefaults,
    max_tokens: int | None,
    structured: StructuredOutput | None = None,
) -> SamplingParams:
    """The sampling fields chat and text completions share, as the engine's parameters;
    `defaults` for those the request leaves out (or sends as null)."""
    if body.min_tokens and max_tokens and body.min_tokens > max_tokens:
        raise InvalidRequest(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens}).",
            param="min_tokens",
            code="invalid_value",
        )
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if structured is not None and body.cache_salt is not None:
        structured = replace(structured, cache_salt=body.cache_salt)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        # 0 (OpenAI takes it; Open WebUI's slider starts there): the likeliest token only
        top_p=defaults.top_p if body.top_p is None else max(body.top_p, MIN_TOP_P),
        top_k=defaults.top_k if body.top_k is None else max(body.top_k, 0),  # -1: off
        seed=None if body.seed is None else body.seed % SEED_MODULUS,
        stop=tuple(s for s in stop if s),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=(
            defaults.repetition_penalty
            if body.repetition_penalty is None
            else body.repetition_penalty
        ),
        min_tokens=body.min_tokens or 0,
        ignore_eos=bool(body.ignore_eos),
        structured=structured,
        min_p=defaults.min_p if body.min_p is None else body.min_p,
        logit_bias=logit_bias(body.logit_bias),
        allowed_token_ids=tuple(body.allowed_token_ids or ()),
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        skip_special_tokens=body.skip_special_tokens is not False,
        bad_words=tuple(body.bad_words or ()),
        no_repeat_ngram_size=body.no_repeat_ngram_size(),
        cache_salt=body.cache_salt,
        priority=body.priority or 0,
        prompt_logprobs=body.prompt_logprobs,
    )


def logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias (token id strings -> bias) as (id, bias) pairs; the ids' range
    against the vocabulary is the engine's check."""
    pairs = []
    for key, value in (bias or {}).items():
        # canonical only: "15" and "015" would be one token biased twice
        if not (key.isascii() and key.isdigit()) or str(int(key)) != key or int(key) >= 2**31:
            raise InvalidRequest(
                f"logit_bias keys must be token ids (non-negative integers), not {key!r}.",
                param="logit_bias",
                code="invalid_value",
            )
        pairs.append((int(key), value))
    return tuple(pairs)


def _to_chat_message(message: ChatMessageParam, index: int) -> ChatMessage:
    """The message as the pipeline reads it. Media in user and tool messages (a tool's
    screenshot, as vLLM's clients send it: OpenAI's tool messages hold only text)."""
    # "developer" is OpenAI's newer name for the system role.
    role = "system" if message.role == "developer" else message.role
    calls = tuple(
        ToolCall(c.id or "", c.function.name, c.function.arguments)
        for c in message.tool_calls or ()
    )
    reasoning = (message.reasoning_content or message.reasoning) if role == "assistant" else None
    if message.content is None or isinstance(message.content, str):
        content = message.content or ""
        return ChatMessage(role=role, content=content, tool_calls=calls, reasoning=reasoning)
    parts: list[Part] = []
    for j, part in enumerate(message.content):
        param = f"messages[{index}].content[{j}]"
        if isinstance(part, TextContentPart):
            parts.append(TextPart(part.text))
        elif isinstance(part, RefusalContentPart):
            parts.append(TextPart(part.refusal))
        elif role not in ("user", "tool"):
            raise InvalidRequest(
                f"Only user and tool messages may carry media; {param} is in the "
                f"{message.role} message.",
                param=param,
                code="unsupported_content",
            )
        else:
            parts.append(_media_part(part, param))
    return ChatMessage(role=role, content=parts, tool_calls=calls, reasoning=reasoning)


def _media_part(part: ContentPart, param: str) -> Part:
    if isinstance(part, ImageContentPart | InputImageContentPart | InputFileContentPart):
        return part.as_image(param)
    if isinstance(part, FileContentPart):
        return part.file.as_image(param)
    assert isinstance(part, VideoContentPart)  # (text and refusals are read before)
    wishes = part.video_url.frames(beside=part, param=param)
    url_kind(part.video_url.url, param)  # (.flv, .ts: refused by name, as on /v2)
    return VideoPart(part.video_url.url, wishes, param)


# -- responses -------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    @classmethod
    def of(cls, call: ToolCall) -> ToolCallOut:
        return cls(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None  # (OpenAI's: the model here never refuses apart from its text)
    # extension: a thinking checkpoint's reasoning, under current vLLM's name and under the
    # older one that vLLM < 0.11 and the hosted Qwen APIs send (the same text in both); an
    # answer without reasoning has reasoning null (vLLM's) and reasoning_content "" (the hosted
    # APIs': a client of theirs may read it as a string)
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    annotations: list[dict[str, Any]] = Field(default_factory=list)  # (OpenAI's: no web search)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None

    @classmethod
    def of(cls, info: TokenInfo) -> TopLogprob:
        return cls(token=info.token, logprob=info.logprob, bytes=list(info.bytes))


class ChatCompletionTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]

    @classmethod
    def of(cls, entry: TokenLogprob) -> ChatCompletionTokenLogprob:
        return cls(
            token=entry.token,
            logprob=entry.logprob,
            bytes=list(entry.bytes),
            top_logprobs=[TopLogprob.of(t) for t in entry.top],
        )


class ChoiceLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None
    refusal: list[ChatCompletionTokenLogprob] | None = None  # (always null, as OpenAI sends it)

    @classmethod
    def of(cls, entries: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
        if entries is None:
            return None
        return cls(content=[ChatCompletionTokenLogprob.of(e) for e in entries])


def _absent(value: Any) -> bool:
    """An extension field no one asked for is left out of the body, not sent as null."""
    return value is None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str
    stop_reason: str | int | None = None  # extension (vLLM's, shown in the Animus reference)
    token_ids: list[int] | None = Field(default=None, exclude_if=_absent)  # return_token_ids

    @classmethod
    def of(cls, choice: ChoiceResult) -> ChatCompletionChoice:
        calls = [ToolCallOut.of(c) for c in choice.tool_calls] or None
        return cls(
            index=choice.index,
            message=ChatCompletionMessage(
                content=choice.content,
                reasoning=choice.reasoning_content,
                reasoning_content=choice.reasoning_content or "",
                tool_calls=calls,
            ),
            logprobs=ChoiceLogprobs.of(choice.logprobs),
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
            token_ids=choice.token_ids,
        )


class PromptTokensDetails(BaseModel):
    audio_tokens: int = 0  # (OpenAI's; no audio here)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (OpenAI's field)
    image_tokens: int
    text_tokens: int
    video_tokens: int = 0  # extension: tokens of video frames (or of captioned frames)


class CompletionTokensDetails(BaseModel):
    """OpenAI's fields, always there (clients read reasoning_tokens without a check), and
    text_tokens as the hosted Qwen APIs send it (every completion token is text)."""

    accepted_prediction_tokens: int = 0  # (no predicted outputs here)
    audio_tokens: int = 0
    reasoning_tokens: int = 0  # a thinking checkpoint's tokens before "</think>"
    rejected_prediction_tokens: int = 0
    text_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None

    @classmethod
    def of(
        cls,
        num_prompt: int,
        num_image: int,
        num_video: int,
        num_completion: int,
        num_cached: int = 0,
        num_reasoning: int | None = None,
    ) -> Usage:
        return cls(
            prompt_tokens=num_prompt,
            completion_tokens=num_completion,
            total_tokens=num_prompt + num_completion,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=num_cached,
                image_tokens=num_image,
                text_tokens=num_prompt - num_image - num_video,
                video_tokens=num_video,
            ),
            completion_tokens_details=CompletionTokensDetails(
                reasoning_tokens=num_reasoning or 0, text_tokens=num_completion
            ),
        )


class FrameCaptionOut(BaseModel):
    timestamp: float  # seconds from the start of the video
    caption: str
    video_index: int = 0  # which of the request's videos, 0 for the first sent


class ImageSize(BaseModel):
    """An image as the model read it (resized to whole tokens): what its coordinates mean."""

    width: int
    height: int


def image_sizes_out(sizes: Sequence[tuple[int, int]] | None) -> list[ImageSize] | None:
    """return_image_sizes' list (extension), in a response or the first chunk."""
    return None if sizes is None else [ImageSize(width=w, height=h) for w, h in sizes]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    # extension (vLLM's; null in the Animus reference): each prompt token's logprob entry
    prompt_logprobs: list[PromptLogprobs | None] | None = None
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_absent)  # vLLM's
    frames: list[FrameCaptionOut] | None = None  # extension: captions mode's per-frame captions
    image_sizes: list[ImageSize] | None = Field(default=None, exclude_if=_absent)  # extension

    @classmethod
    def from_result(cls, request_id: str, model: str, result: ChatResult) -> ChatCompletionResponse:
        return cls(
            id=request_id,
            created=int(time.time()),
            model=model,
            choices=[ChatCompletionChoice.of(choice) for choice in result.choices],
            usage=Usage.of(*result.run.usage()),
            prompt_logprobs=result.prompt_logprobs,
            prompt_token_ids=result.prompt_token_ids,
            frames=frames_out(result.run.frames),
            image_sizes=image_sizes_out(result.image_sizes),
        )

    def with_call_lists(self) -> ChatCompletionResponse:
        """`tool_calls` an empty list, not null, in a message without calls: the Animus
        reference's shape (vLLM's, which it runs), where a client may iterate it as is."""
        for choice in self.choices:
            if choice.message.tool_calls is None:
                choice.message.tool_calls = []
        return self


def frames_out(frames: list | None) -> list[FrameCaptionOut] | None:
    """Captions mode's per-frame captions (extension), in a response or the first chunk."""
    if frames is None:
        return None
    return [
        FrameCaptionOut(timestamp=f.timestamp, caption=f.caption, video_index=f.video_index)
        for f in frames
    ]


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    # extension: a thinking checkpoint's reasoning, under both names (as in the message)
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # extension
    token_ids: list[int] | None = Field(default=None, exclude_if=_absent)  # vLLM's


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None
    # extension: captions mode's frames, on the first chunk (they exist before the answer)
    frames: list[FrameCaptionOut] | None = None
    # extension (vLLM's return_token_ids): on the first chunk
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_absent)
    # extension (ours, return_image_sizes): on the first chunk
    image_sizes: list[ImageSize] | None = Field(default=None, exclude_if=_absent)


class ModelPermission(BaseModel):
    """vLLM's (OpenAI's old) permission entry, which some vLLM clients read."""

    id: str = Field(default_factory=lambda: f"modelperm-{uuid.uuid4().hex}")
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    """A served model, as OpenAI's clients and Anthropic's (`type`, `display_name`,
    `created_at`) read it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlm-server"
    root: str  # extension: the checkpoint this name serves
    parent: str | None = None  # extension (vLLM's): no adapters here
    max_model_len: int  # extension
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])
    type: Literal["model"] = "model"
    lifecycle: Literal["active"] = "active"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def display_name(self) -> str:
        return self.id

    @computed_field  # type: ignore[prop-decorator]
    @property
    def created_at(self) -> str:  # RFC 3339
        when = datetime.datetime.fromtimestamp(self.created, datetime.UTC)
        return when.isoformat().replace("+00:00", "Z")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def max_input_tokens(self) -> int:
        return self.max_model_len


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    # Anthropic's page fields: every model is on the one page
    has_more: bool = False

    @computed_field  # type: ignore[prop-decorator]
    @property
    def first_id(self) -> str | None:
        return self.data[0].id if self.data else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def last_id(self) -> str | None:
        return self.data[-1].id if self.data else None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- media categories (Animus) ----------------------------------------------------------------

MetadataKey = Literal["categories", "participants", "actions", "scene", "tags"]


class JobOptions(StrictModel):
    """The Animus media endpoints' way to ask for a durable job instead of a waiting answer."""

    # Run as a job and POST the finished job there (Standard Webhooks signatures); checked
    # when the job is submitted (invalid_webhook_url).
    webhook_url: str | None = Field(default=None, min_length=1, max_length=2000)
    # Run as a durable job: 202 at once, the answer at /v2/media/status/{id}.
    async_: bool | None = Field(default=None, alias="async")

    def is_async(self) -> bool:
        """A webhook implies a job: its answer comes by webhook (and at the status URL)."""
        return bool(self.async_ or self.webhook_url)


class MediaCompletionRequest(ChatCompletionRequest, JobOptions):
    """/v2/media/completions: the chat request, optionally run as a job (not with stream)."""

    model: str  # type: ignore[assignment]  # required, as in the Animus reference

    def typed(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """The Animus contract's content is text and image_url parts, and a video is sent as
        one: a data: URI declaring a video is one; another URL's bytes decide once it is
        downloaded (its name may say neither, or be wrong)."""

        def video_or_image(part: Part) -> Part:
            if not isinstance(part, ImagePart) or part.file_id is not None:
                return part
            kind = url_kind(part.url, part.param)  # (refuses the containers not read here)
            # (the part's own pixel range is its frames' if it is a video)
            frames = FrameRequest(min_pixels=part.min_pixels, max_pixels=part.max_pixels)
            if kind is None or not is_data_uri(part.url):  # (judged by its bytes)
                return replace(part, or_video=frames)
            if kind == "video":
                return VideoPart(part.url, frames, part.param)
            return part

        return with_parts(messages, video_or_image)


class MediaCategoriesRequest(JobOptions):
    # Optional here only (seed 000's categories call has no model): the first served name.
    model: str | None = None
    media_url: str = Field(min_length=1)
    metadata: list[MetadataKey] | None = Field(default=None, min_length=1)
    use_scenes: bool | None = False
    # Extensions, for a video (as a video part takes them): wishes that only lower the
    # server's ceilings (60 frames, 2 a second), to analyse fewer frames of a long video.
    fps: float | None = Field(default=None, gt=0)
    max_frames: int | None = Field(default=None, ge=1)

    def keys(self) -> tuple[str, ...]:
        """The requested keys in the canonical order (all five when none are given)."""
        wanted = set(self.metadata or METADATA_KEYS)
        return tuple(k for k in METADATA_KEYS if k in wanted)


class FrameMetadata(BaseModel):
    timestamp: float
    result: dict[str, Any]


class MediaCategoriesResponse(BaseModel):
    id: str
    object: Literal["media.categories"] = "media.categories"
    created: int
    model: str
    media_type: Literal["image", "video"]
    result: dict[str, Any]  # exactly the requested keys
    frames: list[FrameMetadata] | None = None  # videos: each analysed frame's own result
    usage: Usage


class MediaJob(BaseModel):
    id: str
    object: Literal["media.job"] = "media.job"
    kind: Literal["categories", "completions"]
    status: Literal["queued", "processing", "completed", "failed", "cancelled"]
    progress: float  # 0..1: frames done / planned
    created_at: int
    updated_at: int
    status_url: str
    # once completed: the body the synchronous request would have answered
    # (media.categories or chat.completion)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # {message, type, param, code}, once failed
    # deliveries: id, url, status, attempts, last_status, last_error, next_attempt_at (pending)
    webhooks: list[dict[str, Any]] = []

    @classmethod
    def from_job(
        cls, job: Job, root_path: str, webhooks: list[dict[str, Any]] | None = None
    ) -> MediaJob:
        return cls.model_validate({**job.as_dict(root_path), "webhooks": webhooks or []})


JobStatus = Literal["queued", "processing", "completed", "failed", "cancelled"]


class MediaJobList(BaseModel):
    """GET /v2/media/jobs: newest first, in OpenAI's list shape (the cursor: after=last_id)."""

    object: Literal["list"] = "list"
    data: list[MediaJob]
    first_id: str | None
    last_id: str | None
    has_more: bool


# -- POST /v1/completions (text prompts, OpenAI's legacy completions as vLLM serves them) -------

COMPLETION_UNSUPPORTED_WHEN = {
    "best_of": lambda v: v not in (None, 1),
    "suffix": lambda v: v is not None,
    "prompt_embeds": lambda v: v is not None,
}
OPENAI_COMPLETION_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions


class CompletionRequest(StructuredFields, VllmFields):
    model: str | None = None  # left out: the served model (vLLM's leniency; OpenAI requires it)
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    best_of: int | None = Field(default=None, ge=1)
    echo: bool | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    # 0 only with echo: the prompt scored, nothing generated (what evaluation harnesses send)
    max_tokens: int | None = Field(default=OPENAI_COMPLETION_MAX_TOKENS, ge=0)
    n: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    stop: Stop = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    user: str | None = None
    prompt_embeds: Any | None = None  # extension (vLLM's): refused when set

    @field_validator("prompt", mode="before")
    @classmethod
    def _token_ids_in_range(cls, value: Any) -> Any:
        """Token ids out of range said as such (the union's first complaint would be that
        the prompt is not a string)."""
        if isinstance(value, list):
            rows = value if value and all(isinstance(v, list) for v in value) else [value]
            ids = [i for row in rows for i in row if isinstance(i, int) and not isinstance(i, bool)]
            if any(not 0 <= i < 2**31 for i in ids):
                raise ValueError("a token id is an integer from 0 to 2**31 - 1")
        return value

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any) -> Any:
        # null is "unset" (as vLLM reads it), not the server's longer chat default
        return OPENAI_COMPLETION_MAX_TOKENS if value is None else value

    def check_max_tokens(self) -> None:
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest(
                "max_tokens must be at least 1 (0 only with echo: the prompt scored).",
                param="max_tokens",
                code="invalid_value",
            )
        if self.echo_only and self.min_tokens:
            raise InvalidRequest(
                "min_tokens cannot be met with max_tokens 0: nothing is generated.",
                param="min_tokens",
                code="invalid_value",
            )

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) back, nothing generated."""
        return bool(self.echo) and self.max_tokens == 0

    def unsupported_fields(self) -> list[str]:
        openai = [n for n, used in COMPLETION_UNSUPPORTED_WHEN.items() if used(getattr(self, n))]
        return openai + self.vllm_unsupported() + self.structured_unsupported()

    def num_choices(self, max_n: int) -> int:
        return check_n(self.n, max_n)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequest("prompt must not be empty.", param="prompt", code="invalid_value")
        return prompts  # type: ignore[return-value]

    def to_sampling_params(self, defaults: SamplingDefaults = OPENAI_DEFAULTS) -> SamplingParams:
        # echo only: one token is generated (the prompt's last position is scored by it) and
        # left out of the answer, as vLLM does
        max_tokens = 1 if self.echo_only else self.max_tokens
        params = sampling_params(self, defaults, max_tokens, self.to_structured())
        # echo with logprobs shows the prompt's tokens with their logprobs too (vLLM's way)
        scored = self.prompt_logprobs
        if scored is None and self.echo:
            scored = self.logprobs
        return replace(params, logprobs=self.logprobs, prompt_logprobs=scored)


class CompletionLogprobs(BaseModel):
    """The legacy shape (vLLM's): parallel lists, one entry per token; each top_logprobs
    dict holds the sampled token and the `logprobs` most likely ones."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float | None] | None]

    @classmethod
    def of(
        cls, entries: list[TokenLogprob], offset: int, prompt: EchoedPrompt | None = None
    ) -> CompletionLogprobs:
        """offset: where the first entry's text starts in the choice's text. prompt: the echoed
        prompt's tokens come first, from offset 0 (its first token has no logprob: null, as in
        vLLM), and the answer's follow them."""
        logprobs = cls(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        if prompt is not None:
            logprobs._add(prompt.first, None, None, 0)
            at = len(prompt.first)
            for entry in prompt.scored:
                logprobs._add(entry.token, entry.logprob, entry.top, at)
                at += len(entry.token)
            # The answer's offsets go on from the prompt tokens' own texts (as vLLM's do):
            # the lists stay monotonic when a token is part of a character (U+FFFD).
            offset = at
        for entry in entries:
            logprobs._add(entry.token, entry.logprob, entry.top, offset)
            offset += len(entry.token)
        return logprobs

    def _add(
        self, token: str, logprob: float | None, top: tuple[TokenInfo, ...] | None, offset: int
    ) -> None:
        self.text_offset.append(offset)
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(None if top is None else _by_text(top, token, logprob))


def _by_text(
    top: tuple[TokenInfo, ...], token: str, logprob: float | None
) -> dict[str, float | None]:
    """The top tokens and the sampled one, keyed by text. Two tokens can share a text (the
    byte pieces of one character all read U+FFFD): the key keeps the likelier's logprob, so
    the dict's best is the position's best (lm-eval reads a token as greedy when its logprob
    is the dict's maximum; the sampled token's own is in token_logprobs)."""
    best: dict[str, float | None] = {}
    for text, value in [*((t.token, t.logprob) for t in top), (token, logprob)]:
        known = best.get(text)
        if text not in best or (value is not None and (known is None or value > known)):
            best[text] = value
    return best


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None  # extension (vLLM's)
    # extensions (vLLM's): prompt_logprobs, and return_token_ids' ids
    prompt_logprobs: list[PromptLogprobs | None] | None = None
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_absent)
    token_ids: list[int] | None = Field(default=None, exclude_if=_absent)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: None = None


# -- POST /tokenize, /detokenize (vLLM's) -----------------------------------------------------


class TokenizeCompletionRequest(StrictModel):
    """vLLM's /tokenize of a text prompt, tokenized as /v1/completions tokenizes it."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = None  # default true (Qwen's tokenizers add none anyway)
    return_token_strs: bool | None = None


class TokenizeChatRequest(ChatCompletionRequest):
    """vLLM's /tokenize of chat messages: a chat completion's body (a client can send the one
    it is about to send; what only changes the answer is ignored) -> the prompt it would run,
    its images and videos fetched and read as /v1/chat/completions reads them."""

    return_token_strs: bool | None = None


def _tokenize_kind(body: Any) -> str:
    chat = isinstance(body, dict) and "messages" in body
    return "TokenizeChatRequest" if chat else "TokenizeCompletionRequest"


# One endpoint, two bodies, told apart by "messages" as vLLM does (the tags are class names,
# which the error handler leaves out of a field's name).
TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("TokenizeCompletionRequest")]
    | Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")],
    Discriminator(_tokenize_kind),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None
    # extension (ours, return_image_sizes): the sizes an answer to these messages would read
    image_sizes: list[ImageSize] | None = Field(default=None, exclude_if=_absent)


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info (vLLM's): the tokenizer's special tokens, the context the server
    serves, and the chat template it renders."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    model_max_length: int
    chat_template: str | None
