"""Scheduler and block manager: no model, just the bookkeeping (token budget, chunks, blocks,
prefix hits, preemption). The engine loop around them, on the tiny checkpoint:
test_engine_loop.py."""

from __future__ import annotations

import pytest

from server.engine.block_manager import BlockManager
from server.engine.inputs import MediaItem, ModelInputs
from server.engine.sampling import SamplingParams
from server.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from server.engine.sequence import Sequence, SequenceStatus

BLOCK = 4


def config(**overrides: float) -> SchedulerConfig:
    values = {
        "max_num_seqs": 4,
        "max_num_batched_tokens": 100,
        "max_queued_requests": 100,
        "queue_timeout_s": 60.0,
    }
    values.update(overrides)
    return SchedulerConfig(**values)  # type: ignore[arg-type]


def scheduler(num_blocks: int = 64, caching: bool = True, **overrides: float) -> Scheduler:
    return Scheduler(config(**overrides), BlockManager(num_blocks, BLOCK, caching))


def make_seq(
    name: str,
    num_prompt: int = 10,
    max_tokens: int = 5,
    first: int = 0,
    media=(),
    priority: int = 0,
) -> Sequence:
    inputs = ModelInputs(tensors={}, num_prompt_tokens=num_prompt, num_image_tokens=0)
    inputs.token_ids = list(range(first, first + num_prompt))  # cached_property: settable
    inputs.media = tuple(media)
    sampling = SamplingParams(temperature=0, priority=priority)
    return Sequence(name, inputs, sampling, max_tokens)


def run_step(sched: Scheduler, token: int = 7) -> ScheduledBatch:
    """schedule + commit + a sampled token for each sequence that reached its end."""
    batch = sched.schedule()
    sampled = batch.sampled
    sched.commit(batch)
    for seq in sampled:
        seq.output_token_ids.append(token)
    return batch


def scheduled(batch: ScheduledBatch) -> dict[str, int]:
    return {s.request_id: n for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)}


def test_admits_fifo_up_to_max_num_seqs() -> None:
    sched = scheduler(max_num_seqs=2)
    seqs = [make_seq(f"s{i}") for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    batch = run_step(sched)
    assert scheduled(batch) == {"s0": 10, "s1": 10} and batch.admitted == seqs[:2]
    assert seqs[2].status is SequenceStatus.WAITING
    assert scheduled(run_step(sched)) == {"s0": 1, "s1": 1}  # decodes


def test_long_prompt_is_prefilled_in_chunks_and_decodes_go_first() -> None:
    sched = scheduler(max_num_batched_tokens=8)
    short = make_seq("short", 4)
    sched.add(short)
    run_step(sched)
    long = make_seq("long", 30, first=100)
    sched.add(long)
    chunks = []
    while long.is_prefilling or not long.output_token_ids:
        batch = run_step(sched)
        assert scheduled(batch)["short"] == 1  # the stream never waits more than one chunk
        assert sum(batch.num_new_tokens) <= 8
        chunks.append(scheduled(batch).get("long", 0))
    assert chunks == [7, 7, 7, 7, 2] and long.num_computed_tokens == 30
    assert len(long.output_token_ids) == 1  # sampled only after the last chunk


def test_prefix_blocks_are_shared_and_freed_by_reference_count() -> None:
    sched = scheduler()
    blocks = sched.blocks
    first = make_seq("a", 10)
    sched.add(first)
    run_step(sched)  # 10 tokens: two full blocks are now cached
    second = make_seq("b", 10)
    sched.add(second)
    batch = run_step(sched)
    assert scheduled(batch)["b"] == 2 and second.num_cached_tokens == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert blocks.blocks[first.block_table[0]].ref_count == 2
    free_before = blocks.num_free_blocks
    sched.remove(first)
    assert blocks.num_free_blocks == free_before + 1  # only its own third block
    sched.remove(second)
    assert blocks.num_free_blocks == blocks.num_blocks
    third = make_seq("c", 10)  # freed, but the hashes survive until the blocks are reused
    sched.add(third)
    run_step(sched)
    assert third.num_cached_tokens == 8


def test_a_full_prompt_hit_still_computes_its_last_token() -> None:
    sched = scheduler()
    sched.add(make_seq("a", 8))
    run_step(sched)
    again = make_seq("b", 8)
    sched.add(again)
    assert scheduled(run_step(sched)) == {"a": 1, "b": 4}  # one block reused, not both


def test_same_tokens_with_other_media_never_match() -> None:
    def image(key: str) -> MediaItem:
        return MediaItem("image", 0, 2, 4, 0, 16, key)

    sched = scheduler()
    sched.add(make_seq("a", 10, media=[image("cat")]))
    run_step(sched)
    other = make_seq("b", 10, media=[image("dog")])
    same = make_seq("c", 10, media=[image("cat")])
    sched.add(other)
    sched.add(same)
    run_step(sched)
    assert other.num_cached_tokens == 0 and same.num_cached_tokens == 8


def test_prefix_caching_off() -> None:
    sched = scheduler(caching=False)
    sched.add(make_seq("a", 10))
    run_step(sched)
    again = make_seq("b", 10)
    sched.add(again)
    run_step(sched)
    assert again.num_cached_tokens == 0


def test_out_of_blocks_preempts_the_newest_and_recomputes_it() -> None:
    sched = scheduler(num_blocks=6, caching=False)
    old, new = make_seq("old", 8, max_tokens=20), make_seq("new", 8, max_tokens=20, first=50)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # 2 + 2 blocks
    for _ in range(4):
        run_step(sched)  # tokens 9..12: a third block each
    assert sched.blocks.num_free_blocks == 0 and sched.num_preemptions == 0
    batch = run_step(sched)  # old needs a 4th block: new is preempted
    assert sched.num_preemptions == 1 and new.status is SequenceStatus.WAITING
    assert scheduled(batch) == {"old": 1} and new.block_table == []
    assert sched.waiting[0] is new and new.num_computed_tokens == 0
    sched.remove(old)
    batch = run_step(sched)
    assert scheduled(batch) == {"new": 13}  # prompt + outputs recomputed, then sampled
    assert len(new.output_token_ids) == 6


def of(project: str, seq: Sequence) -> Sequence:
    seq.project = project
    return seq


def test_fair_policy_shares_the_batch_between_projects() -> None:
    """A project with many queued requests (a batch job's) does not hold another's back:
    the next admitted is the first of the project with the fewest running; first come,
    first served within a project; fcfs admits in queue order whoever sent them."""
    for policy, expected in (
        ("fair", ["a0", "b0", "a1", "b1"]),
        ("fcfs", ["a0", "a1", "a2", "a3"]),
    ):
        sched = scheduler(max_num_seqs=4, policy=policy)  # type: ignore[arg-type]
        for i in range(6):
            sched.add(of("a", make_seq(f"a{i}", first=100 * i)))
        for i in range(2):
            sched.add(of("b", make_seq(f"b{i}", first=1000 + 100 * i)))
        batch = run_step(sched)
        assert [s.request_id for s in batch.admitted] == expected, policy


@pytest.mark.parametrize(("policy", "victim"), [("fair", "new-a"), ("fcfs", "b")])
def test_fair_policy_preempts_the_project_with_the_most_running(policy: str, victim: str) -> None:
    """Out of blocks: fcfs preempts the newest (b); fair the newest of the project with the
    most running (a's)."""
    sched = scheduler(num_blocks=9, caching=False, policy=policy)  # type: ignore[arg-type]
    old_a = of("a", make_seq("old-a", 8, max_tokens=20))
    new_a = of("a", make_seq("new-a", 8, max_tokens=20, first=50))
    b = of("b", make_seq("b", 8, max_tokens=20, first=90))
    for seq in (old_a, new_a, b):
        sched.add(seq)
    run_step(sched)  # 2 blocks each: 6 of 9
    for _ in range(4):
        run_step(sched)  # a third block each: 9 of 9
    assert sched.blocks.num_free_blocks == 0 and sched.num_preemptions == 0
    run_step(sched)  # a fourth block for the first: one is preempted
    waiting = [s.request_id for s in (old_a, new_a, b) if s.status is SequenceStatus.WAITING]
    assert waiting == [victim]


def test_fair_policy_makes_room_for_a_project_with_too_few_places() -> None:
    """The batch full of a's: b's first request takes the place of a's newest (recomputed
    later); b's next one only while a runs at least two more than b (4-0 -> 3-1 -> 2-2, then
    it waits), so no place goes back and forth; fcfs preempts nobody for b."""
    for policy in ("fair", "fcfs"):
        sched = scheduler(max_num_seqs=4, policy=policy)  # type: ignore[arg-type]
        a = [of("a", make_seq(f"a{i}", max_tokens=50, first=100 * i)) for i in range(4)]
        for seq in a:
            sched.add(seq)
        run_step(sched)
        b = [of("b", make_seq(f"b{i}", max_tokens=50, first=1000 + 100 * i)) for i in range(3)]
        for seq in b:
            sched.add(seq)
        batch = run_step(sched)
        if policy == "fcfs":
            assert not batch.admitted and sched.num_preemptions == 0
            continue
        assert batch.admitted == [b[0]] and [s.request_id for s in sched.waiting] == [
            "a3",
            "b1",
            "b2",
        ]
        assert run_step(sched).admitted == [b[1]] and a[2].status is SequenceStatus.WAITING
        for _ in range(3):
            assert not run_step(sched).admitted
        assert sched.num_preemptions == 2
        assert sorted(s.request_id for s in sched.running) == ["a0", "a1", "b0", "b1"]


@pytest.mark.parametrize(("b_prompt", "waiting"), [(12, 1), (24, 2), (40, 3), (52, 0)])
def test_fair_policy_takes_places_only_while_the_shares_stay_in_order(
    b_prompt: int, waiting: int
) -> None:
    """b's prompt needs the KV blocks of one or more of a's four: a's newest go, one at a
    time, while a keeps at least as many running as b will (4 -> 1 at most, for b's 1); when
    even that is not enough for b, nobody is preempted. The places do not go back: a's wait
    while b runs."""
    sched = scheduler(num_blocks=16, caching=False, policy="fair", max_num_seqs=8)
    a = [of("a", make_seq(f"a{i}", 12, max_tokens=200, first=100 * i)) for i in range(4)]
    for seq in a:
        sched.add(seq)
    run_step(sched)  # 3 blocks each: 12 of 16, and each needs a fourth for its next token
    b = of("b", make_seq("b", b_prompt, max_tokens=5, first=1000))
    sched.add(b)
    admitted = [run_step(sched).admitted for _ in range(3)]
    assert sched.num_preemptions == waiting
    if waiting:
        assert admitted == [[b], [], []] and b.status is SequenceStatus.RUNNING
        assert [s.request_id for s in sched.waiting] == [f"a{i}" for i in range(4 - waiting, 4)]
    else:
        assert sched.waiting == [b]


def test_expire_waiting_spares_preempted_sequences() -> None:
    sched = scheduler(max_num_seqs=1, queue_timeout_s=5)
    first, second = make_seq("first"), make_seq("second")
    sched.add(first)
    sched.add(second)
    run_step(sched)
    assert sched.expire_waiting(now=second.arrival_time + 1) == []
    assert sched.expire_waiting(now=second.arrival_time + 6) == [second]
    assert not sched.waiting and sched.running == [first]
    assert first.is_admitted  # (admitted by the step: it no longer times out waiting)
    sched.waiting.append(first)
    assert sched.expire_waiting(now=first.arrival_time + 100) == []


@pytest.mark.parametrize(("policy", "order"), [("priority", "cdb"), ("fcfs", "bcd")])
def test_the_queue_is_served_by_priority_under_the_priority_policy(policy: str, order: str) -> None:
    sched = scheduler(max_num_seqs=1, policy=policy)
    a = make_seq("a", first=0)
    sched.add(a)
    run_step(sched)
    for name, priority in (("b", 5), ("c", 1), ("d", 1)):
        sched.add(make_seq(name, first=100 * ord(name), priority=priority))
    admitted = ""
    sched.remove(a)
    while sched.waiting:
        (seq,) = run_step(sched).admitted
        admitted += seq.request_id
        sched.remove(seq)
    assert admitted == order


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_a_request_that_outranks_a_running_one_takes_its_place(policy: str) -> None:
    """(By max_num_seqs here; by KV blocks below.) The preempted one is recomputed, prompt
    and outputs, once the other is done."""
    sched = scheduler(max_num_seqs=1, policy=policy)
    low = make_seq("low", max_tokens=20, priority=3)
    sched.add(low)
    run_step(sched)
    run_step(sched)
    high = make_seq("high", first=50, priority=-1)
    sched.add(high)
    batch = run_step(sched)
    if policy == "fcfs":  # priorities are not looked at
        assert scheduled(batch) == {"low": 1} and sched.num_preemptions == 0
        return
    assert scheduled(batch) == {"high": 10} and sched.waiting == [low]
    assert low.status is SequenceStatus.WAITING and low.num_preemptions == 1
    sched.remove(high)
    # its 10 prompt + 2 output tokens again: the first two blocks from the prefix cache
    assert scheduled(run_step(sched)) == {"low": 4}


def test_outranking_needs_a_strictly_higher_priority() -> None:
    sched = scheduler(max_num_seqs=1, policy="priority")
    sched.add(make_seq("first", priority=2))
    run_step(sched)
    sched.add(make_seq("second", first=50, priority=2))
    assert scheduled(run_step(sched)) == {"first": 1} and sched.num_preemptions == 0


def test_a_request_short_of_kv_blocks_preempts_lower_ranked_ones() -> None:
    sched = scheduler(num_blocks=6, caching=False, policy="priority")
    low_old = make_seq("low_old", 8, max_tokens=20, priority=1)
    low_new = make_seq("low_new", 8, max_tokens=20, first=50, priority=1)
    sched.add(low_old)
    sched.add(low_new)
    run_step(sched)  # 2 + 2 blocks of 6
    high = make_seq("high", 12, first=90, priority=0)  # 3 blocks: one running one must go
    sched.add(high)
    batch = run_step(sched)
    assert scheduled(batch) == {"low_old": 1, "high": 12}
    assert sched.waiting == [low_new] and sched.num_preemptions == 1


def test_memory_pressure_preempts_the_lowest_ranked_first() -> None:
    """Out of blocks while decoding: the victim is the lowest-ranked sequence, even if it was
    admitted first (under fcfs: the newest, test_out_of_blocks_preempts_the_newest...)."""
    sched = scheduler(num_blocks=6, caching=False, policy="priority")
    low = make_seq("low", 8, max_tokens=20, priority=1)
    high = make_seq("high", 8, max_tokens=20, first=50, priority=0)
    sched.add(low)
    sched.add(high)
    run_step(sched)  # high first (it ranks above), then low
    for _ in range(4):
        run_step(sched)
    assert sched.blocks.num_free_blocks == 0 and sched.num_preemptions == 0
    run_step(sched)
    assert sched.num_preemptions == 1 and sched.waiting == [low]
    assert high.status is SequenceStatus.RUNNING


def assert_batch_is_runnable(sched: Scheduler, batch: ScheduledBatch) -> None:
    """Every sequence in a step is running and holds a block for each token it will have."""
    for seq, num in zip(batch.seqs, batch.num_new_tokens, strict=True):
        assert seq.status is SequenceStatus.RUNNING, seq.request_id
        needed = seq.num_computed_tokens + num
        assert len(seq.block_table) * BLOCK >= needed, seq.request_id


@pytest.mark.parametrize("low_prompt", [3, 4, 5, 7])
def test_a_victim_already_in_the_step_leaves_it(low_prompt: int) -> None:
    """Memory pressure under the priority policy preempts the lowest-ranked sequence, which
    may have been scheduled earlier in the same step: it leaves the batch (it was a step with
    a preempted sequence and no blocks in it)."""
    sched = scheduler(num_blocks=4, caching=False, policy="priority")
    low = make_seq("low", low_prompt, max_tokens=20, priority=5)
    sched.add(low)
    run_step(sched)
    sched.add(make_seq("high", 5, max_tokens=20, first=50, priority=0))
    for _ in range(12):
        batch = sched.schedule()
        assert_batch_is_runnable(sched, batch)
        sampled = batch.sampled
        sched.commit(batch)
        for seq in sampled:
            seq.output_token_ids.append(7)
        if sched.num_preemptions:
            assert low not in batch.seqs or low.status is SequenceStatus.RUNNING


def test_nobody_is_preempted_in_vain() -> None:
    """A waiting sequence that would not fit even in the place of every lower-ranked one
    preempts none of them."""
    sched = scheduler(num_blocks=10, caching=False, policy="priority")
    mid = make_seq("mid", 20, max_tokens=20, priority=0)  # 5 blocks, a 6th for its next token
    low = make_seq("low", 8, max_tokens=20, first=100, priority=5)  # 2, a 3rd for its next
    sched.add(mid)
    sched.add(low)
    run_step(sched)
    # 5 blocks: with low gone, 3 free + 2 freed - 1 for mid's next token = 4
    sched.add(make_seq("high", 20, max_tokens=20, first=200, priority=0))
    run_step(sched)
    assert sched.num_preemptions == 0 and low.status is SequenceStatus.RUNNING


def test_a_preempted_sequence_goes_ahead_of_one_that_arrived_with_it() -> None:
    """(fcfs as it was: a preempted sequence goes to the front of the queue.)"""
    sched = scheduler(num_blocks=64, max_num_seqs=1)
    a, b = make_seq("a"), make_seq("b", first=50)
    b.arrival_time = a.arrival_time
    sched.add(a)
    sched.add(b)
    run_step(sched)
    sched._preempt(a)
    assert [s.request_id for s in sched.waiting] == ["a", "b"]


def test_nobody_is_preempted_for_a_request_the_step_has_no_tokens_for() -> None:
    """The running prompt's chunk takes the step's whole token budget: the waiting request
    could not be admitted in this step, so the lower-ranked one keeps its place until a step
    has room for it."""
    sched = scheduler(max_num_seqs=2, policy="priority", max_num_batched_tokens=8)
    low = make_seq("low", 4, max_tokens=20, priority=5)
    sched.add(low)
    run_step(sched)
    long_prompt = make_seq("long", 40, max_tokens=5, first=100, priority=0)
    sched.add(long_prompt)
    run_step(sched)  # admitted beside low: a chunk of its prompt, and low's decode
    sched.add(make_seq("high", 4, max_tokens=5, first=300, priority=0))
    batch = run_step(sched)  # long's next chunk (7) + low's decode (1): the whole budget
    assert sched.num_preemptions == 0 and scheduled(batch) == {"low": 1, "long": 7}
    while long_prompt.is_prefilling:
        run_step(sched)
    batch = run_step(sched)  # now there are tokens left for it: low makes way
    assert sched.num_preemptions == 1 and "high" in scheduled(batch)
