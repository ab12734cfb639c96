"""The wire protocol: every request and response body, as pydantic models.

Fields follow OpenAI's order; our extensions are marked `# extension`. A field OpenAI defines
that we do not support yet is accepted by the schema but refused with a 400 naming it
(`unsupported_fields`), never silently dropped. Unknown fields are refused too, as OpenAI does.
"""

from __future__ import annotations

import datetime
import json
import logging
import mimetypes
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    ValidationInfo,
    computed_field,
    field_validator,
    model_validator,
)

from server.engine.inputs import TemplateOptions, Truncation
from server.engine.json_schema import (
    InvalidSchema,
    strict_normalized,
    strict_refusal,
    unenforced,
)
from server.engine.sampling import MIN_TOP_P, SamplingDefaults, SamplingParams
from server.engine.structured import StructuredOutput
from server.exceptions import InvalidRequest
from server.jobs.store import Job
from server.media.fetch import DATA_URI, UNDECLARED_TYPES, is_data_uri
from server.media.frames import FrameRequest
from server.media.image_frames import FRAME_TYPES
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

logger = logging.getLogger(__name__)
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256  # a stop string's tail is held back while streaming: keep it short
OPENAI_DEFAULTS = SamplingDefaults()
ANIMUS_DEFAULTS = SamplingDefaults(temperature=0.1)  # the Animus reference's default


class StrictModel(BaseModel):
    # No unknown fields, and no coercion: "stream": "yes" or "ignore_eos": 0 are type errors.
    model_config = ConfigDict(extra="forbid", strict=True)


class PartModel(BaseModel):
    """Inside messages and content parts unknown keys are ignored (logged at debug), as vLLM
    and SGLang do: clients put their own there (SGLang's "modalities", vLLM's "uuid"). Still
    no coercion."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = {f.alias or name for name, f in cls.model_fields.items()}
            if unknown := sorted(str(k) for k in data if k not in known):
                logger.debug("ignored unknown keys in a %s: %s", cls.__name__, ", ".join(unknown))
        return data


def _no_lone_surrogates(value: str) -> str:
    # JSON may carry "\ud83d" alone; it is not text and the tokenizer cannot encode it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text contains an invalid unicode escape (a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]
StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH), AfterValidator(_no_lone_surrogates)]


def _stop_count(value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
    return value


Stop = Annotated[StopString | list[StopString] | None, AfterValidator(_stop_count)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
# vLLM's bad_words: bounded as stop strings are (each step compares the answer's tail with
# the words its last token could be completing, on the engine's thread).
MAX_BAD_WORDS = 64
MAX_BAD_WORDS_CHARS = 4096


def _bad_words_size(words: list[str] | None) -> list[str] | None:
    if words is not None and sum(len(w) for w in words) > MAX_BAD_WORDS_CHARS:
        raise ValueError(f"bad_words may hold at most {MAX_BAD_WORDS_CHARS} characters in all")
    return words


BadWords = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]],
    Field(max_length=MAX_BAD_WORDS),
    AfterValidator(_bad_words_size),
]
MAX_CACHE_SALT = 1024
# OpenAI's logit_bias: token ids (as JSON object keys, so strings) -> -100..100
LogitBias = dict[str, Annotated[float, Field(ge=-100, le=100)]]
# OpenAI's reasoning levels. No Qwen-VL checkpoint has levels: "none" turns a -Thinking
# checkpoint's reasoning off (chat_template_kwargs.enable_thinking false, unless the request
# sets that itself); the others leave it as the checkpoint does it.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


def thinking_kwargs(effort: str | None, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The chat template's variables a reasoning effort implies, beside the request's own."""
    kwargs = dict(kwargs or {})
    if effort == "none":
        kwargs.setdefault("enable_thinking", False)
    return kwargs


MAX_METADATA_PAIRS = 16
METADATA_BOUNDS = (
    "metadata holds at most 16 pairs, keys of at most 64 characters and values of at most 512."
)


def check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's bounds: 16 pairs, keys of at most 64 characters, values of 512."""
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS or any(
        len(key) > 64 or len(value) > 512 for key, value in metadata.items()
    ):
        raise InvalidRequest(METADATA_BOUNDS, param="metadata", code="invalid_value")


def _few_pairs(value: Any) -> Any:
    """Counted before the pairs are validated (two million of them took 1.9 s of the event
    loop, to be refused or ignored after)."""
    if isinstance(value, dict) and len(value) > MAX_METADATA_PAIRS:
        raise ValueError(METADATA_BOUNDS.removesuffix("."))
    return value


MetadataPairs = Annotated[dict[str, str] | None, BeforeValidator(_few_pairs)]
MetadataDict = Annotated[dict[str, str], BeforeValidator(_few_pairs)]  # (where it is required)


# -- request: messages ------------------------------------------------------------------------


class TextContentPart(PartModel):
    # input_text is the Responses API's name (vLLM's parser reads it as text); output_text
    # is how such clients write an earlier answer into the history.
    type: Literal["text", "input_text", "output_text"]
    text: Text


class RefusalContentPart(PartModel):
    """An earlier refusal in an assistant message: read as its text, as vLLM does."""

    type: Literal["refusal"]
    refusal: Text


# qwen-vl-utils' media options this server does not take: refused by name, not ignored as
# unknown keys are (a video_start read as the whole video answered about another part of it).
QWEN_UTILS_IMAGE_ONLY = ("resized_height", "resized_width")
QWEN_UTILS_VIDEO_ONLY = (
    *QWEN_UTILS_IMAGE_ONLY,
    *("video_start", "video_end", "total_pixels", "min_frames", "sample_fps"),
)


def _refused_options(data: Any, names: tuple[str, ...], taken: str) -> Any:
    if isinstance(data, dict) and (given := [name for name in names if name in data]):
        raise ValueError(f"{given[0]} (qwen-vl-utils' option) is not taken here; {taken}")
    return data


class PixelRange(PartModel):
    """A media part's own pixel range (qwen-vl-utils' min_pixels / max_pixels): its frames or
    the image resized into it, within the server's (see media/frames.py, media/image.py)."""

    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _range(self) -> PixelRange:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels is above max_pixels")
        return self

    def pixels(self, beside: PixelRange, param: str) -> tuple[int | None, int | None]:
        """This range, or the one beside it (qwen-vl-utils' parts carry it there: a part's
        fields beside its URL object); each half checked alone, so checked again together."""
        least = self.min_pixels or beside.min_pixels
        most = self.max_pixels or beside.max_pixels
        if least and most and least > most:
            raise InvalidRequest(
                f"{param}: min_pixels is above max_pixels.", param=param, code="invalid_value"
            )
        return least, most


class ImageOptions(PixelRange):
    """An image's options, in image_url or beside it: qwen-vl-utils' unread ones refused."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unread_options(cls, data: Any) -> Any:
        return _refused_options(
            data, QWEN_UTILS_IMAGE_ONLY, "an image takes min_pixels, max_pixels"
        )


class ImageURL(ImageOptions):
    url: str = Field(min_length=1)
    # "original" (OpenAI's newest level: the image as sent) is read as high, our largest.
    detail: Literal["auto", "low", "high", "original"] = "auto"

    def budget(self) -> Literal["auto", "low", "high"]:
        return _budget(self.detail)


def _budget(detail: Literal["auto", "low", "high", "original"]) -> Literal["auto", "low", "high"]:
    return "high" if detail == "original" else detail


class ImageContentPart(ImageOptions):
    """(min_pixels / max_pixels may sit beside image_url too, as qwen-vl-utils' parts have
    them; those inside it win)"""

    type: Literal["image_url"]
    image_url: ImageURL

    def as_image(self, param: str) -> ImagePart:
        least, most = self.image_url.pixels(beside=self, param=param)
        url = self.image_url
        return ImagePart(url.url, url.budget(), param, min_pixels=least, max_pixels=most)

    @field_validator("image_url", mode="before")
    @classmethod
    def _accept_bare_url(cls, value: Any) -> Any:
        # Some clients send "image_url": "https://..." instead of {"url": ...}.
        return {"url": value} if isinstance(value, str) else value


class InputImageContentPart(PartModel):
    """The Responses API's image part, {"type": "input_image", "image_url": "https://...",
    "detail": ...} or {"type": "input_image", "file_id": ...} (an uploaded file), which vLLM's
    parser accepts in chat messages too."""

    type: Literal["input_image"]
    image_url: str | None = Field(default=None, min_length=1)
    file_id: str | None = Field(default=None, min_length=1, max_length=200)
    detail: Literal["auto", "low", "high", "original"] = "auto"

    @model_validator(mode="after")
    def _one_source(self) -> InputImageContentPart:
        if (self.image_url is None) == (self.file_id is None):
            raise ValueError("an input_image has either an image_url or a file_id")
        return self

    def as_image(self, param: str) -> ImagePart:
        return ImagePart(self.image_url or "", _budget(self.detail), param, file_id=self.file_id)


class FileRef(PartModel):
    """A file in a content part: an uploaded file's id, its bytes as base64 (a data: URL, or
    bare base64 typed by its filename), or its URL. Qwen-VL reads images, not documents: the
    file must be an image."""

    file_id: str | None = Field(default=None, min_length=1, max_length=200)
    file_data: str | None = Field(default=None, min_length=1)
    file_url: str | None = Field(default=None, min_length=1)  # (the Responses API's)
    filename: str | None = None
    detail: Literal["auto", "low", "high", "original"] = "auto"  # (the Responses API's)

    @model_validator(mode="after")
    def _one_source(self) -> FileRef:
        if sum(s is not None for s in (self.file_id, self.file_data, self.file_url)) != 1:
            raise ValueError("a file has exactly one of file_id, file_data and file_url")
        return self

    def as_image(self, param: str) -> ImagePart:
        budget = _budget(self.detail)
        if self.file_id is not None:
            return ImagePart("", budget, param, file_id=self.file_id)
        if self.file_data is not None:
            return ImagePart(_data_url(self.file_data, self.filename, param), budget, param)
        return ImagePart(self.file_url or "", budget, param)


def _data_url(data: str, filename: str | None, param: str) -> str:
    """file_data as a data: URL: as sent, or bare base64 typed by its filename."""
    if is_data_uri(data):
        return data
    mime = mimetypes.guess_type(filename or "")[0]
    if mime is not None and not mime.startswith("image/"):
        raise InvalidRequest(
            f"The file at {param} is {mime} ({filename}): this server reads images, not documents.",
            param=param,
            code="invalid_media",
        )
    # (an unnamed file: the image decoder tells what it is from its bytes)
    return f"data:{mime or 'image/unknown'};base64,{data}"


class FileContentPart(PartModel):
    """Chat's file part, {"type": "file", "file": {"file_id" | "file_data", "filename"}}."""

    type: Literal["file"]
    file: FileRef


class InputFileContentPart(FileRef):
    """The Responses API's file part, {"type": "input_file", "file_id" | "file_data" |
    "file_url", "filename"}."""

    type: Literal["input_file"]


class FrameOptions(PixelRange):
    """Extensions (ours): wishes that can only lower the server's ceilings (60 frames, 2 fps,
    the video pixel range); see media/frames.py. nframes is qwen-vl-utils' name: read as
    max_frames (at most that many; a short video at 2 a second may have fewer)."""

    fps: float | None = Field(default=None, gt=0)
    max_frames: int | None = Field(default=None, ge=1)
    nframes: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unread_options(cls, data: Any) -> Any:
        taken = "a video takes fps, max_frames (or nframes), min_pixels, max_pixels"
        return _refused_options(data, QWEN_UTILS_VIDEO_ONLY, taken)

    def frames(self, beside: FrameOptions, param: str) -> FrameRequest:
        """These wishes, or those beside them (qwen-vl-utils' parts carry them there)."""
        least, most = self.pixels(beside, param)
        return FrameRequest(
            fps=self.fps or beside.fps,
            max_frames=self.max_frames or self.nframes or beside.max_frames or beside.nframes,
            min_pixels=least,
            max_pixels=most,
        )


class VideoURL(FrameOptions):
    url: str = Field(min_length=1)


class VideoContentPart(FrameOptions):
    """(the options may sit beside video_url too; those inside it win)"""

    type: Literal["video_url"]
    video_url: VideoURL

    @field_validator("video_url", mode="before")
    @classmethod
    def _accept_bare_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[
    TextContentPart
    | RefusalContentPart
    | ImageContentPart
    | InputImageContentPart
    | FileContentPart
    | InputFileContentPart
    | VideoContentPart,
    Field(discriminator="type"),
]


SHORT_FORM_KEYS = ("image_url", "video_url")


def _typed_by_key(part: Any) -> Any:
    if not isinstance(part, dict) or "type" in part:
        return part
    keys = [key for key in SHORT_FORM_KEYS if part.get(key) is not None]
    return {"type": keys[0], **part} if len(keys) == 1 else part


def _dashscope_video(part: Any) -> Any:
    """DashScope's video part, {"type": "video", "video": URL or [frame, ...]} (Qwen-Agent
    sends a video given as its frames so), as the video_url part it means: a list of inline
    frames becomes vLLM's frames URL, data:video/jpeg;base64,<frame>,<frame>,... (read as
    one frame a second)."""
    if not isinstance(part, dict) or part.get("type") != "video" or "video" not in part:
        return part
    video = part["video"]
    if isinstance(video, list):
        if not video:
            raise ValueError("a video's list of frames is empty")
        video = "data:video/jpeg;base64," + ",".join(map(_inline_frame, video))
    rest = {key: value for key, value in part.items() if key != "video"}
    return {**rest, "type": "video_url", "video_url": video}  # (the part's own video_url: not)


def _inline_frame(frame: Any) -> str:
    """A frame's base64 payload: frames come inline (a data: URI of an image, or naming no
    type), not as URLs to fetch one by one."""
    uri = DATA_URI.match(frame) if isinstance(frame, str) else None
    mime = ((uri and uri["mime"]) or "").lower()
    if not (
        uri
        and uri["b64"]
        and (mime in FRAME_TYPES or mime in UNDECLARED_TYPES)
        and uri["data"]
        and "," not in uri["data"]
    ):
        raise ValueError(
            "a video's frames are taken as data: URIs of JPEG, PNG or WebP images "
            "(data:image/jpeg;base64,...); send a video by its URL as a video_url part"
        )
    return uri["data"]


# JSON objects in a conversation (messages or input items, their parts and blocks, tool calls
# and results, at any depth), in all: a million empty parts held the event loop 18 s while
# they were validated and rendered; no real conversation comes near.
MAX_TURN_OBJECTS = 20_000


def _bounded_turns(value: Any) -> Any:
    """Counted before any is validated (pydantic's max_length counts after), and only as far
    as the bound: a walk that stops at its 20,001st object."""
    if not isinstance(value, list):
        return value
    count, stack = 0, [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            count += 1
            if count > MAX_TURN_OBJECTS:
                raise ValueError(
                    f"holds more than {MAX_TURN_OBJECTS:,} objects (messages, content parts, "
                    "tool calls and results): at most that many in all"
                )
            stack.extend(v for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, dict | list))
    return value


Turns = BeforeValidator(_bounded_turns)

# OpenAI message fields this server does not support: refused, never ignored.
UNSUPPORTED_MESSAGE_FIELDS = ("function_call", "audio")


def _call_arguments(value: str) -> str:
    """A call's arguments as OpenAI takes them back: any text. A model cut short (max_tokens)
    leaves them unfinished, and frameworks send such a call back in the history as it was:
    refusing it stuck their agent loops for good. JSON that escapes a lone surrogate is still
    refused (valid JSON, but no text a tokenizer reads)."""
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return value  # (written into the prompt as sent)
    try:
        json.dumps(parsed, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValueError(
            "arguments hold a lone surrogate (an unpaired \\ud800-\\udfff escape)"
        ) from None
    return value


# A call's arguments, as OpenAI sends them: JSON text of an object (or what a model cut short
# wrote of it).
CallArguments = Annotated[str, AfterValidator(_call_arguments)]
# vLLM's request priority: under --scheduling-policy priority, lower values are served first
Priority = Annotated[int, Field(ge=-(2**31), lt=2**31)]


class FunctionCallParam(PartModel):
    name: str = Field(min_length=1)
    arguments: CallArguments


class ToolCallParam(PartModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessageParam(PartModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: str | None = None  # accepted as OpenAI does; Qwen's chat template has no use for it
    tool_calls: list[ToolCallParam] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages (Qwen's prompt format does not use it)
    # An earlier answer's reasoning, as the answer had it (vLLM's names): the template keeps
    # it where Qwen3's does (the turns after the last user query), else leaves it out.
    reasoning_content: str | None = None
    reasoning: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _type_short_forms(cls, value: Any) -> Any:
        """vLLM's short media parts, {"image_url": URL} and {"video_url": URL} without a
        `type`, typed by their one media key as vLLM's parser types them."""
        if not isinstance(value, list):
            return value
        return [_dashscope_video(_typed_by_key(part)) for part in value]

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for field in UNSUPPORTED_MESSAGE_FIELDS:
                if data.get(field) is not None:
                    raise ValueError(f"the message field '{field}' is not supported")
            # Qwen-Agent names the call a tool message answers `id` (its own message shape)
            if data.get("role") == "tool" and data.get("tool_call_id") is None and "id" in data:
                data = {**data, "tool_call_id": data["id"]}
        return data

    @model_validator(mode="after")
    def _check_tool_fields(self) -> ChatMessageParam:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry tool_call_id")
        # As OpenAI (and vLLM) refuse them: only an assistant's turn may go without content
        # (its tool calls are what it said). A tool message without tool_call_id answers the
        # first call still open (check_tool_turns), as vLLM takes it (Qwen's template reads
        # the answers in order).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if isinstance(self.content, list) and not self.content and self.role != "assistant":
            raise ValueError("content is an empty array: send at least one part")
        return self


TRANSLATED = "translated"  # validation context: a chat body made from another API's request


def check_tool_turns(messages: list[ChatMessageParam], continues: bool) -> None:
    """As OpenAI: tool messages answer the calls of the assistant message just before them
    (each call once, by its id), and every call is answered before the conversation goes on.
    A continued last message may still have its calls open; calls sent without ids are
    matched by nothing (vLLM's clients may leave them out), and a tool message without
    tool_call_id answers the first call still open."""
    open_calls: dict[str, None] | None = None  # the last assistant's unanswered call ids
    asked_at, by_id = 0, True
    for i, message in enumerate(messages):
        if message.role == "tool":
            if open_calls is None:
                raise InvalidRequest(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceding message with 'tool_calls'.",
                    param=f"messages[{i}].role",
                    code="invalid_value",
                )
            answered = message.tool_call_id
            if answered is None and by_id:
                answered = next(iter(open_calls), None)
                if answered is None:
                    raise InvalidRequest(
                        "Invalid parameter: a message with role 'tool' and no 'tool_call_id' "
                        "follows answers to every call of the previous message.",
                        param=f"messages[{i}]",
                        code="invalid_value",
                    )
            if by_id and answered not in open_calls:
                raise InvalidRequest(
                    f"Invalid parameter: 'tool_call_id' of '{answered}' not found "
                    "in 'tool_calls' of previous message (or answered already).",
                    param=f"messages[{i}].tool_call_id",
                    code="invalid_value",
                )
            open_calls.pop(answered or "", None)
            continue
        _check_answered(open_calls, asked_at)
        open_calls = None
        if message.role == "assistant" and message.tool_calls:
            ids = [call.id for call in message.tool_calls]
            by_id = all(ids)
            open_calls = dict.fromkeys(ids) if by_id else {}  # type: ignore[arg-type]
            asked_at = i
    if not continues:
        _check_answered(open_calls, asked_at)


def _check_answered(open_calls: dict[str, None] | None, asked_at: int) -> None:
    if open_calls:
        raise InvalidRequest(
            "An assistant message with 'tool_calls' must be followed by tool messages "
            "responding to each 'tool_call_id'. The following tool_call_ids did not have "
            f"response messages: {', '.join(open_calls)}",
            param=f"messages[{asked_at}].role",
            code="invalid_value",
        )


# OpenAI's rule for a json_schema's name (chat's response_format, the Responses text.format)
SCHEMA_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class JsonSchemaFormat(StrictModel):
    name: str = Field(default="response", pattern=SCHEMA_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def to_structured(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput("json_object")
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


# A guided regex, grammar or choice: never empty (an answer that can only be empty is
# nothing a grammar can generate), and bounded: compiling grows with the text (a few choices
# of 16k characters in all compile in under a second; 260k characters took 30 s), so one
# request cannot hold the grammar compiler for minutes.
MAX_CONSTRAINT_CHARS = 16384
MAX_CHOICES = 256
Constraint = Annotated[str, Field(min_length=1, max_length=MAX_CONSTRAINT_CHARS)]


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
    "vllm_xargs": bool,
    "kv_transfer_params": bool,  # disaggregated prefill: one server does the whole request
    "ec_transfer_params": bool,
}
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


# llama.cpp's and Ollama's options, which front-ends made for them send to every OpenAI
# connection (Open WebUI's advanced parameters: a user who set one had every chat refused).
# repeat_penalty is repetition_penalty by its llama.cpp name (the same multiplicative
# penalty: REPETITION_PENALTY_NAMES); the others ask for what this server does not do, or
# sizes itself, and change nothing (logged), as vLLM takes any unknown field. Other unknown
# fields are still 400s.
REPETITION_PENALTY_NAMES = AliasChoices("repetition_penalty", "repeat_penalty")
LLAMA_CPP_IGNORED = frozenset(
    {
        "mirostat",
        "mirostat_eta",
        "mirostat_tau",
        "tfs_z",
        "typical_p",
        "repeat_last_n",
        "penalize_newline",
        "num_ctx",
        "num_predict",
        "num_keep",
        "num_batch",
        "num_gpu",
        "num_thread",
        "use_mmap",
        "use_mlock",
        "keep_alive",
        "think",
        "format",
    }
)


def llama_cpp_options(data: Any) -> Any:
    """A request body without llama.cpp's and Ollama's options that change nothing here
    (LLAMA_CPP_IGNORED: logged)."""
    if not isinstance(data, dict) or not (ignored := sorted(data.keys() & LLAMA_CPP_IGNORED)):
        return data
    logger.info("llama.cpp/Ollama options with no effect here: %s", ", ".join(ignored))
    return {key: value for key, value in data.items() if key not in LLAMA_CPP_IGNORED}


GENERATE_OPTIONS = frozenset({"max_new_tokens", "min_new_tokens", "num_beams", "do_sample"})


def generate_options(data: Any) -> Any:
    """transformers generate()'s names, which evaluation harnesses forward (lm-eval sends a
    task's generation_kwargs beside its own max_tokens): max_new_tokens / min_new_tokens are
    bounds as max_tokens / min_tokens are (beside them, the tighter holds); do_sample false
    is greedy decoding (temperature 0, whatever temperature says, as generate() reads it);
    num_beams 1 is the default search (more: beam search, not done here, a 400)."""
    if not isinstance(data, dict) or not data.keys() & GENERATE_OPTIONS:
        return data
    data = dict(data)
    beams = data.pop("num_beams", None)
    if beams is not None and not (type(beams) is int and beams == 1):
        raise _generate_option("num_beams", "takes only 1: beam search is not done here")
    if (sample := data.pop("do_sample", None)) is not None:
        sample = _switch(sample, "do_sample")
    if sample is False:
        data["temperature"] = 0
    # (chat's max_completion_tokens, where given, is the limit: it wins over max_tokens)
    chat_limit = data.get("max_completion_tokens") is not None
    for name, field, tighter, least in (
        ("max_new_tokens", "max_completion_tokens" if chat_limit else "max_tokens", min, 1),
        ("min_new_tokens", "min_tokens", max, 0),
    ):
        if (value := data.pop(name, None)) is None:
            continue
        value = _bounded_int(value, name, least)
        given = data.get(field)
        if given is None:
            data[field] = value
        elif type(given) is int:
            data[field] = tighter(given, value)
    return data


def _generate_option(name: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{name} {problem}.", param=name, code="invalid_value")


# Other servers' switches for a thinking checkpoint's reasoning, which their clients send to
# any OpenAI connection: Qwen's own API (DashScope: enable_thinking, thinking_budget; Qwen
# Code and Qwen-Agent document them), OpenRouter's reasoning object (Qwen Code sends it too),
# the thinking object of Anthropic-style OpenAI endpoints, Ollama's think (Open WebUI's
# "Think" setting). Each is read as vLLM's own field for it; that field, sent too, wins. A
# null is no switch, as for every optional field.
REASONING_SWITCHES = frozenset(
    {"enable_thinking", "thinking_budget", "reasoning", "thinking", "think"}
)
REASONING_OBJECT_KEYS = {
    "reasoning": frozenset(
        {"effort", "max_tokens", "budget_tokens", "enabled", "exclude", "summary"}
    ),
    "thinking": frozenset({"type", "budget_tokens", "display"}),
}
# Anthropic's thinking types (its Messages API, and the thinking object on chat): thinking on
# or off
THINKING_SWITCH = {"enabled": True, "adaptive": True, "disabled": False}
OLLAMA_THINK_LEVELS = ("low", "medium", "high")


@dataclass
class AskedReasoning:
    """What the foreign switches ask for (None: nothing)."""

    enable: bool | None = None
    budget: int | None = None
    effort: str | None = None
    include: bool | None = None


def reasoning_switches(data: Any) -> Any:
    """A chat body with those switches read as chat_template_kwargs.enable_thinking,
    thinking_token_budget, reasoning_effort and include_reasoning."""
    if not isinstance(data, dict) or not data.keys() & REASONING_SWITCHES:
        return data
    data, asked = dict(data), AskedReasoning()
    for read in (_dashscope_reasoning, _ollama_think, _thinking_object, _openrouter_reasoning):
        read(data, asked)  # (each takes its own keys out of data)
    for field, value in (
        ("reasoning_effort", asked.effort),
        ("thinking_token_budget", asked.budget),
        ("include_reasoning", asked.include),
    ):
        if value is not None and data.get(field) is None:
            data[field] = value
    kwargs = data.get("chat_template_kwargs")
    if (
        asked.enable is not None
        and data.get("reasoning_effort") != "none"  # (vLLM's own "off" wins too)
        and (kwargs is None or isinstance(kwargs, dict))
        and (kwargs or {}).get("enable_thinking") is None
    ):
        data["chat_template_kwargs"] = {**(kwargs or {}), "enable_thinking": asked.enable}
    return data


def _dashscope_reasoning(data: dict[str, Any], asked: AskedReasoning) -> None:
    if (enable := data.pop("enable_thinking", None)) is not None:
        asked.enable = _switch(enable, "enable_thinking")
    if (budget := data.pop("thinking_budget", None)) is not None:
        asked.budget = _bounded_int(budget, "thinking_budget")


def _ollama_think(data: dict[str, Any], asked: AskedReasoning) -> None:
    """Ollama's think: a boolean, or a level (which thinks, at that effort)."""
    think = data.pop("think", None)
    if isinstance(think, str) and think in OLLAMA_THINK_LEVELS:
        asked.effort, think = think, True
    if think is not None:
        levels = ", ".join(OLLAMA_THINK_LEVELS)
        asked.enable = _switch(think, "think", f"a boolean or one of {levels}")


def _thinking_object(data: dict[str, Any], asked: AskedReasoning) -> None:
    """{type, budget_tokens, display} as /v1/messages reads them (display changes nothing)."""
    if (thinking := _reasoning_object(data, "thinking")) is None:
        return
    if (kind := thinking.get("type")) is not None:
        if not isinstance(kind, str) or kind not in THINKING_SWITCH:
            raise _generate_option("thinking.type", "takes enabled, adaptive or disabled")
        asked.enable = THINKING_SWITCH[kind]
    if (budget := thinking.get("budget_tokens")) is not None:
        asked.budget = _bounded_int(budget, "thinking.budget_tokens", least=1)


def _openrouter_reasoning(data: dict[str, Any], asked: AskedReasoning) -> None:
    """{effort, max_tokens (or budget_tokens), enabled, exclude, summary} (summary changes
    nothing)."""
    if (reasoning := _reasoning_object(data, "reasoning")) is None:
        return
    if (effort := reasoning.get("effort")) is not None:
        if not isinstance(effort, str) or effort not in get_args(ReasoningEffort):
            levels = ", ".join(get_args(ReasoningEffort))
            raise _generate_option("reasoning.effort", f"takes one of {levels}")
        asked.effort = effort
    for name in ("max_tokens", "budget_tokens"):
        if (budget := reasoning.get(name)) is not None:
            asked.budget = _bounded_int(budget, f"reasoning.{name}")
    if (enabled := reasoning.get("enabled")) is not None:
        asked.enable = _switch(enabled, "reasoning.enabled")
    if (exclude := reasoning.get("exclude")) is not None:
        asked.include = not _switch(exclude, "reasoning.exclude")


def dashscope_options(data: Any) -> Any:
    """DashScope's incremental_output: streamed chunks here are always increments (true
    changes nothing; false, each chunk the whole text so far, is not done: a 400)."""
    if not isinstance(data, dict) or "incremental_output" not in data:
        return data
    data = dict(data)
    if (value := data.pop("incremental_output")) is not None and value is not True:
        raise _generate_option(
            "incremental_output", "takes only true (each streamed chunk is what is new)"
        )
    return data


def _reasoning_object(data: dict[str, Any], name: str) -> dict[str, Any] | None:
    if (value := data.pop(name, None)) is None:
        return None
    if not isinstance(value, dict):
        raise _generate_option(name, "must be an object")
    if unknown := sorted(str(key) for key in value.keys() - REASONING_OBJECT_KEYS[name]):
        keys = ", ".join(sorted(REASONING_OBJECT_KEYS[name]))
        raise InvalidRequest(
            f"Unrecognized key {name}.{unknown[0]}: {name} takes {keys}.",
            param=f"{name}.{unknown[0]}",
            code="unknown_parameter",
        )
    return value


def _switch(value: Any, name: str, kinds: str = "a boolean") -> bool:
    if not isinstance(value, bool):
        raise _generate_option(name, f"must be {kinds}")
    return value


def _bounded_int(value: Any, name: str, least: int = 0) -> int:
    if type(value) is not int or not least <= value < 2**31:
        raise _generate_option(name, f"must be an integer from {least} to 2**31 - 1")
    return value


class VllmFields(StrictModel):
    """vLLM's request fields beyond OpenAI's, shared by chat and text completions."""

    @model_validator(mode="before")
    @classmethod
    def _foreign_options(cls, data: Any) -> Any:
        return generate_options(llama_cpp_options(data))

    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: disabled
    stop_token_ids: list[TokenId] | None = None
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
    vllm_xargs: dict[str, Any] | None = None
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
        return [f for f in VLLM_IGNORED_FIELDS if getattr(self, f) is not None]

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
        return dashscope_options(reasoning_switches(data))

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
    return [FrameCaptionOut(timestamp=f.timestamp, caption=f.caption) for f in frames]


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
    def from_job(cls, job: Job, webhooks: list[dict[str, Any]] | None = None) -> MediaJob:
        return cls.model_validate({**job.as_dict(), "webhooks": webhooks or []})


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
