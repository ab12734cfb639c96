"""Server-sent events for streamed chat completions, in the chunk format the OpenAI SDK reads:
a role chunk per choice, content (or tool-call) chunks, a chunk with each choice's
finish_reason, an optional usage chunk (empty choices), then `data: [DONE]`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Protocol

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.protocol import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChoiceLogprobs,
    CompletionTokensDetails,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ErrorInfo,
    ErrorResponse,
    FrameCaptionOut,
    ImageSize,
    Usage,
    frames_out,
    image_sizes_out,
)
from server.engine.sequence import Sequence, SequenceOutput
from server.exceptions import ServerError
from server.pipelines.chat import ChatRequest, ChatRun
from server.pipelines.choices import prepended
from server.pipelines.logprobs import TokenTexts
from server.pipelines.reasoning import Reasoning, ReasoningStream, answer_start
from server.pipelines.tools import CallStream, Event, ToolCallDelta, Tools, call_stream

logger = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"
# No caching, and no buffering by a proxy in front (nginx reads X-Accel-Buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The OpenAPI document's 200 of a route that may stream (stream: true)
SSE_RESPONSE = {"content": {"text/event-stream": {"schema": {"type": "string"}}}}


class EventStream(StreamingResponse):
    """A stream of server-sent events whose events' generator is closed as the response
    ends, however it ends. Starlette cancels the sending task when the client goes away and
    leaves the generator where it was: one that had just yielded an event (its task then in
    `send`) waited at that `yield` for the garbage collector, its `finally` (abort the
    sequence, record the response as cancelled, release a conversation's lock) not run for
    minutes under load: a stored response stayed `in_progress`."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.events, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):  # (the task may be being cancelled)
                    try:
                        await close()
                    except Exception:
                        logger.exception("a stream's events could not be closed")


def wire_json(data: object, *, ensure_ascii: bool = True) -> str:
    """JSON as the hosted APIs stream and answer it: no spaces after separators."""
    return json.dumps(data, ensure_ascii=ensure_ascii, separators=(",", ":"))


def named_event(kind: str, data: dict[str, Any]) -> str:
    """A server-sent event with its type named (the Responses and Messages APIs' streams)."""
    return f"event: {kind}\ndata: {wire_json(data, ensure_ascii=False)}\n\n"


def error_event(exc: ServerError) -> str:
    """An error after the 200 went out: OpenAI's envelope as the stream's last event."""
    info = ErrorInfo(message=exc.message, type=exc.error_type, param=exc.param, code=exc.code)
    error = ErrorResponse(error=info)
    return f"data: {error.model_dump_json()}\n\n"


class FirstChunk(NamedTuple):
    """The extensions a chat stream's first chunk carries (ChatCompletionChunk's fields)."""

    frames: list[FrameCaptionOut] | None  # captions mode's
    prompt_token_ids: list[int] | None  # return_token_ids
    image_sizes: list[ImageSize] | None  # return_image_sizes


class ChatChunkWriter:
    """Formats one stream's events. Content chunks are the hot path (one per stream per engine
    step), so they are built from a precomputed prefix rather than through pydantic; the rest
    go through the protocol models."""

    def __init__(
        self,
        completion_id: str,
        model: str,
        running_usage: Callable[[int], Usage] | None = None,
    ):
        self.completion_id = completion_id
        self.model = model
        # vLLM's continuous_usage_stats: every chunk carries the usage so far of its choice.
        self.running_usage = running_usage
        self.created = int(time.time())
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
        }
        self._content_suffix = (
            '},"logprobs":null,"finish_reason":null}],' + wire_json(head)[1:] + "\n\n"
        )

    def content(self, text: str, index: int = 0) -> str:
        if self.running_usage is not None:
            return self._event(
                [ChatCompletionChunkChoice(index=index, delta=DeltaMessage(content=text))]
            )
        prefix = 'data: {"choices":[{"index":' + str(index) + ',"delta":{"content":'
        return prefix + wire_json(text) + self._content_suffix

    def role(
        self, index: int = 0, first: FirstChunk | None = None, content: str | None = ""
    ) -> str:
        """The role chunk; content None (left out) where the answer is a tool call. first:
        the extensions the first chunk carries."""
        delta = DeltaMessage(role="assistant", content=content)
        usage = None
        if self.running_usage is not None:  # nothing generated yet, as vLLM counts it
            so_far = self.running_usage(index)
            nothing = {
                "completion_tokens": 0,
                "completion_tokens_details": CompletionTokensDetails(text_tokens=0),
            }
            usage = so_far.model_copy(update={**nothing, "total_tokens": so_far.prompt_tokens})
        choice = ChatCompletionChunkChoice(index=index, delta=delta)
        return self._event([choice], usage, first)

    def delta(
        self,
        index: int,
        event: Event | Reasoning,
        logprobs: ChoiceLogprobs | None,
        token_ids: list[int] | None = None,
    ) -> str:
        """A content, reasoning or tool-call piece of choice `index` (with the logprobs and
        token ids of the tokens since the last piece, where asked for)."""
        if isinstance(event, str):
            if logprobs is None and token_ids is None:
                return self.content(event, index)
            delta = DeltaMessage(content=event)
        elif isinstance(event, Reasoning):
            delta = DeltaMessage(reasoning=event.text, reasoning_content=event.text)
        else:
            delta = DeltaMessage(tool_calls=[_tool_call_delta(event)])
        choice = ChatCompletionChunkChoice(
            index=index, delta=delta, logprobs=logprobs, token_ids=token_ids
        )
        return self._event([choice])

    def finish(
        self,
        index: int,
        output: SequenceOutput,
        finish_reason: str | None,
        logprobs: ChoiceLogprobs | None = None,
        token_ids: list[int] | None = None,
    ) -> str:
        choice = ChatCompletionChunkChoice(
            index=index,
            delta=DeltaMessage(),
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=output.stop_reason,
            token_ids=token_ids,
        )
        return self._event([choice])

    def usage(self, usage: Usage) -> str:
        return self._event([], usage)

    def _event(
        self,
        choices: list[ChatCompletionChunkChoice],
        usage: Usage | None = None,
        first: FirstChunk | None = None,
    ) -> str:
        if usage is None and self.running_usage is not None:
            usage = self.running_usage(choices[0].index if choices else 0)
        chunk = ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            **(first._asdict() if first is not None else {}),
        ).model_dump(mode="json")
        # As OpenAI streams: every choice carries logprobs and finish_reason (null until the
        # end), a delta only what it says (a tool call's later pieces: index and arguments),
        # and usage only in the usage chunk.
        for choice, model in zip(chunk["choices"], choices, strict=True):
            choice["delta"] = model.delta.model_dump(mode="json", exclude_none=True)
        if usage is None:
            del chunk["usage"]
        if chunk["frames"] is None:
            del chunk["frames"]
        return f"data: {wire_json(chunk)}\n\n"


def _tool_call_delta(event: ToolCallDelta) -> DeltaToolCall:
    return DeltaToolCall(
        index=event.index,
        id=event.id,
        type="function" if event.id else None,
        function=DeltaFunctionCall(name=event.name, arguments=event.arguments),
    )


def answer_pieces(
    output: SequenceOutput, reasoning: ReasoningStream | None, calls: CallStream | None
) -> list[Event | Reasoning]:
    """A streamed output's text as the pieces a client is sent: reasoning (thinking
    checkpoints), content text, and pieces of tool calls (when tools play a part)."""
    pieces: list[Event | Reasoning] = []
    text = output.text_delta
    if reasoning is not None:
        thought, text = reasoning.feed(text)
        thought += reasoning.finish() if output.finished else ""
        pieces += [Reasoning(thought)] if thought else []
    if calls is None:
        pieces += [text] if text else []
    else:
        pieces += calls.feed(text)
        pieces += calls.finish() if output.finished else []
    return pieces


@dataclass
class ChoiceStream:
    """One choice's progress through the stream."""

    index: int
    seq: Sequence
    calls: CallStream | None  # tools: the text becomes content and tool calls
    reasoning: ReasoningStream | None = None  # thinking checkpoints: reasoning, then content
    include_reasoning: bool = True  # false: the reasoning is read past, not sent
    with_token_ids: bool = False  # vLLM's return_token_ids
    num_tokens_sent: int = 0  # tokens whose logprobs and ids went out
    has_called: bool = False
    tools: Tools | None = None  # how a call ends the answer (its finish_reason)
    hidden_through: int | None = None  # reasoning left out: "</think>", its tokens' last
    # tools the model may call or not: the role chunk waits for the answer's first piece, to
    # leave content out before a call or reasoning (null, as OpenAI's stream has it: an SDK
    # accumulating "" kept it beside the call), "" before text
    role_chunk: Callable[[str | None], str] | None = None

    def events(
        self, output: SequenceOutput, writer: ChatChunkWriter, texts: TokenTexts
    ) -> list[str]:
        pieces = answer_pieces(output, self.reasoning, self.calls)
        if not self.include_reasoning:
            pieces = [piece for piece in pieces if not isinstance(piece, Reasoning)]
        if not pieces and not output.finished:
            return []  # the tokens' logprobs and ids go with the next piece of text
        start, end = self.num_tokens_sent, output.num_completion_tokens
        scored = start  # (reasoning left out: its tokens' logprobs and ids too)
        if self.hidden_through is not None:
            ids = self.seq.output_token_ids[:end]
            scored = max(start, answer_start(ids, self.hidden_through))
        self.num_tokens_sent = end
        logprobs = self._logprobs(scored, end, texts)
        token_ids = self.seq.output_token_ids[scored:end] if self.with_token_ids else None
        chunks = []
        if self.role_chunk is not None:  # content "" before text (or nothing), else left out
            text_first = not pieces or isinstance(pieces[0], str)
            chunks.append(self.role_chunk("" if text_first else None))
            self.role_chunk = None
        for piece in pieces:
            self.has_called |= isinstance(piece, ToolCallDelta)
            chunks.append(writer.delta(self.index, piece, logprobs, token_ids))
            logprobs = token_ids = None
        if output.finished:
            reason = output.finish_reason or "stop"
            if self.tools is not None:
                reason = self.tools.finish_reason(reason, self.has_called)
            chunks.append(writer.finish(self.index, output, reason, logprobs, token_ids))
        return chunks

    def _logprobs(self, start: int, end: int, texts: TokenTexts) -> ChoiceLogprobs | None:
        if self.seq.sampling.logprobs is None:
            return None
        return ChoiceLogprobs.of(texts.logprobs(self.seq, start, end))


async def chat_stream(
    run: ChatRun,
    first: tuple[int, SequenceOutput],
    rest: AsyncIterator[tuple[int, SequenceOutput]],
    model: str,
    usage: tuple[bool, bool],
    texts: TokenTexts,
    request: ChatRequest,
) -> AsyncIterator[str]:
    """first and rest: (choice index, output) of every choice, as they come. usage: (a final
    usage chunk, the usage so far on every chunk)."""
    include_usage, continuous = usage
    reasoning = run.seq.inputs.thinks
    hidden = run.think_close_id if reasoning and not request.include_reasoning else None
    choices = [
        ChoiceStream(
            i,
            seq,
            call_stream(request.tools),
            ReasoningStream() if reasoning else None,
            request.include_reasoning,
            request.return_token_ids,
            tools=request.tools,
            hidden_through=hidden,
        )
        for i, seq in enumerate(run.seqs)
    ]

    def running(choice: int) -> Usage:  # (what the stream has sent of the choice)
        return Usage.of(*run.usage(choice, choices[choice].num_tokens_sent))

    writer = ChatChunkWriter(run.seq.request_id, model, running if continuous else None)
    forced = request.tools is not None and request.tools.is_forced
    content = None if forced else ""
    opening: list[FirstChunk | None] = [  # (on the first chunk sent)
        FirstChunk(
            frames_out(run.frames),
            run.seq.inputs.token_ids if request.return_token_ids else None,
            image_sizes_out(run.seq.inputs.image_sizes if request.return_image_sizes else None),
        )
    ]

    def role(index: int, content: str | None) -> str:
        extensions, opening[0] = opening[0], None
        return writer.role(index, extensions, content)

    for choice in choices:
        if choice.calls is not None and not forced:
            choice.role_chunk = partial(role, choice.index)  # (sent with its first piece)
        else:
            yield role(choice.index, content)
    try:
        async for index, output in prepended(first, rest):
            for chunk in choices[index].events(output, writer, texts):
                yield chunk
    except ServerError as exc:
        request.name_error(exc)
        yield error_event(exc)
    else:
        if include_usage:
            yield writer.usage(Usage.of(*run.usage()))
    yield DONE


class EventWriter(Protocol):
    """A streamed answer as another API's events (/v1/responses, /v1/messages)."""

    def begin(self) -> list[str]: ...

    def feed(self, output: SequenceOutput) -> list[str]: ...

    def end(self, output: SequenceOutput, run: ChatRun) -> list[str]: ...

    def failed(self, error: ServerError | None, run: ChatRun) -> list[str]: ...


async def event_stream(
    events: EventWriter,
    run: ChatRun,
    first: SequenceOutput,
    rest: AsyncIterator[SequenceOutput],
    name_error: Callable[[ServerError], None] | None = None,
) -> AsyncIterator[str]:
    """The writer's events for a run's outputs; an error after the status line went out is
    the writer's failure events (None: an unexpected one, logged here), named as the
    writer's body names things (name_error)."""
    for event in events.begin():
        yield event
    output = first
    error: ServerError | None
    try:
        for event in events.feed(first):
            yield event
        async for output in rest:
            for event in events.feed(output):
                yield event
    except ServerError as exc:
        error = exc
        if name_error is not None:
            name_error(exc)
    except Exception:
        logger.exception("the event stream failed")
        error = None
    else:
        for event in events.end(output, run):
            yield event
        return
    for event in events.failed(error, run):
        yield event
