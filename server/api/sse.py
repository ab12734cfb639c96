"""Server-sent events for streamed chat completions, in the chunk format the OpenAI SDK reads:
a role chunk, content chunks, a chunk with finish_reason, an optional usage chunk (empty
choices), then `data: [DONE]`."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from server.api.protocol import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    FrameCaptionOut,
    Usage,
    frames_out,
)
from server.engine.sequence import SequenceOutput
from server.exceptions import ServerError
from server.pipelines.chat import ChatRun

DONE = "data: [DONE]\n\n"
# No caching, and no buffering by a proxy in front (nginx reads X-Accel-Buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_event(exc: ServerError) -> str:
    """An error after the 200 went out: OpenAI's envelope as the stream's last event."""
    error = ErrorResponse(error=ErrorInfo(message=exc.message, type=exc.error_type, code=exc.code))
    return f"data: {error.model_dump_json()}\n\n"


class ChatChunkWriter:
    """Formats one stream's events. Content chunks are the hot path (one per stream per engine
    step), so they are built from a precomputed prefix rather than through pydantic; the rest
    go through the protocol models."""

    def __init__(self, completion_id: str, model: str):
        self.completion_id = completion_id
        self.model = model
        self.created = int(time.time())
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
        }
        self._content_prefix = 'data: {"choices":[{"index":0,"delta":{"content":'
        self._content_suffix = (
            '},"logprobs":null,"finish_reason":null}],' + json.dumps(head)[1:] + "\n\n"
        )

    def content(self, text: str) -> str:
        return self._content_prefix + json.dumps(text) + self._content_suffix

    def role(self, frames: list[FrameCaptionOut] | None = None) -> str:
        return self._event(
            [ChatCompletionChunkChoice(delta=DeltaMessage(role="assistant", content=""))],
            frames=frames,
        )

    def finish(self, output: SequenceOutput) -> str:
        choice = ChatCompletionChunkChoice(
            delta=DeltaMessage(), finish_reason=output.finish_reason, stop_reason=output.stop_reason
        )
        return self._event([choice])

    def usage(self, usage: Usage) -> str:
        return self._event([], usage)

    def _event(
        self,
        choices: list[ChatCompletionChunkChoice],
        usage: Usage | None = None,
        frames: list[FrameCaptionOut] | None = None,
    ) -> str:
        chunk = ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            frames=frames,
        ).model_dump(mode="json")
        # As OpenAI streams: every choice carries logprobs and finish_reason (null until the
        # end), a delta only what it says, and usage only in the usage chunk.
        for choice in chunk["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if usage is None:
            del chunk["usage"]
        if frames is None:
            del chunk["frames"]
        return f"data: {json.dumps(chunk)}\n\n"


async def chat_stream(
    run: ChatRun,
    first: SequenceOutput,
    rest: AsyncIterator[SequenceOutput],
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    writer = ChatChunkWriter(run.seq.request_id, model)
    yield writer.role(frames_out(run.frames))
    try:
        async for output in _prepend(first, rest):
            if output.text_delta:
                yield writer.content(output.text_delta)
            if output.finished:
                yield writer.finish(output)
    except ServerError as exc:
        yield error_event(exc)
    else:
        if include_usage:
            yield writer.usage(Usage.of(*run.usage()))
    yield DONE


async def _prepend(
    first: SequenceOutput, rest: AsyncIterator[SequenceOutput]
) -> AsyncIterator[SequenceOutput]:
    yield first
    if not first.finished:
        async for output in rest:
            yield output
