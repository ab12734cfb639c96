"""The engine loop on the tiny Qwen2-VL checkpoint (loaded by the real loader, its real runner,
greedy): batching within max_num_seqs, when the host reads a step's tokens, sequences that end
or fail while a step is in flight. What each answer must be is the same request's answer run
alone; a spy on the runner records what every step scheduled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from server.config import Settings
from server.engine.block_manager import BlockManager
from server.engine.detokenizer import IncrementalDetokenizer as Detokenizer
from server.engine.engine import AsyncEngine
from server.engine.inputs import InputBuilder, ModelInputs
from server.engine.loader import LoadedModel, load_model
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from server.engine.sequence import Sequence

pytestmark = pytest.mark.anyio
BLOCK = 4


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(Settings(model=str(tiny_model_dir)).engine_config())


@pytest.fixture(scope="module")
def prompts(loaded: LoadedModel) -> dict[str, ModelInputs]:
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    texts = {"a": "a", "b": "b", "c": "c", "d": "d", "s": "b", "p": "p", "q": "q"}
    return {
        name: builder.build([{"role": "user", "content": [{"type": "text", "text": text}]}], [])
        for name, text in texts.items()
    }


class SpyRunner(ModelRunner):
    """The real runner; it records what each step scheduled: {request id: new tokens}."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.steps: list[dict[str, int]] = []

    def forward(self, batch: ScheduledBatch, sampled: list[Sequence]) -> torch.Tensor | None:
        pairs = zip(batch.seqs, batch.num_new_tokens, strict=True)
        self.steps.append({seq.request_id: n for seq, n in pairs})
        return super().forward(batch, sampled)


def engine_of(
    loaded: LoadedModel,
    async_scheduling: bool,
    *,
    max_num_seqs: int = 4,
    num_blocks: int = 64,
    caching: bool = True,
) -> tuple[AsyncEngine, SpyRunner, Scheduler]:
    runner = SpyRunner(loaded, num_blocks, BLOCK, 0, fused_decoder=False)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=256,
        max_queued_requests=100,
        queue_timeout_s=60.0,
    )
    sched = Scheduler(config, BlockManager(num_blocks, BLOCK, caching))
    engine = AsyncEngine(runner, sched, loaded.tokenizer, 512, 16, async_scheduling)
    return engine, runner, sched


async def answer(engine: AsyncEngine, name: str, inputs: ModelInputs, **params: object):
    seq = engine.add_request(name, inputs, SamplingParams(temperature=0, **params))  # type: ignore[arg-type]
    text = "".join([out.text_delta async for out in engine.stream(seq)])
    return seq, text


async def alone(loaded: LoadedModel, inputs: ModelInputs, **params: object):
    """The request's answer with the engine to itself: (token ids, text)."""
    engine, _, _ = engine_of(loaded, False)
    engine.start()
    seq, text = await answer(engine, "alone", inputs, **params)
    await engine.stop()
    return seq.output_token_ids, text


def all_blocks_free(sched: Scheduler) -> bool:
    return sched.blocks.num_free_blocks == sched.blocks.num_blocks


async def a_stop_string(loaded: LoadedModel, inputs: ModelInputs, at: int) -> tuple[str, str]:
    """A stop string that the answer's token `at` completes, and the text before it."""
    ids, _ = await alone(loaded, inputs, max_tokens=at + 1)
    before = loaded.tokenizer.decode(ids[:at])
    piece = loaded.tokenizer.decode(ids[: at + 1])[len(before) :]
    # (the checkpoint is built from a fixed seed: token `at` of this prompt is a whole word)
    assert piece.strip() and "\ufffd" not in piece and piece not in before, (ids, piece)
    return piece, before


async def test_steps_batch_within_max_num_seqs_and_answers_are_each_alone(
    loaded: LoadedModel, prompts: dict[str, ModelInputs], async_scheduling: bool
) -> None:
    lengths = {"a": 2, "b": 6, "c": 4, "d": 3}
    expected = {n: await alone(loaded, prompts[n], max_tokens=k) for n, k in lengths.items()}
    engine, runner, sched = engine_of(loaded, async_scheduling, max_num_seqs=3)
    engine.start()
    done = await asyncio.gather(
        *(answer(engine, n, prompts[n], max_tokens=k) for n, k in lengths.items())
    )
    await engine.stop()
    for (seq, text), name in zip(done, lengths, strict=True):
        assert (seq.output_token_ids, text) == expected[name]
        assert seq.finish_reason == "length"
    assert max(len(step) for step in runner.steps) == 3  # never above max_num_seqs
    assert any("d" in step for step in runner.steps) and "d" not in runner.steps[0]
    assert all_blocks_free(sched)


async def test_tokens_are_read_while_the_next_step_runs(
    loaded: LoadedModel,
    prompts: dict[str, ModelInputs],
    async_scheduling: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Token v comes from step v + 1 (step 1 is the prefill). With async scheduling the host
    reads it (and makes its text) during step v + 2, after that step was queued on the device;
    without, at the end of its own step. A stop string found during step v + 2 ends the
    sequence: the token that step computed is dropped and the blocks go back."""
    stop, before = await a_stop_string(loaded, prompts["s"], at=3)
    expected, _ = await alone(loaded, prompts["s"], max_tokens=4)
    engine, runner, sched = engine_of(loaded, async_scheduling)
    read_at: list[int] = []  # the number of steps begun when token v was read
    add_token = Detokenizer.add_token

    def spied(self: Detokenizer, token_id: int, check_stop: bool = True) -> str | None:
        read_at.append(len(runner.steps))
        return add_token(self, token_id, check_stop)

    monkeypatch.setattr(Detokenizer, "add_token", spied)
    engine.start()
    seq, text = await answer(engine, "s", prompts["s"], max_tokens=10, stop=[stop])
    await engine.stop()
    assert text == before
    assert seq.finish_reason == "stop" and seq.stop_reason == stop
    assert seq.output_token_ids == expected  # not the 5th step's token
    lag = 2 if async_scheduling else 1
    assert read_at == [v + lag for v in range(4)]
    assert len(runner.steps) == 3 + lag
    assert all_blocks_free(sched)


async def test_a_sequence_at_max_tokens_is_not_scheduled_past_it(
    loaded: LoadedModel, prompts: dict[str, ModelInputs], async_scheduling: bool
) -> None:
    """With async scheduling too, a sequence whose token on its way is its last is left out of
    the next step (its KV slot, and a new block, would be wasted)."""
    engine, runner, sched = engine_of(loaded, async_scheduling)
    engine.start()
    seq, _ = await answer(engine, "a", prompts["a"], max_tokens=3)
    await engine.stop()
    assert seq.finish_reason == "length" and len(seq.output_token_ids) == 3
    assert len(runner.steps) == 3  # prefill and two decodes: none past the third token
    assert all_blocks_free(sched)


async def test_a_failed_step_fails_every_sequence_with_a_token_in_flight(
    loaded: LoadedModel,
    prompts: dict[str, ModelInputs],
    async_scheduling: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A step that raises while reading tokens fails the sequences whose tokens were on their
    way: with async scheduling, a sequence preempted in that step (waiting, not running)
    included: none is left waiting for a token that never comes (it would run on, then fail a
    later step). Without, the preempted one had no token on its way: it runs on, recomputed,
    to its own answer. The engine goes on with the next request."""
    prompt_blocks = -(-prompts["a"].num_prompt_tokens // BLOCK)
    # two prompts fill the cache (no prefix sharing): the first block either needs preempts
    engine, runner, sched = engine_of(
        loaded, async_scheduling, num_blocks=2 * prompt_blocks, caching=False
    )
    failed_at: list[int] = []
    add_token = Detokenizer.add_token

    def failing(self: Detokenizer, token_id: int, check_stop: bool = True) -> str | None:
        if sched.num_preemptions and not failed_at:
            failed_at.append(len(runner.steps))
            raise RuntimeError("injected")
        return add_token(self, token_id, check_stop)

    later_expected = await alone(loaded, prompts["c"], max_tokens=4)
    alone_answers = [await alone(loaded, prompts[n], max_tokens=8) for n in "ab"]
    monkeypatch.setattr(Detokenizer, "add_token", failing)
    engine.start()
    seqs = await asyncio.gather(*(answer(engine, n, prompts[n], max_tokens=8) for n in "ab"))
    later, text = await answer(engine, "c", prompts["c"], max_tokens=4)
    await engine.stop()
    assert failed_at and sched.num_preemptions == 1
    assert caplog.text.count("engine step failed") == 1
    if async_scheduling:
        assert [seq.finish_reason for seq, _ in seqs] == ["error", "error"]
        assert not any("a" in step or "b" in step for step in runner.steps[failed_at[0] :])
    else:
        failed, survivor = sorted(seqs, key=lambda done: done[0].finish_reason != "error")
        assert failed[0].finish_reason == "error" and survivor[0].finish_reason == "length"
        assert survivor[0].num_preemptions == 1
        assert (survivor[0].output_token_ids, survivor[1]) in alone_answers
    assert later.finish_reason == "length" and (later.output_token_ids, text) == later_expected
    assert all_blocks_free(sched)


async def test_a_sequence_stopped_in_flight_leaves_the_others_rows_in_place(
    loaded: LoadedModel, prompts: dict[str, ModelInputs], async_scheduling: bool
) -> None:
    """The stop string of "s" is found while the next step runs (with async scheduling): that
    step's row of "s" is dropped before sampling, and every other sequence still samples its
    own row: each answer is what it is alone."""
    stop, before = await a_stop_string(loaded, prompts["s"], at=3)
    expected = {n: await alone(loaded, prompts[n], max_tokens=6) for n in "pq"}
    engine, _, sched = engine_of(loaded, async_scheduling)
    engine.start()
    (s, s_text), *others = await asyncio.gather(
        answer(engine, "s", prompts["s"], max_tokens=6, stop=[stop]),
        *(answer(engine, n, prompts[n], max_tokens=6) for n in "pq"),
    )
    await engine.stop()
    assert s_text == before and s.finish_reason == "stop" and len(s.output_token_ids) == 4
    assert {seq.request_id: (seq.output_token_ids, text) for seq, text in others} == expected
    assert all_blocks_free(sched)
