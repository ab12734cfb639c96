"""Sampler cost per decode step: host time, tensor (aten) operations and host transfers.

    python scripts/bench_sampler.py
    VLM_CODE_ROOT=/path/to/old/checkout python scripts/bench_sampler.py   # the same, older code

For batch 1/16/64 and two mixes, `sample()` on random [batch, 151936] float32 logits (Qwen2-VL's
vocabulary) with 100 tokens already generated per row: "greedy" (every row argmax) and "mixed"
(rows cycle through temperature + top_p, top_k, frequency/presence penalties, repetition
penalty, a seed, plain temperature; one row under a json_schema grammar). Prints a markdown
table: median milliseconds, aten ops and host transfers (tolist/item/cpu/... calls) per call.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("VLM_CODE_ROOT", str(ROOT)))

import torch  # noqa: E402
from op_count import CountOps  # noqa: E402

from server.engine import sampler  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.structured import GrammarCache, StructuredOutput  # noqa: E402

VOCAB = 151936
TRANSFERS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__")
MIXED = [
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=40),
    SamplingParams(temperature=0.8, frequency_penalty=0.5, presence_penalty=0.5),
    SamplingParams(temperature=0.8, repetition_penalty=1.1),
    SamplingParams(temperature=0.9, seed=42),
    SamplingParams(temperature=1.0),
]


def make_state(params: SamplingParams, grammars: GrammarCache | None) -> sampler.SamplingState:
    """A state for whichever sampler version is loaded (their fields differ)."""
    fields = {f.name for f in dataclasses.fields(sampler.SamplingState)}
    prompt = list(range(10, 300))
    values = {
        "params": params,
        "generator": sampler.make_generator(params.seed, torch.device("cpu")),
        "output_token_ids": list(range(500, 600)),
    }
    if "prompt_seen" in fields:
        values["prompt_seen"] = sampler.prompt_seen(params, prompt, VOCAB, torch.device("cpu"))
    else:
        values["prompt_token_ids"] = torch.tensor(prompt)
    if params.structured is not None and grammars is not None:
        values["matcher"] = grammars.matcher(params.structured)
        values["grammars"] = grammars
    return sampler.SamplingState(**values)


def states_for(mix: str, batch: int, grammars: GrammarCache) -> list:
    if mix == "greedy":
        return [make_state(SamplingParams(temperature=0), None) for _ in range(batch)]
    states = [make_state(MIXED[i % len(MIXED)], grammars) for i in range(batch)]
    schema = StructuredOutput.json_schema(
        {"type": "object", "properties": {"a": {"type": "string"}}}
    )
    states[-1] = make_state(SamplingParams(temperature=0.7, structured=schema), grammars)
    return states


def measure(mix: str, batch: int, grammars: GrammarCache) -> dict:
    times, ops, transfers = [], [], []
    for _ in range(12):
        states = states_for(mix, batch, grammars)
        logits = torch.randn(batch, VOCAB)
        calls: Counter[str] = Counter()
        originals = {name: getattr(torch.Tensor, name) for name in TRANSFERS}
        for name, original in originals.items():
            setattr(torch.Tensor, name, _counting(original, name, calls))
        try:
            counter = CountOps()
            with counter:
                sampler.sample(logits.clone(), states)
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
        ops.append(counter.count)
        transfers.append(sum(calls.values()))
        states = states_for(mix, batch, grammars)
        started = time.perf_counter()
        sampler.sample(logits, states)
        times.append(time.perf_counter() - started)
    return {
        "ms": round(statistics.median(times[2:]) * 1000, 2),
        "ops": statistics.median(ops),
        "transfers": statistics.median(transfers),
    }


def _counting(original, name: str, calls: Counter):
    def counted(self, *args, **kwargs):
        calls[name] += 1
        return original(self, *args, **kwargs)

    return counted


def main() -> None:
    from transformers import AutoTokenizer

    from server.engine.tiny import make_tiny_checkpoint

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "t"))
    grammars = GrammarCache(tokenizer, VOCAB, (tokenizer.eos_token_id,))
    print(f"code: {Path(sampler.__file__).parents[2]}")
    print("| mix | batch | ms per step | aten ops per step | host transfers per step |")
    print("| --- | --- | --- | --- | --- |")
    for mix in ("greedy", "mixed"):
        for batch in (1, 16, 64):
            row = measure(mix, batch, grammars)
            print(
                f"| {mix} | {batch} | {row['ms']} | {row['ops']} | {row['transfers']} |", flush=True
            )


if __name__ == "__main__":
    main()
