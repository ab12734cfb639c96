"""The internal form of a chat request's messages (the API layer converts its wire models)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from server.media.fetch import FetchedMedia
from server.media.frames import FrameRequest
from server.media.image import Detail


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    url: str  # "" when the image is an uploaded file
    detail: Detail
    param: str  # where the part sits in the request, for error messages
    file_id: str | None = None  # an uploaded file's (POST /v1/files)
    # vLLM's mm_processor_kwargs: the pixel range to resize into (within the server's)
    min_pixels: int | None = None
    max_pixels: int | None = None
    # The Animus contract sends videos as image_url parts too: its bytes decide (MediaLoader.
    # judged), which downloads it once, here to be read. Set: the frames it is read with if
    # it is a video (the request's fps / num_frames / pixel wishes).
    or_video: FrameRequest | None = None
    fetched: FetchedMedia | None = field(default=None, compare=False)


@dataclass(frozen=True)
class VideoPart:
    url: str
    frames: FrameRequest  # the request's fps / max_frames / pixel wishes (mode set later)
    param: str
    # Judged a video for not being an image (an Animus image_url part): its error names both.
    or_image: bool = False
    fetched: FetchedMedia | None = field(default=None, compare=False)  # (downloaded already)


Part = TextPart | ImagePart | VideoPart


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made (in the history) or makes (in an answer)."""

    id: str
    name: str
    arguments: str  # JSON text of the arguments object


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant | tool
    content: str | list[Part]
    tool_calls: tuple[ToolCall, ...] = ()  # assistant messages only
    # An assistant turn's reasoning, given to the template: Qwen3's thinking one keeps it for
    # the turns after the last user query (a tool-call loop's steps), drops it before.
    reasoning: str | None = None


def with_parts(messages: list[ChatMessage], change: Callable[[Part], Part]) -> list[ChatMessage]:
    """The messages with change(part) in place of each content part."""
    return [
        message
        if isinstance(message.content, str)
        else replace(message, content=[change(part) for part in message.content])
        for message in messages
    ]


def prompt_text(messages: list[ChatMessage]) -> str:
    """The messages' text, joined (the prompt the template makes holds all of it)."""
    return "".join(
        m.content
        if isinstance(m.content, str)
        else "".join(p.text for p in m.content if isinstance(p, TextPart))
        for m in messages
    )


def parts_of(messages: list[ChatMessage], kind: type) -> list[Any]:
    return [
        part
        for message in messages
        if not isinstance(message.content, str)
        for part in message.content
        if isinstance(part, kind)
    ]


def to_hf_message(message: ChatMessage) -> dict[str, Any]:
    """Our message -> the chat template's format; media become {"type": "image"|"video"}."""
    extra = {"reasoning_content": message.reasoning} if message.reasoning else {}
    if isinstance(message.content, str):
        return {"role": message.role, "content": message.content, **extra}
    content: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, TextPart):
            content.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            content.append({"type": "image"})
        else:
            content.append({"type": "video"})
    return {"role": message.role, "content": content, **extra}
