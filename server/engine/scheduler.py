"""Scheduler: moves Sequences between `waiting` and `running`; no torch here.

Every engine step has one token budget (max_num_batched_tokens) that counts real tokens:
1. every running sequence that is decoding gets its one token first (a new KV block when it
   needs one; when none is free, the lowest-ranked, newest running sequence is preempted: its
   blocks are freed and it waits at the head of its rank to be recomputed later). With async
   scheduling the token may still be on its way from the device (`num_pending_tokens`); a
   sequence whose pending token is its last is left out;
2. sequences part-way through their prompt get the next chunk of it;
3. waiting sequences are admitted in queue order (first come, first served within a rank),
   while the budget, max_num_seqs and free KV blocks allow; a prompt's prefix already in the
   prefix cache is not recomputed.
A long prompt thus never holds the running streams back by more than one chunk.

Under the "priority" policy (vLLM's) the queue is ordered by (priority, arrival): lower values
first. A waiting sequence that outranks running ones and cannot fit beside them takes their
place at the start of a step (the lowest-ranked, most recently admitted first, are preempted
and recomputed later), and memory-pressure preemption also picks the lowest-ranked. Under
"fcfs" priorities are not looked at: every sequence ranks the same.

Under "fair" the batch is shared between projects (API keys, server/jobs/project.py): the
next admitted is the first waiting sequence of the project with the fewest running, and
memory-pressure preemption takes the newest of the project with the most. A project that
queues hundreds of requests (a batch job) then holds back another's first one by a step,
not by the whole queue. When that first one finds no room (the batch full of another
project's), it takes the places it needs of the newest of the project running the most, one at
a time, while that project runs at least two more than its own (or nobody's, if that is not
enough): the shares even out without two projects trading places back and forth. Within a
project it is first come, first served.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # sequences running (holding KV blocks) at once
    max_num_batched_tokens: int  # tokens (decodes + prompt chunks) in one step
    max_queued_requests: int
    queue_timeout_s: float
    policy: Literal["fcfs", "priority", "fair"] = "fcfs"


@dataclass
class ScheduledBatch:
    """One step's work: each sequence with how many of its uncomputed tokens to compute."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # first admission this step
    num_tokens: int = 0  # of the step, all sequences together

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_tokens)
        self.num_tokens += num_tokens

    def drop(self, seq: Sequence) -> None:
        """Out of this step (a sequence preempted after it was scheduled), if it is in it."""
        for i, scheduled in enumerate(self.seqs):
            if scheduled is seq:
                del self.seqs[i]
                self.num_tokens -= self.num_new_tokens.pop(i)
                return

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences whose step ends at their last token: they get a new token. Read it
        before `Scheduler.commit` (which moves num_computed_tokens past the step)."""
        return [
            seq
            for seq, num in zip(self.seqs, self.num_new_tokens, strict=True)
            if seq.num_computed_tokens + num == seq.num_tokens
        ]


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: list[Sequence] = []  # in (rank, arrival) order: the next to admit first
        self.running: list[Sequence] = []  # in admission order (see _in_preemption_order)
        self.peak_num_running = 0  # for tests and metrics
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq, ahead=False)

    def rank(self, seq: Sequence) -> int:
        """Lower ranks are served first (the request's priority, under the priority policy)."""
        return seq.sampling.priority if self.config.policy == "priority" else 0

    def _enqueue(self, seq: Sequence, ahead: bool) -> None:
        """Into the queue by (rank, arrival): first come, first served within a rank. A
        preempted sequence (ahead) arrived before any that waits, so it goes first again (and
        before one that arrived at the very same time)."""
        insort = bisect.insort_left if ahead else bisect.insort_right
        insort(self.waiting, seq, key=lambda s: (self.rank(s), s.arrival_time))

    def schedule(self) -> ScheduledBatch:
        """One step: the running sequences' next tokens (preempting for room if need be),
        their prompts' next chunks, then waiting ones, while the token budget lasts."""
        batch = ScheduledBatch()
        if self.config.policy != "fcfs":
            self._make_way()
        num_preemptions = self.num_preemptions
        self._schedule_decodes(batch)
        self._schedule_prompt_chunks(batch)
        if num_preemptions == self.num_preemptions:  # (one that had to preempt: memory is short)
            self._admit_waiting(batch)
        self.peak_num_running = max(self.peak_num_running, len(self.running))
        return batch

    def _budget(self, batch: ScheduledBatch) -> int:
        """The tokens the step may still take."""
        return self.config.max_num_batched_tokens - batch.num_tokens

    def _schedule_decodes(self, batch: ScheduledBatch) -> None:
        """Each running sequence past its prompt, one token, with a KV slot for it."""
        for seq in list(self.running):
            if seq.is_last_token_pending:  # it ends when that token arrives
                continue
            # (one preempted meanwhile, to make room for another, is not running any more)
            room = self._budget(batch) and seq in self.running and not seq.is_prefilling
            if room and self._make_room(seq, batch):
                batch.add(seq, 1)

    def _schedule_prompt_chunks(self, batch: ScheduledBatch) -> None:
        """Each running sequence still in its prompt, as much of it as the budget takes."""
        for seq in self.running:
            if (budget := self._budget(batch)) and seq.is_prefilling:
                batch.add(seq, min(seq.num_uncomputed_tokens, budget))

    def _admit_waiting(self, batch: ScheduledBatch) -> None:
        """Waiting sequences join, in queue order, while there are places, blocks and budget."""
        while (budget := self._budget(batch)) and self.waiting:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self._next_waiting()
            if not self.blocks.allocate(seq):
                break
            self.waiting.remove(seq)
            if seq.run():
                batch.admitted.append(seq)
            self.running.append(seq)
            batch.add(seq, min(seq.num_uncomputed_tokens, budget))

    def _next_waiting(self) -> Sequence:
        """The sequence to admit next: the queue's first; under "fair" the first of the
        project with the fewest running sequences."""
        if self.config.policy != "fair":
            return self.waiting[0]
        running = self._running_per_project()
        return min(self.waiting, key=lambda s: running[s.project])  # (the first of equals)

    def _running_per_project(self) -> Counter[str]:
        return Counter(s.project for s in self.running)

    def _make_room(self, seq: Sequence, batch: ScheduledBatch) -> bool:
        """A KV slot for the sequence's next token, preempting the lowest-ranked, newest
        sequences if need be (one already in this step's batch leaves it); False when the
        sequence itself had to be preempted."""
        while not self.blocks.can_append(seq):
            victim = self._in_preemption_order()[0]
            self._preempt(victim)
            batch.drop(victim)
            if victim is seq:
                return False
        self.blocks.append(seq)
        return True

    def _in_preemption_order(self, seqs: list[Sequence] | None = None) -> list[Sequence]:
        """Running sequences (or `seqs` among them), the one to preempt first first: the
        lowest-ranked, most recently admitted (under fcfs: the newest; under fair: the newest
        of the project with the most running)."""
        order = {id(seq): i for i, seq in enumerate(self.running)}
        share = self._running_per_project() if self.config.policy == "fair" else Counter()
        return sorted(
            self.running if seqs is None else seqs,
            key=lambda s: (self.rank(s), share[s.project], order[id(s)]),
            reverse=True,
        )

    def _outranked(self, head: Sequence) -> list[Sequence]:
        """The running sequences `head` may take the places of, in the order they would go:
        lower-ranked ones (priority); under fair, the newest of the project running the most,
        one at a time, while that project runs at least two more than head's (after the
        swap it still runs as many as head's: the places do not go back, whatever their
        number)."""
        if self.config.policy == "priority":
            return self._in_preemption_order(
                [s for s in self.running if self.rank(s) > self.rank(head)]
            )
        share, order = self._running_per_project(), {id(s): i for i, s in enumerate(self.running)}
        floor = share[head.project] + 2
        candidates = sorted(
            (s for s in self.running if share[s.project] >= floor), key=lambda s: -order[id(s)]
        )
        victims: list[Sequence] = []
        while candidates:
            victim = max(candidates, key=lambda s: share[s.project])  # (the newest of equals)
            if share[victim.project] < floor:
                break
            victims.append(victim)
            candidates.remove(victim)
            share[victim.project] -= 1
        return victims

    def _make_way(self) -> None:
        """The next waiting sequence, if it cannot fit beside the running ones but would once
        outranked ones left, takes the place of as many of them as it needs, in preemption
        order (they wait, and are recomputed later). None is preempted when even all of them
        would not make room, or when the others' decodes and prompt chunks take the step's
        whole token budget (it could not be admitted in this step: the next one decides)."""
        if not self.waiting:
            return
        head = self._next_waiting()
        victims = self._outranked(head)
        if not victims:  # (the common case: no hash-chain walk in every step)
            return
        hits = self.blocks.prefix_hits(head)  # one walk of its hash chain for every try
        if self._fits(head, [], hits) or not self._fits(head, victims, hits):
            return
        count = next(n for n in range(1, len(victims) + 1) if self._fits(head, victims[:n], hits))
        if self._busy_tokens(victims[:count]) >= self.config.max_num_batched_tokens:
            return
        for victim in victims[:count]:
            self._preempt(victim)

    def _busy_tokens(self, victims: list[Sequence]) -> int:
        """Tokens the step gives the running sequences but `victims` before any admission."""
        gone = set(map(id, victims))
        return sum(
            s.num_uncomputed_tokens if s.is_prefilling else 1
            for s in self.running
            if id(s) not in gone and not s.is_last_token_pending
        )

    def _fits(self, seq: Sequence, victims: list[Sequence], hits: list[int]) -> bool:
        """Whether seq (whose prefix-cache hits are `hits`) could be admitted once `victims`
        were preempted, a block kept for each other running sequence whose next token needs
        one this step."""
        if len(self.running) - len(victims) >= self.config.max_num_seqs:
            return False
        gone = set(map(id, victims))
        reserve = sum(
            1
            for s in self.running
            if id(s) not in gone and not s.is_prefilling and self.blocks.needs_block(s)
        )
        return self.blocks.can_allocate(seq, hits, victims, reserve)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_blocks(seq)
        seq.preempt()
        self.num_preemptions += 1
        self._enqueue(seq, ahead=True)

    def commit(self, batch: ScheduledBatch) -> None:
        """The step ran: its tokens are in the KV cache (a sequence that finished meanwhile
        gave its blocks back; what the step wrote for it is dropped)."""
        for seq, num in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if not seq.is_finished:
                self.blocks.commit(seq, num)

    def expire_waiting(self, now: float | None = None) -> list[Sequence]:
        """Queued sequences older than queue_timeout_s leave the queue (the engine answers 503);
        a preempted sequence was accepted already and waits its turn."""
        now = time.monotonic() if now is None else now
        expired = [
            s
            for s in self.waiting
            if not s.is_admitted and now - s.arrival_time > self.config.queue_timeout_s
        ]
        for seq in expired:
            self.waiting.remove(seq)
        return expired

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free_blocks(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
