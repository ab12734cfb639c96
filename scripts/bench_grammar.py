"""Grammar guard benchmark: what one request with an ambiguous EBNF grammar costs the requests
beside it, with --max-grammar-ms-per-token at its default and off (0).

    python scripts/bench_grammar.py                       # CPU, bench-sized random checkpoint
    python scripts/bench_grammar.py --device cuda --checkpoint models/qwen2-vl-2b-random

A grammar is matched on the engine's thread, between decode steps. An ambiguous one (a text of
a's parses in more ways the longer it is) costs more CPU at every token, and every request in
the batch waits for it. For each setting a real `vlm-server serve` process: a plain streamed
request (greedy, `ignore_eos`) alone, then beside one request under the ambiguous grammar (its
end-of-text tokens biased out, so it keeps writing); p50 latency of the plain one both ways,
and what became of the grammar's request.

Prints a markdown table (paste it into docs/BENCHMARKS.md) and writes --json if given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_scheduler import BENCH_SPEC, against_server, one_request  # noqa: E402

# Every text of a's parses in more ways the longer it is.
AMBIGUOUS = 'root ::= x\nx ::= "a" | x x | x x x'


def plain_body(tokens: int) -> dict:
    return {
        "model": "bench",
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def ambiguous_body(tokens: int, enders: dict[int, int]) -> dict:
    return {
        "model": "bench",
        "messages": [{"role": "user", "content": "Write a's."}],
        "max_tokens": tokens,
        "guided_grammar": AMBIGUOUS,
        "logit_bias": enders,  # (a grammar, not min_tokens, decides when its text may end)
    }


async def drive(port: int, args: argparse.Namespace, enders: dict[int, int]) -> dict:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=httpx.Timeout(900)
    ) as client:
        await one_request(client, plain_body(4))  # warm up
        plain = plain_body(args.tokens)
        alone = [(await one_request(client, plain))[0] for _ in range(args.rounds)]

        async def grammar_request() -> tuple[int, float]:
            started = time.perf_counter()
            body = ambiguous_body(args.grammar_tokens, enders)
            response = await client.post("/v1/chat/completions", json=body)
            return response.status_code, time.perf_counter() - started

        beside, outcomes = [], []
        for _ in range(args.rounds):
            (latency, _, _), outcome = await asyncio.gather(
                one_request(client, plain), grammar_request()
            )
            beside.append(latency)
            outcomes.append(outcome)
    return {
        "alone_p50_s": statistics.median(alone),
        "beside_p50_s": statistics.median(beside),
        "grammar_status": outcomes[-1][0],
        "grammar_p50_s": statistics.median(o[1] for o in outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "bench-qwen2-vl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=256, help="the plain request's")
    parser.add_argument("--grammar-tokens", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").exists():
        from server.engine.tiny import TinySpec, make_tiny_checkpoint

        make_tiny_checkpoint(args.checkpoint, TinySpec(**BENCH_SPEC))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    enders = {tokenizer.convert_tokens_to_ids(t): -100 for t in ("<|im_end|>", "<|endoftext|>")}
    server_args = argparse.Namespace(**vars(args), concurrency=[2], num_long=0)
    rows = {}
    for budget in ("20", "0"):
        rows[budget] = against_server(
            args.checkpoint,
            server_args,
            lambda port: drive(port, args, enders),
            ["--max-grammar-ms-per-token", budget],
        )
    print(
        "| --max-grammar-ms-per-token | plain p50 s, alone | plain p50 s, beside the grammar "
        "| x alone | grammar request: status, p50 s |"
    )
    print("| --- | --- | --- | --- | --- |")
    for budget, r in rows.items():
        print(
            f"| {budget} | {r['alone_p50_s']:.2f} | {r['beside_p50_s']:.2f} | "
            f"{r['beside_p50_s'] / r['alone_p50_s']:.2f} | "
            f"{r['grammar_status']}, {r['grammar_p50_s']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
