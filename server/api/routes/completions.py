"""POST /v1/completions: text prompts (a string, several, or token ids), streaming or not."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    check_stream_options,
    usage_wanted,
)
from server.api.routes.chat import RESPONSES, until_disconnected
from server.api.services import Services, get_services
from server.api.sse import DONE, SSE_HEADERS, error_event
from server.engine.sequence import Sequence, SequenceOutput
from server.exceptions import EngineStopped, ServerError, refuse_unsupported
from server.pipelines.choices import merged
from server.pipelines.logprobs import EchoedPrompt, TokenTexts

router = APIRouter(responses=RESPONSES)


@router.post("/v1/completions", response_model=CompletionResponse, tags=["completions"])
async def completions(
    body: CompletionRequest, request: Request, services: Services = Depends(get_services)
) -> CompletionResponse | StreamingResponse:
    services.check_model(body.model)
    refuse_unsupported(body.unsupported_fields())
    check_stream_options(body)
    n = body.num_choices(services.max_n)
    prompts = body.prompts()
    response_id = f"cmpl-{uuid.uuid4().hex}"
    pipeline = services.completions
    start = pipeline.start(
        response_id, prompts, body.to_sampling_params(services.sampling_defaults), n
    )
    seqs = await until_disconnected(request, start)
    # echo: each choice's text starts with its prompt (choice k answers prompt k // n)
    echoes = [pipeline.prompt_text(prompts[k // n]) if body.echo else "" for k in range(len(seqs))]
    # logprobs' tokens as "token_id:{id}" on request (vLLM's return_tokens_as_token_ids)
    token_texts = (
        pipeline.token_id_texts if body.return_tokens_as_token_ids else pipeline.token_texts
    )
    if not body.stream:
        texts = await until_disconnected(request, asyncio.gather(*(pipeline.text(s) for s in seqs)))
        choices = [
            _choice(k, seq, seqs[k - k % n], echoes[k], text, token_texts)
            for k, (seq, text) in enumerate(zip(seqs, texts, strict=True))
        ]
        return CompletionResponse(
            id=response_id,
            created=int(time.time()),
            model=body.model,
            choices=choices,
            usage=usage_of(seqs, n),
        )
    usage = usage_wanted(body.stream_options)
    events = merged([pipeline.outputs(s) for s in seqs])
    streams = [ChoiceStream(k, seq, seqs[k - k % n], echoes[k]) for k, seq in enumerate(seqs)]
    return StreamingResponse(
        stream(response_id, body.model, streams, events, usage, token_texts, n),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


def _choice(
    index: int, seq: Sequence, first: Sequence, echo: str, text: str, texts: TokenTexts
) -> CompletionChoice:
    """Choice `index`, the sequence `seq`; `first` is its prompt's first choice (which scored
    the prompt for all of them)."""
    logprobs = None
    if seq.sampling.logprobs is not None:
        entries = texts.logprobs(seq, 0, seq.num_completion_tokens)
        logprobs = CompletionLogprobs.of(entries, len(echo), _echoed(first, echo, texts))
    return CompletionChoice(
        index=index,
        text=echo + text,
        logprobs=logprobs,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
    )


def _echoed(seq: Sequence, echo: str, texts: TokenTexts) -> EchoedPrompt | None:
    """The prompt's tokens and logprobs when the answer echoes its prompt with logprobs (`seq`
    is the prompt's first choice: the one that scored it)."""
    if echo and seq.sampling.prompt_logprobs is not None:
        if len(seq.prompt_logprobs) < seq.inputs.num_prompt_tokens - 1:
            # Stopped before its prompt was scored (only the engine stopping does that to a
            # request someone still waits for): no half-echoed prompt.
            raise EngineStopped("The server stopped before the prompt was scored; retry.")
        return texts.prompt(seq)
    return None


def usage_of(seqs: list[Sequence], n: int) -> Usage:
    """Each prompt counted once (its n choices share it), every choice's completion."""
    firsts = seqs[::n]
    prompt = sum(s.inputs.num_prompt_tokens for s in firsts)
    completion = sum(s.num_completion_tokens for s in seqs)
    return Usage.of(prompt, 0, 0, completion, sum(s.num_cached_tokens for s in firsts))


@dataclass
class ChoiceStream:
    """One choice's progress through the stream: echo not yet sent, text and logprobs sent."""

    index: int
    seq: Sequence
    first: Sequence  # its prompt's first choice, which scored the prompt
    echo: str
    num_logprobs_sent: int = 0
    # Where the next token's text_offset is: the tokens' own texts add up, as in the whole
    # answer (a token that is part of a character counts its U+FFFD).
    next_offset: int | None = None

    def choice(self, output: SequenceOutput, texts: TokenTexts) -> dict | None:
        echoed = _echoed(self.first, self.echo, texts)  # with the first chunk only
        text, echo, self.echo = self.echo + output.text_delta, self.echo, ""
        if not text and not output.finished:
            return None  # the tokens' logprobs go with the next piece of text
        logprobs = None
        if self.seq.sampling.logprobs is not None:
            start, end = self.num_logprobs_sent, output.num_completion_tokens
            offset = len(echo) if self.next_offset is None else self.next_offset
            entries = texts.logprobs(self.seq, start, end)
            shaped = CompletionLogprobs.of(entries, offset, echoed)
            self.next_offset = (
                shaped.text_offset[-1] + len(shaped.tokens[-1]) if shaped.tokens else offset
            )
            logprobs = shaped.model_dump()
            self.num_logprobs_sent = end
        return {
            "index": self.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": output.finish_reason if output.finished else None,
            "stop_reason": output.stop_reason if output.finished else None,
        }


async def stream(
    response_id: str,
    model: str,
    choices: list[ChoiceStream],
    events: AsyncIterator[tuple[int, SequenceOutput]],
    usage: tuple[bool, bool],
    texts: TokenTexts,
    n: int,
) -> AsyncIterator[str]:
    """usage: (a final usage chunk, the usage so far on every chunk: vLLM's
    continuous_usage_stats)."""
    created = int(time.time())
    include_usage, continuous = usage

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
            if (choice := choices[index].choice(output, texts)) is not None:
                # vLLM's continuous usage: the chunk's choice and its prompt
                running = usage_of([choices[index].seq], 1) if continuous else None
                yield chunk([choice], running)
    except ServerError as exc:
        yield error_event(exc)
    else:
        if include_usage:
            yield chunk([], usage_of([c.seq for c in choices], n))
    yield DONE
