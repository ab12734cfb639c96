"""Scheduler and engine loop with a fake runner: no model, no torch, just the bookkeeping."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.engine import AsyncEngine
from server.engine.inputs import ModelInputs
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import Sequence, SequenceStatus


def config(**overrides: float) -> SchedulerConfig:
    values = {
        "max_num_seqs": 4,
        "max_num_batched_tokens": 100,
        "max_queued_requests": 100,
        "queue_timeout_s": 60.0,
    }
    values.update(overrides)
    return SchedulerConfig(**values)  # type: ignore[arg-type]


def make_seq(name: str, num_prompt: int = 10, max_tokens: int = 5) -> Sequence:
    inputs = ModelInputs(tensors={}, num_prompt_tokens=num_prompt, num_image_tokens=0)
    return Sequence(name, inputs, SamplingParams(temperature=0), max_tokens)


def test_admits_fifo_up_to_max_num_seqs() -> None:
    scheduler = Scheduler(config(max_num_seqs=2))
    seqs = [make_seq(f"s{i}") for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    step = scheduler.schedule()
    assert step.prefill == seqs[:2] and step.decode == []
    assert [s.slot for s in seqs] == [0, 1, -1]
    assert seqs[2].status is SequenceStatus.WAITING
    step = scheduler.schedule()
    assert step.prefill == [] and step.decode == seqs[:2]


def test_prefill_token_budget() -> None:
    scheduler = Scheduler(config(max_num_batched_tokens=25))
    big, small, other = make_seq("big", 20), make_seq("small", 10), make_seq("other", 3)
    for seq in (big, small, other):
        scheduler.add(seq)
    assert scheduler.schedule().prefill == [big]  # 20 + 10 > 25: small waits its turn (FIFO)
    assert scheduler.schedule().prefill == [small, other]


def test_prompt_larger_than_the_budget_runs_alone() -> None:
    scheduler = Scheduler(config(max_num_batched_tokens=8))
    huge, after = make_seq("huge", 50), make_seq("after", 2)
    scheduler.add(huge)
    scheduler.add(after)
    assert scheduler.schedule().prefill == [huge]
    assert scheduler.schedule().prefill == [after]


def test_removal_keeps_slots_dense() -> None:
    scheduler = Scheduler(config())
    seqs = [make_seq(f"s{i}") for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    scheduler.schedule()
    seqs[3].output_token_ids = [1, 2]
    move = scheduler.remove(seqs[1])
    assert move is not None and (move.src, move.dst) == (3, 1)
    assert move.length >= seqs[3].num_cached_tokens
    assert [s.request_id for s in scheduler.running] == ["s0", "s3", "s2"]
    assert [s.slot for s in scheduler.running] == [0, 1, 2]
    assert scheduler.remove(seqs[2]) is None  # the last one: nothing to move


def test_expire_waiting() -> None:
    scheduler = Scheduler(config(max_num_seqs=1, queue_timeout_s=5))
    first, second = make_seq("first"), make_seq("second")
    scheduler.add(first)
    scheduler.add(second)
    scheduler.schedule()
    assert scheduler.expire_waiting(now=second.arrival_time + 1) == []
    assert scheduler.expire_waiting(now=second.arrival_time + 6) == [second]
    assert not scheduler.waiting and scheduler.running == [first]


class FakeTokenizer:
    def decode(self, ids: list[int], **kwargs: object) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


class FakeRunner:
    """Emits token (slot-independent) = number of tokens the sequence has, so outputs are
    predictable; records every batch it was given."""

    eos_token_ids = (99,)
    vocab_size = 100

    def __init__(self) -> None:
        self.prefills: list[list[str]] = []
        self.decodes: list[list[str]] = []
        self.moves: list[tuple[int, int]] = []

    def bind_thread(self) -> None:
        pass

    def prefill(self, seqs: list[Sequence]) -> list[int]:
        self.prefills.append([s.request_id for s in seqs])
        return [0 for _ in seqs]

    def decode(self, seqs: list[Sequence]) -> list[int]:
        assert [s.slot for s in seqs] == list(range(len(seqs)))  # dense slots, in order
        self.decodes.append([s.request_id for s in seqs])
        return [len(s.output_token_ids) for s in seqs]

    def move_slot(self, move) -> None:
        self.moves.append((move.src, move.dst))

    def release(self, seq: Sequence) -> None:
        pass


@pytest.mark.anyio
async def test_engine_loop_batches_and_frees_with_a_fake_runner() -> None:
    runner = FakeRunner()
    engine = AsyncEngine(runner, Scheduler(config(max_num_seqs=3)), FakeTokenizer(), 1000, 16)
    engine.start()
    lengths = {"a": 2, "b": 6, "c": 4, "d": 3}
    seqs = {
        name: engine.add_request(name, make_seq(name).inputs, SamplingParams(max_tokens=n))
        for name, n in lengths.items()
    }

    async def text(seq: Sequence) -> str:
        return "".join([out.text_delta async for out in engine.stream(seq)])

    texts = await asyncio.gather(*(text(s) for s in seqs.values()))
    await engine.stop()
    assert texts == ["ab", "abcdef", "abcd", "abc"]  # token k decodes to the k-th letter
    assert all(s.finish_reason == "length" for s in seqs.values())
    assert max(len(batch) for batch in runner.decodes) == 3  # never above max_num_seqs
    assert ["d"] in runner.prefills  # d joined once a slot was free
    assert runner.moves  # a finished sequence's slot was filled by the last one
