"""How the benchmarks drive the engine: one step without the engine's thread and queues
(`engine_step`), or requests through the whole running engine (`run_requests`)."""

from __future__ import annotations

from typing import Any


def engine_step(scheduler: Any, runner: Any) -> None:
    """Schedule, run (the sampled ids are the step's one host sync), commit, append tokens."""
    batch = scheduler.schedule()
    sampled = batch.sampled
    tokens = runner.run(batch, sampled)
    scheduler.commit(batch)
    for seq, token in zip(sampled, tokens, strict=True):
        seq.output_token_ids.append(token)


async def run_requests(engine: Any, prompts: list[Any], params: list[Any]) -> list[Any]:
    """Start the engine, add one request per prompt ([1, n] token ids) with its sampling
    params, stream every one to its end, stop the engine; returns the Sequences."""
    from server.engine.inputs import ModelInputs

    engine.start()
    seqs = [
        engine.add_request(f"r{i}", ModelInputs({"input_ids": ids}, ids.shape[1], 0), p)
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
    ]
    for seq in seqs:
        async for _ in engine.stream(seq):
            pass
    await engine.stop()
    return seqs
