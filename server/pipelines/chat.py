"""Chat completions: fetch and size the images, build the prompt, run it through the engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from server.config import MediaLimits
from server.engine.engine import RETRY_AFTER_S, AsyncEngine
from server.engine.inputs import InputBuilder
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence, SequenceOutput
from server.exceptions import EngineOverloaded, InvalidRequest, MediaError, ServerError
from server.media.fetch import MediaFetcher
from server.media.image import Detail, load_image
from server.metrics import Metrics


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    url: str
    detail: Detail
    param: str  # where the part sits in the request, for error messages


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str | list[TextPart | ImagePart]


@dataclass(frozen=True)
class ChatRequest:
    request_id: str
    messages: list[ChatMessage]
    sampling: SamplingParams
    received_time: float = field(default_factory=time.monotonic)


@dataclass
class ChatResult:
    text: str
    finish_reason: str
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_image_tokens: int
    num_completion_tokens: int


class GenerationFailed(ServerError):
    def __init__(self) -> None:
        super().__init__("The model failed while generating; see the server log.")


def raise_for_finish(output: SequenceOutput) -> None:
    if output.finish_reason == "error":
        raise GenerationFailed()
    if output.finish_reason == "queue_timeout":
        raise EngineOverloaded(
            "The request waited too long for a free slot; retry shortly.",
            retry_after_s=RETRY_AFTER_S,
            code="queue_timeout",
        )


class ChatPipeline:
    def __init__(
        self,
        engine: AsyncEngine,
        input_builder: InputBuilder,
        fetcher: MediaFetcher,
        limits: MediaLimits,
        model_max_pixels: int,
        max_concurrent_preprocessing: int,
        metrics: Metrics,
    ):
        self.engine = engine
        self.metrics = metrics
        # Fetching and decoding are bounded per request (caps, timeouts) and here in number, so
        # a burst cannot spend the CPU preparing requests the queue will then refuse.
        self.preprocessing = asyncio.Semaphore(max_concurrent_preprocessing)
        self.input_builder = input_builder
        self.fetcher = fetcher
        self.limits = limits
        self.model_max_pixels = model_max_pixels

    async def start(self, request: ChatRequest) -> Sequence:
        """Everything that can fail because of the request happens here, before any output."""
        self.engine.check_capacity()  # refuse early, before spending work on the request
        async with self.preprocessing:
            images = await self._load_images(request.messages)
            hf_messages = [_to_hf_message(m) for m in request.messages]
            inputs = await asyncio.to_thread(self.input_builder.build, hf_messages, images)
        seq = self.engine.add_request(request.request_id, inputs, request.sampling)
        seq.received_time = request.received_time
        return seq

    async def outputs(self, seq: Sequence) -> AsyncIterator[SequenceOutput]:
        first = True
        async for output in self.engine.stream(seq):
            if output.finished:
                self._record_finished(seq, output)
            raise_for_finish(output)
            if first and seq.num_completion_tokens:
                self.metrics.time_to_first_token.observe(time.monotonic() - seq.received_time)
                first = False
            yield output

    def _record_finished(self, seq: Sequence, output: SequenceOutput) -> None:
        self.metrics.finished.labels(output.finish_reason or "unknown").inc()
        self.metrics.prompt_tokens.inc(seq.inputs.num_prompt_tokens)
        self.metrics.image_tokens.inc(seq.inputs.num_image_tokens)
        self.metrics.generated_tokens.inc(seq.num_completion_tokens)

    async def complete(self, request: ChatRequest) -> ChatResult:
        seq = await self.start(request)
        pieces = [output.text_delta async for output in self.outputs(seq)]
        return ChatResult(
            text="".join(pieces),
            finish_reason=seq.finish_reason or "stop",
            stop_reason=seq.stop_reason,
            num_prompt_tokens=seq.inputs.num_prompt_tokens,
            num_image_tokens=seq.inputs.num_image_tokens,
            num_completion_tokens=seq.num_completion_tokens,
        )

    async def _load_images(self, messages: list[ChatMessage]) -> list[Image.Image]:
        parts = [
            part
            for message in messages
            if not isinstance(message.content, str)
            for part in message.content
            if isinstance(part, ImagePart)
        ]
        if len(parts) > self.limits.max_images_per_request:
            raise InvalidRequest(
                f"{len(parts)} images in one request; the limit is "
                f"{self.limits.max_images_per_request}.",
                param="messages",
                code="too_many_images",
            )
        budget = MediaBudget(self.limits.max_media_bytes_per_request)
        # Fetch concurrently; decode and resize in threads (Pillow releases the GIL).
        return list(await asyncio.gather(*(self._load_image(p, budget) for p in parts)))

    async def _load_image(self, part: ImagePart, budget: MediaBudget) -> Image.Image:
        fetched = await self.fetcher.fetch(
            part.url, max_bytes=self.limits.max_image_bytes, kind="image", param=part.param
        )
        budget.spend(len(fetched.data), part.param)
        image = await asyncio.to_thread(
            load_image, fetched.data, part.detail, self.model_max_pixels, param=part.param
        )
        self.metrics.images.inc()
        return image


class MediaBudget:
    """All media of one request together may not exceed max_bytes (each item has its own cap
    too): many medium images must not add up to an unbounded request."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.spent = 0

    def spend(self, num_bytes: int, param: str) -> None:
        self.spent += num_bytes
        if self.spent > self.max_bytes:
            raise MediaError(
                f"The request's media add up to more than the server's limit of "
                f"{self.max_bytes} bytes (reached at {param}).",
                param=param,
                code="media_budget_exceeded",
            )


def _to_hf_message(message: ChatMessage) -> dict[str, Any]:
    """Our message -> the chat template's format; images become {"type": "image"} markers."""
    if isinstance(message.content, str):
        return {"role": message.role, "content": message.content}
    content = [
        {"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"}
        for part in message.content
    ]
    return {"role": message.role, "content": content}
