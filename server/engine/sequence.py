"""Sequence: the whole state of one request inside the engine."""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.inputs import ModelInputs
from server.engine.sampling import SamplingParams, TokenLogprobs


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SequenceOutput:
    """One event from the engine to the request's handler."""

    text_delta: str
    num_completion_tokens: int
    finished: bool = False
    # "stop" | "length" | "abort" | "error" | "queue_timeout" | "dead_end" (a grammar that
    # allows no next token) | "grammar_too_slow" (one over its CPU budget per token)
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched

    @staticmethod
    def joined(outputs: list[SequenceOutput]) -> SequenceOutput:
        """Consecutive outputs as a single one (their texts joined once, not pairwise)."""
        last = outputs[-1]
        if len(outputs) == 1:
            return last
        return SequenceOutput(
            "".join(output.text_delta for output in outputs),
            last.num_completion_tokens,
            last.finished,
            last.finish_reason,
            last.stop_reason,
        )


# eq=False: a sequence is itself, not its fields (the scheduler's `in` and `remove` compared
# every field of every sequence before it: O(batch^2) tuples a step).
@dataclass(eq=False)
class Sequence:
    request_id: str
    inputs: ModelInputs
    sampling: SamplingParams
    max_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # One per output token when sampling.logprobs is set (appended on the engine thread before
    # the output that counts the token is queued, so a reader may slice up to that count).
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Prompt tokens 1.. (the first has none) when sampling.prompt_logprobs is set; complete
    # once the prompt is prefilled, before its first output.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    is_aborted: bool = False
    choice_index: int = 0  # among the n choices of one prompt (they share its prompt)
    num_choices: int = 1  # n: how many choices its request has
    group_id: str = ""  # the first choice's request id, on the others (metrics per request)
    scheduled_time: float | None = None  # first scheduled (admitted)
    log_id: str = "-"  # the HTTP request's id (X-Request-ID), so engine logs match API logs
    project: str = ""  # whose request it is (its API key's project): the "fair" policy's unit
    # Paged KV cache: the blocks holding this sequence's keys/values, in order; how many of its
    # tokens have their keys/values there; the prefix-cache hash of each full block.
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_hashes: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache at first admission
    num_preemptions: int = 0
    # Async scheduling: a token sampled on the device that the host has not read yet (0 or 1).
    # It counts in num_tokens, so the scheduler plans its decode; the runner reads it from the
    # device, and the engine appends it to output_token_ids once it arrives.
    num_pending_tokens: int = 0
    # Qwen2-VL mrope: the prompt's [3, n] positions (set by the runner on first use), and the
    # position of any later token minus its index.
    mrope_positions: Any = None
    rope_delta: int = 0
    # Structured output: the compiled grammar, held from add_request on (the grammar cache may
    # let go of it meanwhile: a cache of many schemas is bounded).
    grammar: Any = None
    # Unique in this process, unlike id() (a finished sequence's address is reused) or the
    # request id (taken again once its request has finished): what a graph's table row names.
    serial: int = field(default_factory=itertools.count().__next__)
    arrival_time: float = field(default_factory=time.monotonic)  # entered the engine
    received_time: float = field(default_factory=time.monotonic)  # the HTTP request arrived
    first_token_time: float | None = None
    last_token_time: float | None = None
    # The seconds between each output token and the one before it (the metrics' histogram).
    inter_token_latencies: list[float] = field(default_factory=list)
    finish_time: float | None = None
    # Filled by the engine thread through loop.call_soon_threadsafe; read by the request handler.
    outputs: asyncio.Queue[SequenceOutput] = field(default_factory=asyncio.Queue)
    # Its output tokens' text, stop strings found in it (set by the engine that takes it).
    detokenizer: IncrementalDetokenizer | None = None

    def token_arrived(self, now: float) -> None:
        """A sampled token reached the host: its time, for the latency metrics."""
        self.num_pending_tokens = 0
        if self.first_token_time is None:
            self.first_token_time = now
        else:
            self.inter_token_latencies.append(now - self.last_token_time)
        self.last_token_time = now

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None) -> None:
        self.output_token_ids.append(token_id)
        if self.sampling.logprobs is not None:  # (the sampler left them on the row's state)
            self.output_logprobs.append(logprobs)

    def run(self) -> bool:
        """Admitted to the running batch; True the first time (it no longer counts as queued)."""
        first = self.scheduled_time is None
        if first:
            self.scheduled_time = time.monotonic()
        self.status = SequenceStatus.RUNNING
        return first

    def preempt(self) -> None:
        """Back to the queue, its KV blocks given back (its tokens are computed again)."""
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1

    def finish(self, reason: str, stop_reason: str | int | None = None) -> str:
        """Ends it (a token still on its way is dropped); returns the text not yet streamed.
        Its detokenizer goes (it holds a copy of the tokens and text the answer keeps)."""
        self.status = SequenceStatus.FINISHED
        self.num_pending_tokens = 0
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.finish_time = time.monotonic()
        detokenizer, self.detokenizer = self.detokenizer, None
        return detokenizer.flush() if detokenizer is not None else ""

    @property
    def is_admitted(self) -> bool:
        """Scheduled at least once (it no longer counts as queued)."""
        return self.scheduled_time is not None

    @property
    def num_completion_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.inputs.num_prompt_tokens + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def is_last_token_pending(self) -> bool:
        """Its pending token is its max_tokens-th: nothing more to compute."""
        return bool(self.num_pending_tokens) and (
            self.num_completion_tokens + self.num_pending_tokens >= self.max_tokens
        )

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to go through the model: a prompt (chunk by chunk), or the one token
        sampled last step (a decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_uncomputed_tokens > 1

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt + output (a token still on the device is not here:
        the runner reads it there)."""
        prompt = self.inputs.token_ids
        if end <= len(prompt):
            return prompt[start:end]
        outputs = self.output_token_ids[max(0, start - len(prompt)) : end - len(prompt)]
        return prompt[start:end] + outputs

    def media_keys(self, start: int, end: int) -> tuple[str, ...]:
        """Content keys of the media whose tokens lie in [start, end)."""
        return tuple(m.key for m in self.inputs.media if m.overlaps(start, end))

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
