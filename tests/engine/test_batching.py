"""Continuous batching with a real tiny checkpoint: a request's output does not depend on what
else shares its batch (greedy and seeded), requests join mid-flight, slots are reused."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from server.config import Settings
from server.engine.engine import MAX_JOINED_TOKENS, AsyncEngine
from server.engine.inputs import InputBuilder, ModelInputs
from server.engine.loader import LoadedModel
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence, SequenceOutput
from server.exceptions import EngineOverloaded
from server.jobs.project import project_var
from server.pipelines.choices import add_choices, merged
from tests.helpers import make_image

pytestmark = pytest.mark.anyio


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(make_image(width, height, seed=seed)))


@pytest.fixture(scope="module")
def prompts(loaded: LoadedModel) -> list[ModelInputs]:
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)

    def user(*parts: dict) -> list[dict]:
        return [{"role": "user", "content": list(parts)}]

    img, text = {"type": "image"}, lambda t: {"type": "text", "text": t}
    return [
        builder.build(user(img, text("What is this?")), [image(96, 64)]),
        builder.build(user(text("Hi")), []),
        builder.build(
            user(img, img, text("Compare them.")), [image(200, 150, 1), image(56, 112, 2)]
        ),
        builder.build(
            [{"role": "system", "content": "Be brief. " * 30}, *user(text("A long prompt " * 40))],
            [],
        ),
        builder.build(user(text("Describe"), img), [image(300, 120, 3)]),
    ]


def make_engine(loaded: LoadedModel, **settings: object) -> AsyncEngine:
    values = {"model": "unused", "max_model_len": 2048, "default_max_tokens": 16, **settings}
    return AsyncEngine.build(loaded, Settings(**values).engine_config())


async def collect(engine: AsyncEngine, seq) -> list[int]:
    async for _ in engine.stream(seq):
        pass
    return list(seq.output_token_ids)


async def run_alone(loaded, prompts, samplings) -> list[list[int]]:
    engine = make_engine(loaded)
    engine.start()
    outputs = []
    for i, (prompt, sampling) in enumerate(zip(prompts, samplings, strict=True)):
        outputs.append(await collect(engine, engine.add_request(f"alone-{i}", prompt, sampling)))
    await engine.stop()
    return outputs


async def run_batched(loaded, prompts, samplings, join_late: int) -> list[list[int]]:
    """All requests at once, except the last `join_late`, which join once decoding is under way."""
    engine = make_engine(loaded)
    engine.start()
    early = len(prompts) - join_late
    seqs = [engine.add_request(f"b-{i}", prompts[i], samplings[i]) for i in range(early)]
    tasks = [asyncio.create_task(collect(engine, s)) for s in seqs]
    while not any(len(s.output_token_ids) >= 3 for s in seqs):
        await asyncio.sleep(0.001)
    late = [
        engine.add_request(f"b-{i}", prompts[i], samplings[i]) for i in range(early, len(prompts))
    ]
    tasks += [asyncio.create_task(collect(engine, s)) for s in late]
    outputs = await asyncio.gather(*tasks)
    await engine.stop()
    assert engine.scheduler.peak_num_running >= 3  # really batched
    return outputs


async def test_greedy_output_is_the_same_alone_and_in_a_mixed_batch(loaded, prompts) -> None:
    # Different lengths so sequences finish (and free slots) at different steps.
    samplings = [SamplingParams(max_tokens=n, temperature=0) for n in (24, 6, 30, 12, 18)]
    alone = await run_alone(loaded, prompts, samplings)
    batched = await run_batched(loaded, prompts, samplings, join_late=2)
    assert batched == alone
    assert [len(o) for o in alone] == [24, 6, 30, 12, 18] or any(
        o[-1] in loaded.eos_token_ids for o in alone
    )


async def test_seeded_sampling_is_the_same_alone_and_batched(loaded, prompts) -> None:
    samplings = [
        SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=40, seed=100 + i)
        for i in range(len(prompts))
    ]
    alone = await run_alone(loaded, prompts, samplings)
    batched = await run_batched(loaded, prompts, samplings, join_late=1)
    assert batched == alone


async def test_penalties_and_min_tokens(loaded, prompts) -> None:
    engine = make_engine(loaded)
    engine.start()
    plain = await collect(
        engine, engine.add_request("p", prompts[1], SamplingParams(max_tokens=24, temperature=0))
    )
    penalised = await collect(
        engine,
        engine.add_request(
            "q", prompts[1], SamplingParams(max_tokens=24, temperature=0, frequency_penalty=2.0)
        ),
    )
    eos = next(iter(loaded.eos_token_ids))
    sampling = SamplingParams(
        max_tokens=10, temperature=0, min_tokens=10, stop_token_ids=(plain[0],)
    )
    forced = await collect(engine, engine.add_request("r", prompts[1], sampling))
    await engine.stop()
    assert penalised != plain
    assert len(set(penalised)) >= len(set(plain))
    assert len(forced) == 10 and plain[0] not in forced and eos not in forced


async def test_more_requests_than_slots_queue_and_all_finish(loaded, prompts) -> None:
    engine = make_engine(loaded, max_num_seqs=2)
    engine.start()
    seqs = [
        engine.add_request(
            f"r{i}", prompts[i % len(prompts)], SamplingParams(max_tokens=5, temperature=0)
        )
        for i in range(7)
    ]
    outputs = await asyncio.gather(*(collect(engine, s) for s in seqs))
    await engine.stop()
    assert all(len(o) == 5 or o[-1] in loaded.eos_token_ids for o in outputs)
    assert engine.scheduler.running == [] and engine.num_queued == 0


async def test_full_queue_is_refused_with_retry_after(loaded, prompts) -> None:
    engine = make_engine(loaded, max_num_seqs=1, max_queued_requests=2)
    engine.start()
    sampling = SamplingParams(max_tokens=400, temperature=0)
    first = engine.add_request("a", prompts[1], sampling)
    while not first.is_admitted:  # wait until it runs, so it no longer counts as queued
        await asyncio.sleep(0.001)
    engine.add_request("b", prompts[1], sampling)
    engine.add_request("c", prompts[1], sampling)
    with pytest.raises(EngineOverloaded) as info:
        engine.add_request("d", prompts[1], sampling)
    assert info.value.status_code == 503 and info.value.retry_after_s >= 1
    await engine.stop()


@pytest.mark.parametrize("policy", ["fair", "fcfs"])
async def test_under_fair_a_full_queue_still_takes_a_project_below_its_share(
    loaded, prompts, policy: str
) -> None:
    """Project A's burst fills the queue (2 places); under fair project B, which holds none
    of it, still gets its share (2 places / 2 projects: 1) and no more, and A no more at
    all; under fcfs B is refused as A is."""
    engine = make_engine(loaded, max_num_seqs=1, max_queued_requests=2, scheduling_policy=policy)
    engine.start()
    sampling = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)

    def add(project: str, request_id: str) -> None:
        reset = project_var.set(project)
        try:
            engine.check_capacity()  # (the pipelines' early check says the same)
            engine.add_request(request_id, prompts[1], sampling)
        finally:
            project_var.reset(reset)

    add("a", "a0")
    while engine.num_queued:  # a0 runs: the queue is empty again
        await asyncio.sleep(0.001)
    add("a", "a1")
    add("a", "a2")
    with pytest.raises(EngineOverloaded):
        add("a", "a3")
    if policy == "fcfs":
        with pytest.raises(EngineOverloaded):
            add("b", "b0")
    else:
        add("b", "b0")
        with pytest.raises(EngineOverloaded):
            add("b", "b1")
        with pytest.raises(EngineOverloaded):
            add("a", "a3")
        assert engine.num_queued == 3
    await engine.stop()


async def test_a_batch_larger_than_the_queue_enters_an_empty_queue(loaded, prompts) -> None:
    """Every frame of a video is one batch; a queue limit below the frame count must not refuse
    that video forever (an async job would retry it for ever)."""
    engine = make_engine(loaded, max_num_seqs=1, max_queued_requests=2)
    engine.start()
    sampling = SamplingParams(max_tokens=2, temperature=0)
    frames = engine.add_requests([(f"f{i}", prompts[0], sampling) for i in range(5)])
    with pytest.raises(EngineOverloaded):  # but nothing joins a queue already over its limit
        engine.add_requests([("g0", prompts[0], sampling)])
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request("f0", prompts[0], sampling)
    outputs = await asyncio.gather(*(collect(engine, s) for s in frames))
    await engine.stop()
    assert all(outputs)


async def test_queue_timeout(loaded, prompts) -> None:
    engine = make_engine(loaded, max_num_seqs=1, queue_timeout=0.05)
    engine.start()
    busy = engine.add_request("busy", prompts[1], SamplingParams(max_tokens=1500, temperature=0))
    waiting = engine.add_request("late", prompts[1], SamplingParams(max_tokens=2))
    outputs = [out async for out in engine.stream(waiting)]
    engine.abort(busy.request_id)
    await engine.stop()
    assert outputs[-1].finish_reason == "queue_timeout"
    assert waiting.num_completion_tokens == 0


async def test_a_reader_that_falls_behind_gets_what_piled_up_merged(loaded, prompts) -> None:
    """n choices read as one stream (merged) by a reader that stops after the first output:
    what piles up meanwhile waits in the sequences' queues, merged when read (a slow client
    holds a few outputs, not one per step per choice, and reads the same text)."""
    engine = make_engine(loaded)
    engine.start()
    sampling = SamplingParams(max_tokens=40, temperature=0.8, seed=3, ignore_eos=True)
    seqs = await add_choices(engine, "slow", prompts[1], sampling, 3)
    outputs = merged([engine.stream(seq) for seq in seqs])
    index, first = await anext(outputs)
    while not all(seq.is_finished for seq in seqs):
        await asyncio.sleep(0.01)
    # The engine's thread finishes a sequence before the event loop has its last outputs:
    # stopped (joined), every output is in its queue (read before, a late one was a piece more).
    await engine.stop()
    rest = [item async for item in outputs]
    assert all(len(seq.output_token_ids) == 40 for seq in seqs)
    # Held while the reader was away: n in merged's queue and one in each pump's hands; then
    # what piled up, joined in pieces of MAX_JOINED_TOKENS (an eager reader held all 120
    # steps' outputs).
    pieces = -(-40 // MAX_JOINED_TOKENS)
    assert len(rest) <= (2 + pieces) * len(seqs) < 40, len(rest)
    texts = ["" for _ in seqs]
    for i, output in [(index, first), *rest]:
        texts[i] += output.text_delta
    tokenizer = loaded.processor.tokenizer
    assert texts == [tokenizer.decode(s.output_token_ids, skip_special_tokens=True) for s in seqs]


async def test_a_reader_that_leaves_aborts_every_choice(loaded, prompts) -> None:
    """Closing the merged stream (a client that hung up) aborts every choice, also those whose
    output waits to be taken."""
    engine = make_engine(loaded)
    engine.start()
    sampling = SamplingParams(max_tokens=1000, ignore_eos=True)
    seqs = await add_choices(engine, "gone", prompts[1], sampling, 3)
    outputs = merged([engine.stream(seq) for seq in seqs])
    await anext(outputs)
    while not all(len(seq.output_token_ids) > 5 for seq in seqs):
        await asyncio.sleep(0.01)  # (every pump now holds an output it cannot put)
    await outputs.aclose()
    for _ in range(500):
        if all(seq.is_finished for seq in seqs):
            break
        await asyncio.sleep(0.01)
    await engine.stop()
    assert all(seq.is_aborted and len(seq.output_token_ids) < 1000 for seq in seqs)


async def test_a_backlog_comes_in_bounded_pieces(loaded, prompts) -> None:
    """What piled up for a reader that fell behind comes as one output per at most
    MAX_JOINED_TOKENS tokens (each is formatted in one go), the text whole."""
    engine = make_engine(loaded)  # (not started: the outputs are put here by hand)
    seq = Sequence("behind", prompts[1], SamplingParams(max_tokens=200), 200)
    for count in range(1, 201):
        seq.outputs.put_nowait(SequenceOutput(f"{count} ", count, finished=count == 200))
    outputs = [output async for output in engine.stream(seq)]
    counts = [output.num_completion_tokens for output in outputs]
    assert counts == [*range(MAX_JOINED_TOKENS, 200, MAX_JOINED_TOKENS), 200]
    assert "".join(o.text_delta for o in outputs) == "".join(f"{i} " for i in range(1, 201))
