"""How a sequence's end becomes an answer or an error for the client, and how a batch of
frame sequences is collected as one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from server.engine.engine import RETRY_AFTER_S, AsyncEngine
from server.engine.sequence import Sequence, SequenceOutput
from server.exceptions import EngineOverloaded, InvalidRequest, ServerError


class GenerationFailed(ServerError):
    def __init__(self) -> None:
        super().__init__("The model failed while generating; see the server log.")


class ConstraintFailed(InvalidRequest):
    """The request's structured-output constraint stopped it: a 400 whose param the route
    sets to the constraint's field (in_call: it stopped inside a tool call, which a
    response format beside tool_choice auto leaves the answer free to make)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_schema")
        self.in_call = False


class ConstraintDeadEnd(ConstraintFailed):
    def __init__(self, num_tokens: int) -> None:
        super().__init__(
            "The structured-output constraint (JSON schema, regex or grammar) cannot be "
            f"completed: after {_tokens(num_tokens)} it allows no next token (a pattern or "
            "format no text matches, say)."
        )


class ConstraintTooSlow(ConstraintFailed):
    def __init__(self, num_tokens: int) -> None:
        super().__init__(
            f"The structured-output constraint became too costly to follow: after "
            f"{_tokens(num_tokens)}, matching it took more CPU per token than this server "
            "allows (--max-grammar-ms-per-token). An ambiguous grammar, one that parses a text "
            'in many ways (the EBNF `x ::= x x | "a"`), costs more at every token: write it '
            "so that each text has one parse."
        )


def _tokens(count: int) -> str:
    return f"{count} token{'s' * (count != 1)}"


def raise_for_finish(output: SequenceOutput) -> None:
    if output.finish_reason == "error":
        raise GenerationFailed()
    if output.finish_reason == "dead_end":
        raise ConstraintDeadEnd(output.num_completion_tokens)
    if output.finish_reason == "grammar_too_slow":
        raise ConstraintTooSlow(output.num_completion_tokens)
    if output.finish_reason == "queue_timeout":
        raise EngineOverloaded(
            "The request waited too long for a free slot; retry shortly.",
            retry_after_s=RETRY_AFTER_S,
            code="queue_timeout",
        )


ProgressCallback = Callable[[float], object]  # fraction done, 0..1; must not block

# A video request's stages, as shares of its progress: the media is fetched and decoded (scenes
# detected) by MEDIA_READY, frames are analysed or captioned up to FRAMES_DONE, then the answer.
STARTED = 0.01
MEDIA_READY = 0.1
FRAMES_DONE = 0.95


def share(
    on_progress: ProgressCallback | None, start: float, weight: float
) -> ProgressCallback | None:
    """A stage's own 0..1 progress as the part [start, start + weight] of the whole."""
    if on_progress is None:
        return None
    return lambda fraction: on_progress(start + fraction * weight)


def report(on_progress: ProgressCallback | None, fraction: float) -> None:
    if on_progress is not None:
        on_progress(fraction)


async def collect_all(
    engine: AsyncEngine,
    seqs: list[Sequence],
    collect: Callable[[Sequence], Awaitable[str]],
    on_progress: ProgressCallback | None = None,
) -> list[str]:
    """Every sequence's text, in order. on_progress(fraction done) is called as each one
    finishes (on the event loop: it must not block). If one fails, or the caller is cancelled,
    the others are aborted: their slots are worth more to the next request."""
    done = 0

    async def counted(seq: Sequence) -> str:
        nonlocal done
        text = await collect(seq)
        done += 1
        if on_progress is not None:
            on_progress(done / len(seqs))
        return text

    try:
        return list(await asyncio.gather(*(counted(seq) for seq in seqs)))
    except BaseException:
        for seq in seqs:
            engine.abort(seq.request_id)
        raise
