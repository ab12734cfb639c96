"""A conversation on the wire: chat messages and their content parts (text, images, videos,
files; OpenAI's, vLLM's, DashScope's and qwen-vl-utils' forms), tool calls and their
results, and the checks that the turns answer each other.
"""

from __future__ import annotations

import json
import mimetypes
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from server.api.fields import PartModel, Text
from server.exceptions import InvalidRequest
from server.media.fetch import (
    DATA_URI,
    MAX_FRAMES_FPS,
    MIN_FRAMES_FPS,
    UNDECLARED_TYPES,
    is_data_uri,
)
from server.media.frames import FrameRequest
from server.media.image_frames import FRAME_TYPES
from server.pipelines.messages import ImagePart


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
    *("video_start", "video_end", "min_frames", "sample_fps"),
)


def _refused_options(data: Any, names: tuple[str, ...], taken: str) -> Any:
    if isinstance(data, dict) and (given := [name for name in names if name in data]):
        raise ValueError(f"{given[0]} (qwen-vl-utils' option) is not taken here; {taken}")
    return data


def _null_is_auto(value: Any) -> Any:
    return "auto" if value is None else value


DetailLevel = Literal["auto", "low", "high", "original"]
# An image's detail; null is the default, auto (async-openai to 0.33 writes an unset one so)
Detail = Annotated[DetailLevel, BeforeValidator(_null_is_auto)]


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
    detail: Detail = "auto"

    def budget(self) -> Literal["auto", "low", "high"]:
        return _budget(self.detail)


def _budget(detail: DetailLevel) -> Literal["auto", "low", "high"]:
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
    detail: Detail = "auto"

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
    detail: Detail = "auto"  # (the Responses API's)

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
    the video pixel range); see media/frames.py. nframes (qwen-vl-utils' name) and num_frames
    (vLLM's, in media_io_kwargs) are read as max_frames, the least where several are given (at
    most that many; a short video at 2 a second may have fewer); total_pixels
    is qwen-vl-utils' too: the frames' pixels together, a ceiling on each frame's."""

    fps: float | None = Field(default=None, gt=0)
    max_frames: int | None = Field(default=None, ge=1)
    nframes: int | None = Field(default=None, ge=1)
    num_frames: int | None = Field(default=None, ge=1)
    total_pixels: int | None = Field(default=None, ge=1)

    @property
    def most_frames(self) -> int | None:
        """max_frames and its other names: the least of those given (wishes only lower)."""
        given = [v for v in (self.max_frames, self.nframes, self.num_frames) if v is not None]
        return min(given, default=None)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unread_options(cls, data: Any) -> Any:
        taken = (
            "a video takes fps, max_frames (or nframes, num_frames), min_pixels, max_pixels, "
            "total_pixels"
        )
        return _refused_options(data, QWEN_UTILS_VIDEO_ONLY, taken)

    def frames(self, beside: FrameOptions, param: str) -> FrameRequest:
        """These wishes, or those beside them (qwen-vl-utils' parts carry them there)."""
        least, most = self.pixels(beside, param)
        return FrameRequest(
            fps=self.fps or beside.fps,
            max_frames=self.most_frames or beside.most_frames,
            min_pixels=least,
            max_pixels=most,
            total_pixels=self.total_pixels or beside.total_pixels,
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


# vLLM's short media forms, {"image_url": URL} and {"video_url": URL}: typed by their key
SHORT_FORM_KEYS = ("image_url", "video_url")
# DashScope's native content items (Qwen-Agent's Message.model_dump writes them so), typed by
# their key where every other key is the item's own: one with other keys (an audio, a file, a
# URL beside a text) stays a part without a type, a 400, rather than losing what they hold.
DASHSCOPE_ITEM_KEYS = {
    "text": frozenset(),
    "image": frozenset({"min_pixels", "max_pixels", "detail", *QWEN_UTILS_IMAGE_ONLY}),
    "video": frozenset(
        {"fps", "max_frames", "nframes", "num_frames", "min_pixels", "max_pixels", "total_pixels"}
        | set(QWEN_UTILS_VIDEO_ONLY)
    ),
}


def _typed_by_key(part: Any) -> Any:
    if not isinstance(part, dict) or "type" in part:
        return part
    keys = [key for key in SHORT_FORM_KEYS if part.get(key) is not None]
    if len(keys) == 1:
        return {"type": keys[0], **part}
    for key, options in DASHSCOPE_ITEM_KEYS.items():
        if part.get(key) is not None and part.keys() - {key} <= options:
            return {"type": key, **part}
    return part


def _dashscope_image(part: Any) -> Any:
    """DashScope's and qwen-vl-utils' image item, {"type": "image", "image": URL}, as the
    image_url part it means (its min_pixels / max_pixels beside it, as qwen-vl-utils'; a
    detail inside it)."""
    if not isinstance(part, dict) or part.get("type") != "image" or "image" not in part:
        return part
    rest = {key: value for key, value in part.items() if key not in ("image", "detail")}
    url = part["image"]
    if "detail" in part and isinstance(url, str):
        url = {"url": url, "detail": part["detail"]}
    return {**rest, "type": "image_url", "image_url": url}


# The rate a list of frames was taken at, unless its part says: qwen-vl-utils' and DashScope's
LIST_FPS = 2.0


def _dashscope_video(part: Any) -> Any:
    """DashScope's video part, {"type": "video", "video": URL or [frame, ...]} (Qwen-Agent
    sends a video given as its frames so), as the video_url part it means: a list of inline
    frames becomes vLLM's frames URL, data:video/jpeg;fps=<rate>;base64,<frame>,<frame>,...,
    taken at the rate the part says (_list_rate)."""
    if not isinstance(part, dict) or part.get("type") != "video" or "video" not in part:
        return part
    video = part["video"]
    rest = {key: value for key, value in part.items() if key != "video"}
    if isinstance(video, list):
        if not video:
            raise ValueError("a video's list of frames is empty")
        frames = ",".join(map(_inline_frame, video))
        video = f"data:video/jpeg;fps={_list_rate(rest):g};base64,{frames}"
    return {**rest, "type": "video_url", "video_url": video}  # (the part's own video_url: not)


def _list_rate(options: dict[str, Any]) -> float:
    """The rate a list of frames was taken at, taken out of its options: DashScope's `fps`,
    or qwen-vl-utils' `sample_fps` (its `fps` in earlier releases); LIST_FPS unless given."""
    given = {name: options.pop(name) for name in ("fps", "sample_fps") if name in options}
    given = {name: value for name, value in given.items() if value is not None}
    if len(given) > 1:
        raise ValueError("a list of frames takes fps or sample_fps (both: its rate), not both")
    fps = next(iter(given.values()), LIST_FPS)
    if type(fps) not in (int, float) or not MIN_FRAMES_FPS <= fps <= MAX_FRAMES_FPS:
        raise ValueError(
            f"a list of frames' fps (the rate they were taken at) is a number from "
            f"{MIN_FRAMES_FPS:g} to {MAX_FRAMES_FPS:g}"
        )
    return float(fps)


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
# What OpenAI's deprecated functions API's messages are here (as its `functions` field's 400
# says): a message field's replacement, and the function role's
FIELDS_INSTEAD = {"function_call": ": an assistant's calls are its tool_calls"}
FUNCTION_ROLE_INSTEAD = (
    " (the deprecated functions API's): a call's result is a tool message, role 'tool' with "
    "the call's tool_call_id"
)


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
        return [_dashscope_image(_dashscope_video(_typed_by_key(part))) for part in value]

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for field in UNSUPPORTED_MESSAGE_FIELDS:
                if data.get(field) is not None:
                    instead = FIELDS_INSTEAD.get(field, "")
                    raise ValueError(f"the message field '{field}' is not supported{instead}")
            if data.get("role") == "function":
                raise ValueError(f"the role 'function' is not supported{FUNCTION_ROLE_INSTEAD}")
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
