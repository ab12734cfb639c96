"""POST /v1/completions: text prompts (a string, several, or token ids), streaming or not."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    check_stream_options,
)
from server.api.routes.chat import RESPONSES, until_disconnected
from server.api.services import Services, get_services
from server.api.sse import DONE, SSE_HEADERS, error_event
from server.engine.sequence import Sequence, SequenceOutput
from server.exceptions import ServerError, refuse_unsupported

router = APIRouter(responses=RESPONSES)


@router.post("/v1/completions", response_model=CompletionResponse, tags=["completions"])
async def completions(
    body: CompletionRequest, request: Request, services: Services = Depends(get_services)
) -> CompletionResponse | StreamingResponse:
    services.check_model(body.model)
    refuse_unsupported(body.unsupported_fields())
    check_stream_options(body)
    response_id = f"cmpl-{uuid.uuid4().hex}"
    start = services.completions.start(response_id, body.prompts(), body.to_sampling_params())
    seqs = await until_disconnected(request, start)
    if not body.stream:
        texts = await until_disconnected(
            request, asyncio.gather(*(services.completions.text(s) for s in seqs))
        )
        choices = [
            CompletionChoice(
                index=i, text=t, finish_reason=s.finish_reason, stop_reason=s.stop_reason
            )
            for i, (s, t) in enumerate(zip(seqs, texts, strict=True))
        ]
        return CompletionResponse(
            id=response_id,
            created=int(time.time()),
            model=body.model,
            choices=choices,
            usage=usage_of(seqs),
        )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = merged([services.completions.outputs(s) for s in seqs])
    return StreamingResponse(
        stream(response_id, body.model, seqs, events, include_usage),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


def usage_of(seqs: list[Sequence]) -> Usage:
    prompt = sum(s.inputs.num_prompt_tokens for s in seqs)
    completion = sum(s.num_completion_tokens for s in seqs)
    return Usage.of(prompt, 0, 0, completion, sum(s.num_cached_tokens for s in seqs))


async def merged(
    streams: list[AsyncIterator[SequenceOutput]],
) -> AsyncIterator[tuple[int, SequenceOutput]]:
    """(prompt index, output) from every stream as they come; the first error ends all."""
    queue: asyncio.Queue[tuple[int, SequenceOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, outputs: AsyncIterator[SequenceOutput]) -> None:
        try:
            async for output in outputs:
                queue.put_nowait((index, output))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def stream(
    response_id: str,
    model: str,
    seqs: list[Sequence],
    events: AsyncIterator[tuple[int, SequenceOutput]],
    include_usage: bool,
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[dict], usage: Usage | None = None) -> str:
        body = {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage.model_dump()
        return f"data: {json.dumps(body)}\n\n"

    try:
        async for index, output in events:
            if output.text_delta or output.finished:
                choice = {
                    "index": index,
                    "text": output.text_delta,
                    "logprobs": None,
                    "finish_reason": output.finish_reason if output.finished else None,
                    "stop_reason": output.stop_reason if output.finished else None,
                }
                yield chunk([choice])
    except ServerError as exc:
        yield error_event(exc)
    else:
        if include_usage:
            yield chunk([], usage_of(seqs))
    yield DONE
