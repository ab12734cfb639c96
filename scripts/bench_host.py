"""Host work of the engine loop per decode step, outside the model: what async scheduling
overlaps with the device.

    python scripts/bench_host.py                   # batch 1, 16, 64; greedy and mixed sampling
    VLM_CODE_ROOT=/path/to/old/checkout python scripts/bench_host.py   # the same, older code

The whole engine loop (its thread, scheduler, runner, detokenizer, streaming) over
bench_step.py's model: Qwen2-VL's depth (28 layers) and vocabulary, 64 wide, so the model's
arithmetic is small. Decode steps go through the CUDA-graph buffers (what a GPU with graphs
runs; on a CPU the padded step is computed, not replayed). Per decode step, the median
milliseconds of: `schedule`; `inputs` (the step's inputs built and copied to the device, part
of `forward`); `forward` (the step queued; on a CPU it is also computed); `receive` (the
previous tokens appended, stop checks, detokenized, streamed out); `commit`; `sample` (queued;
on a CPU also computed). Without async scheduling a GPU waits for schedule + inputs + receive +
commit (and the host part of sample) on every step; with it they run while the device
computes the previous step.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, os.environ.get("VLM_CODE_ROOT", str(ROOT)))

import torch  # noqa: E402
from bench_step import PROMPT, SCHEMA, deep_narrow_model, sampling_for  # noqa: E402
from engine_step import run_requests  # noqa: E402

from server.config import Settings  # noqa: E402
from server.engine.engine import AsyncEngine  # noqa: E402
from server.engine.loader import LoadedModel  # noqa: E402

PARTS = ("schedule", "inputs", "forward", "receive", "commit", "sample")
# The host-only parts: what a GPU waits for on every step without async scheduling.
HOST = ("schedule", "inputs", "receive", "commit")


def timed(step: dict[str, float], name: str, call: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            step[name] = step.get(name, 0.0) + time.perf_counter() - started

    return wrapper


def measure(loaded: LoadedModel, mix: str, batch: int, max_tokens: int = 24) -> dict[str, float]:
    settings = Settings(
        model="bench",
        max_model_len=PROMPT + max_tokens + 16,
        max_num_seqs=batch,
        enforce_eager=False,
    )
    engine = AsyncEngine.build(loaded, settings.engine_config())
    engine.runner.grammars.compile(SCHEMA)
    steps: list[dict[str, float]] = []
    current: dict[str, float] = {}
    schedule = engine.scheduler.schedule

    def scheduling() -> Any:
        nonlocal current
        current = {}
        steps.append(current)
        started = time.perf_counter()
        scheduled = schedule()
        current["schedule"] = time.perf_counter() - started
        current["decode_only"] = float(
            len(scheduled.seqs) == batch and all(n == 1 for n in scheduled.num_new_tokens)
        )
        return scheduled

    engine.scheduler.schedule = scheduling  # type: ignore[method-assign]
    graphs = engine.runner.graphs
    for name, owner, attr in (
        ("inputs", engine.runner, "_graph_decodes"),
        ("inputs", graphs, "fill"),
        ("inputs", engine.runner, "_hand_off"),
        ("inputs", engine.runner, "_prepare"),
        ("forward", engine.runner, "forward"),
        ("receive", engine, "_receive"),
        ("commit", engine.scheduler, "commit"),
        ("sample", engine.runner, "sample"),
    ):
        original = getattr(owner, attr)
        setattr(owner, attr, lambda *a, _n=name, _o=original, **k: timed(current, _n, _o)(*a, **k))

    generator = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, 4096, (1, PROMPT), generator=generator) for _ in range(batch)]
    params = [dataclasses.replace(p, max_tokens=max_tokens) for p in sampling_for(mix, batch)]
    asyncio.run(run_requests(engine, prompts, params))
    decodes = [s for s in steps if s.get("decode_only")][2:]  # the first ones warm up
    return {part: statistics.median(s.get(part, 0.0) for s in decodes) * 1000 for part in PARTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    torch.set_num_threads(1)  # host cost, not intra-op parallelism
    loaded = deep_narrow_model()
    print("| mix | batch | " + " | ".join(f"{p} ms" for p in PARTS) + " | host-only ms |")
    print("| --- " * (len(PARTS) + 3) + "|")
    for mix in ("greedy", "mixed"):
        for batch in args.batches:
            row = measure(loaded, mix, batch)
            serial = sum(row[p] for p in HOST)
            cells = " | ".join(f"{row[p]:.2f}" for p in PARTS)
            print(f"| {mix} | {batch} | {cells} | {serial:.2f} |", flush=True)


if __name__ == "__main__":
    main()
