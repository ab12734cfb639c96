"""Sequence: the whole state of one request inside the engine."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from server.engine.inputs import ModelInputs
from server.engine.sampling import SamplingParams


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
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | "queue_timeout"
    stop_reason: str | int | None = None  # the stop string or stop token id that matched

    def merge(self, later: SequenceOutput) -> SequenceOutput:
        """This output followed by a later one, as a single output."""
        return SequenceOutput(
            self.text_delta + later.text_delta,
            later.num_completion_tokens,
            later.finished,
            later.finish_reason,
            later.stop_reason,
        )


@dataclass
class Sequence:
    request_id: str
    inputs: ModelInputs
    sampling: SamplingParams
    max_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    is_aborted: bool = False
    log_id: str = "-"  # the HTTP request's id (X-Request-ID), so engine logs match API logs
    slot: int = -1  # KV-cache slot while running
    rope_delta: int = 0  # Qwen2-VL mrope: position of the next token minus its index
    arrival_time: float = field(default_factory=time.monotonic)  # entered the engine
    received_time: float = field(default_factory=time.monotonic)  # the HTTP request arrived
    first_token_time: float | None = None
    finish_time: float | None = None
    # Filled by the engine thread through loop.call_soon_threadsafe; read by the request handler.
    outputs: asyncio.Queue[SequenceOutput] = field(default_factory=asyncio.Queue)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.inputs.num_prompt_tokens + len(self.output_token_ids)

    @property
    def num_cached_tokens(self) -> int:
        """Tokens whose keys/values are in the KV cache: all but the last sampled one."""
        return self.num_tokens - 1 if self.output_token_ids else 0

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
