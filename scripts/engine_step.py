"""One engine step as the benchmarks drive it, without the engine's thread and queues."""

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
