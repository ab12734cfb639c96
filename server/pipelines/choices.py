"""Several choices (`n`) for one prompt, and the streams of several sequences as one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import TypeVar

from server.engine.engine import AsyncEngine
from server.engine.inputs import ModelInputs
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence, SequenceOutput

T = TypeVar("T")

SEED_MODULUS = 2**64  # torch generators take 64-bit seeds
# How often to look whether the first choice's prompt is in the KV cache. The engine thread
# sets first_token_time after the prefill step; a short poll keeps the engine untouched.
PREFILL_POLL_S = 0.005


def choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """Choice i samples with seed + i: each choice differs, and each is reproducible. Only the
    first scores the prompt (prompt logprobs): the others share its scores and, so, can take
    its prompt from the prefix cache."""
    if index == 0:
        return sampling
    seed = None if sampling.seed is None else (sampling.seed + index) % SEED_MODULUS
    return replace(sampling, seed=seed, prompt_logprobs=None)


def choice_id(request_id: str, index: int) -> str:
    return request_id if index == 0 else f"{request_id}-{index}"


async def add_choices(
    engine: AsyncEngine, request_id: str, inputs: ModelInputs, sampling: SamplingParams, n: int
) -> list[Sequence]:
    """n sequences of one prompt, prefilled once: the first goes alone, and once its prompt
    is computed the others join and find its KV blocks in the prefix cache (all but the last,
    partial block, which each computes again)."""
    first = engine.add_request(choice_id(request_id, 0), inputs, sampling, num_choices=n)
    if n == 1:
        return [first]
    try:
        while first.first_token_time is None and not first.is_finished:
            await asyncio.sleep(PREFILL_POLL_S)
        rest = [
            (choice_id(request_id, i), inputs, choice_sampling(sampling, i)) for i in range(1, n)
        ]
        return [first, *engine.add_requests(rest, choices_of=first)]
    except BaseException:
        first.num_choices = 1  # the others will never be: its request ends with it
        engine.abort(first.request_id)
        raise


async def merged(
    streams: list[AsyncGenerator[SequenceOutput, None]],
) -> AsyncIterator[tuple[int, SequenceOutput]]:
    """(stream index, output) from every stream as they come; the first error ends all.

    At most as many outputs as there are streams wait here: a reader that falls behind (a
    slow client) leaves the rest in the sequences' own queues, where the engine's stream
    merges what piled up into one output. Reading the streams eagerly into an unbounded queue
    instead kept an output per step for every choice, which a client that stopped reading
    grew until it hung up (and which was then formatted all at once, the event loop blocked
    meanwhile)."""
    queue: asyncio.Queue[tuple[int, SequenceOutput | BaseException | None]] = asyncio.Queue(
        maxsize=len(streams)
    )

    async def pump(index: int, outputs: AsyncGenerator[SequenceOutput, None]) -> None:
        end: BaseException | None = None
        try:
            # (closed on the way out: a pump cancelled while it waits to put has its stream
            # closed, so its sequence is aborted now, not when the generator is collected)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    await queue.put((index, output))
        except Exception as exc:
            end = exc
        await queue.put((index, end))  # (not when cancelled: nobody reads any more)

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
                if not queue.empty():  # (the others' turn between outputs formatted back to back)
                    await asyncio.sleep(0)
    finally:
        for task in tasks:
            task.cancel()


async def prepended(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """first, then what rest yields: a stream whose first item was awaited before the answer's
    status line (so an error before any output is still an error status, not an event)."""
    yield first
    async for item in rest:
        yield item
