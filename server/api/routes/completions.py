"""POST /v1/completions: text prompts (a string, several, or token ids), streaming or not."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.body import ThreadParsedRoute
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
from server.api.sse import DONE, EventStream, error_event, wire_json
from server.engine.sequence import Sequence, SequenceOutput
from server.exceptions import InvalidRequest, ServerError, refuse_unsupported
from server.pipelines.choices import merged, prepended
from server.pipelines.completions import PromptOptions
from server.pipelines.finish import ConstraintFailed
from server.pipelines.logprobs import EchoedPrompt, PromptLogprobs, TokenTexts

logger = logging.getLogger(__name__)
router = APIRouter(route_class=ThreadParsedRoute, responses=RESPONSES)


@router.post("/v1/completions", response_model=CompletionResponse, tags=["completions"])
async def completions(
    body: CompletionRequest, request: Request, services: Services = Depends(get_services)
) -> CompletionResponse | StreamingResponse:
    model = _checked(body, services)
    n = body.num_choices(services.max_n)
    prompts = body.prompts()
    _check_size(len(prompts) * n, services)
    response_id = f"cmpl-{uuid.uuid4().hex}"
    pipeline = services.completions
    sampling = body.to_sampling_params(services.sampling_defaults)
    options = PromptOptions(body.structured_param(), body.truncation(), body.add_special_tokens)
    start = pipeline.start(response_id, prompts, sampling, n, options)
    seqs = await until_disconnected(request, start)
    # echo: each choice's text starts with its prompt (choice k answers prompt k // n)
    cut = body.truncate_prompt_tokens is not None
    echoes = [
        pipeline.prompt_text(prompts[k // n], seq, cut) if body.echo else ""
        for k, seq in enumerate(seqs)
    ]
    shown = Shown(
        # logprobs' tokens as "token_id:{id}" on request (vLLM's return_tokens_as_token_ids)
        pipeline.token_id_texts if body.return_tokens_as_token_ids else pipeline.token_texts,
        bool(body.return_token_ids),
        not body.echo_only,
        options.grammar_param,
    )
    if not body.stream:
        try:
            texts = await until_disconnected(
                request, asyncio.gather(*(pipeline.text(s) for s in seqs))
            )
        except ConstraintFailed as exc:
            exc.param = shown.grammar_param
            raise
        # a prompt's scores are formatted once, whatever its number of choices
        scored = [_prompt_logprobs(first, shown.texts) for first in seqs[::n]]
        choices = [
            _choice(k, seq, seqs[k - k % n], echoes[k], text, shown, scored[k // n])
            for k, (seq, text) in enumerate(zip(seqs, texts, strict=True))
        ]
        return CompletionResponse(
            id=response_id,
            created=int(time.time()),
            model=model,
            choices=choices,
            usage=usage_of(seqs, n, shown.generated),
        )
    usage = usage_wanted(body.stream_options)
    events = merged([pipeline.outputs(s) for s in seqs])
    # Wait for the first output before answering 200, so a queue timeout is still a 503.
    try:
        first = await until_disconnected(request, anext(events))
    except ConstraintFailed as exc:
        exc.param = shown.grammar_param
        raise
    streams = [ChoiceStream(k, seq, seqs[k - k % n], echoes[k]) for k, seq in enumerate(seqs)]
    return EventStream(
        stream(response_id, model, streams, prepended(first, events), usage, shown, n)
    )


def _checked(body: CompletionRequest, services: Services) -> str:
    """The checks that need no prompt read; the model the answer names."""
    model = services.answering_model(body.model)
    refuse_unsupported(body.unsupported_fields())
    check_stream_options(body)
    body.check_max_tokens()
    body.check_prompt_logprobs()
    if ignored := body.vllm_ignored():
        logger.debug("fields with no effect here, ignored: %s", ", ".join(ignored))
    if body.request_id is not None:
        logger.info("client request_id %r", body.request_id)  # repr: no forged lines
    return model


def _check_size(num_sequences: int, services: Services) -> None:
    """A request's prompts and choices are each a sequence in the queue; a request needing
    more than the whole queue holds would, entering an empty queue, turn every other away."""
    limit = services.engine.scheduler.config.max_queued_requests
    if num_sequences > limit:
        raise InvalidRequest(
            f"prompt holds {num_sequences} sequences (prompts x n); this server queues at most "
            f"{limit} (--max-queued-requests): send them in several requests.",
            param="prompt",
            code="invalid_value",
        )


@dataclass(frozen=True)
class Shown:
    """What an answer shows beside its text."""

    texts: TokenTexts  # how logprobs show tokens
    token_ids: bool  # vLLM's return_token_ids: the prompt's and the answer's ids
    generated: bool  # false for echo with max_tokens 0: the token generated is left out
    grammar_param: str  # the field a constraint came from, for its errors


def _choice(
    index: int,
    seq: Sequence,
    first: Sequence,
    echo: str,
    text: str,
    shown: Shown,
    prompt_logprobs: list[PromptLogprobs | None] | None,
) -> CompletionChoice:
    """Choice `index`, the sequence `seq`; `first` is its prompt's first choice (which scored
    the prompt for all of them: prompt_logprobs, vLLM's shape of those scores)."""
    num_shown = seq.num_completion_tokens if shown.generated else 0
    logprobs = None
    if seq.sampling.logprobs is not None:
        entries = shown.texts.logprobs(seq, 0, num_shown)
        logprobs = CompletionLogprobs.of(entries, len(echo), _echoed(first, echo, shown.texts))
    return CompletionChoice(
        index=index,
        text=echo + (text if shown.generated else ""),
        logprobs=logprobs,
        # echo only: nothing generated, its budget of 0 reached (not the hidden token's end)
        finish_reason=seq.finish_reason if shown.generated else "length",
        stop_reason=seq.stop_reason if shown.generated else None,
        prompt_logprobs=prompt_logprobs,
        prompt_token_ids=first.inputs.token_ids if shown.token_ids else None,
        token_ids=seq.output_token_ids[:num_shown] if shown.token_ids else None,
    )


def _prompt_logprobs(first: Sequence, texts: TokenTexts) -> list[PromptLogprobs | None] | None:
    """vLLM's prompt_logprobs of a choice's prompt (scored by the prompt's first choice)."""
    if first.sampling.prompt_logprobs is None:
        return None
    return texts.prompt_logprobs(first)


def _echoed(seq: Sequence, echo: str, texts: TokenTexts) -> EchoedPrompt | None:
    """The prompt's tokens and logprobs when the answer echoes its prompt with logprobs (`seq`
    is the prompt's first choice: the one that scored it)."""
    if echo and seq.sampling.prompt_logprobs is not None:
        return texts.prompt(seq)
    return None


def usage_of(
    seqs: list[Sequence], n: int, generated: bool = True, sent: int | None = None
) -> Usage:
    """Each prompt counted once (its n choices share it), every choice's completion (none
    when only the prompts are echoed). sent: one choice's tokens sent so far (a stream's
    running usage: the engine may have the next one already)."""
    firsts = seqs[::n]
    prompt = sum(s.inputs.num_prompt_tokens for s in firsts)
    completion = sum(s.num_completion_tokens for s in seqs) if sent is None else sent
    completion = completion if generated else 0
    return Usage.of(prompt, 0, 0, completion, sum(s.num_cached_tokens for s in firsts))


@dataclass
class ChoiceStream:
    """One choice's progress through the stream: echo not yet sent, text and logprobs sent."""

    index: int
    seq: Sequence
    first: Sequence  # its prompt's first choice, which scored the prompt
    echo: str
    num_tokens_sent: int = 0  # tokens whose logprobs and ids went out
    started: bool = False  # its first chunk went out
    # Where the next token's text_offset is: the tokens' own texts add up, as in the whole
    # answer (a token that is part of a character counts its U+FFFD).
    next_offset: int | None = None

    def choice(self, output: SequenceOutput, shown: Shown) -> dict | None:
        echoed = _echoed(self.first, self.echo, shown.texts)  # with the first chunk only
        delta = output.text_delta if shown.generated else ""
        text, echo, self.echo = self.echo + delta, self.echo, ""
        if not text and not output.finished:
            return None  # the tokens' logprobs and ids go with the next piece of text
        start = self.num_tokens_sent
        end = self.num_tokens_sent = output.num_completion_tokens if shown.generated else 0
        logprobs = None
        if self.seq.sampling.logprobs is not None:
            offset = len(echo) if self.next_offset is None else self.next_offset
            entries = shown.texts.logprobs(self.seq, start, end)
            shaped = CompletionLogprobs.of(entries, offset, echoed)
            self.next_offset = (
                shaped.text_offset[-1] + len(shaped.tokens[-1]) if shaped.tokens else offset
            )
            logprobs = shaped.model_dump()
        choice = {
            "index": self.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": None,
            "stop_reason": None,
        }
        if output.finished:  # (echo only: nothing generated, its budget of 0 reached)
            choice["finish_reason"] = output.finish_reason if shown.generated else "length"
            choice["stop_reason"] = output.stop_reason if shown.generated else None
        if shown.token_ids:  # vLLM's: the prompt's ids on a choice's first chunk
            if not self.started:
                choice["prompt_token_ids"] = self.first.inputs.token_ids
            choice["token_ids"] = self.seq.output_token_ids[start:end]
        self.started = True
        return choice


async def stream(
    response_id: str,
    model: str,
    choices: list[ChoiceStream],
    events: AsyncIterator[tuple[int, SequenceOutput]],
    usage: tuple[bool, bool],
    shown: Shown,
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
        return f"data: {wire_json(body)}\n\n"

    try:
        async for index, output in events:
            if (choice := choices[index].choice(output, shown)) is not None:
                # vLLM's continuous usage: the chunk's choice and its prompt
                stream = choices[index]
                running = (
                    usage_of([stream.seq], 1, shown.generated, stream.num_tokens_sent)
                    if continuous
                    else None
                )
                yield chunk([choice], running)
    except ServerError as exc:
        if isinstance(exc, ConstraintFailed):
            exc.param = shown.grammar_param
        yield error_event(exc)
    else:
        if include_usage:
            yield chunk([], usage_of([c.seq for c in choices], n, shown.generated))
    yield DONE
