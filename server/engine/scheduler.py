"""Scheduler: moves Sequences between `waiting` and `running`; no torch here.

Every engine iteration: the sequences already running get one decode step together, and waiting
sequences are admitted (first come, first served) while there is a free KV slot, room under
max_num_seqs, and room in the prefill token budget. A running sequence's index in `running` is
its KV-cache slot; when one finishes, the last one moves into its slot (the runner copies its
cache), so running slots are always 0..n-1.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from server.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # KV slots: at most this many sequences run at once
    max_num_batched_tokens: int  # prompt tokens prefilled in one iteration
    max_queued_requests: int
    queue_timeout_s: float


@dataclass
class ScheduledStep:
    prefill: list[Sequence] = field(default_factory=list)  # admitted now, slots ascending
    decode: list[Sequence] = field(default_factory=list)  # running before, slots 0..n-1

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode


@dataclass(frozen=True)
class SlotMove:
    """The runner copies `length` cached positions from slot src to slot dst."""

    src: int
    dst: int
    length: int


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.peak_num_running = 0  # for tests and metrics

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(decode=list(self.running))
        budget = self.config.max_num_batched_tokens
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            num_tokens = self.waiting[0].inputs.num_prompt_tokens
            # A prompt bigger than the whole budget still runs, alone.
            if num_tokens > budget and step.prefill:
                break
            seq = self.waiting.popleft()
            budget -= num_tokens
            seq.status = SequenceStatus.RUNNING
            seq.slot = len(self.running)
            self.running.append(seq)
            step.prefill.append(seq)
        self.peak_num_running = max(self.peak_num_running, len(self.running))
        return step

    def expire_waiting(self, now: float | None = None) -> list[Sequence]:
        """Waiting sequences older than queue_timeout_s leave the queue (the engine answers 503)."""
        now = time.monotonic() if now is None else now
        expired = [s for s in self.waiting if now - s.arrival_time > self.config.queue_timeout_s]
        for seq in expired:
            self.waiting.remove(seq)
        return expired

    def remove(self, seq: Sequence) -> SlotMove | None:
        """Take a finished or aborted sequence out; returns the slot move that keeps slots dense."""
        if seq.slot < 0:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return None
        slot = seq.slot
        last = self.running.pop()
        seq.slot = -1
        if last is seq:
            return None
        self.running[slot] = last
        last.slot = slot
        # num_tokens >= the cached positions whether or not this step's token is appended yet.
        return SlotMove(src=len(self.running), dst=slot, length=last.num_tokens)
