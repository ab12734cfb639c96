"""Priority scheduling benchmark: interactive requests on a server whose batch is full of
long background requests (async jobs' kind of load), first come first served against
--scheduling-policy priority (the background ones at priority 1, as --job-priority puts jobs)
and --scheduling-policy fair (the background requests under one API key, the short ones
under another: their projects share the batch).

    python scripts/bench_priority.py                       # CPU, bench-sized random checkpoint
    python scripts/bench_priority.py --device cuda --checkpoint models/qwen2-vl-2b-random

For each policy a real `vlm-server serve` process with --max-num-seqs N; N clients keep N
long requests running; short requests are then sent one at a time: their p50 latency and time
to first token, against the same short requests on the idle server. Under fcfs a short
request waits for a long one to finish; under priority it takes a long one's place. With
--background-clients above --max-num-seqs the long requests also queue: under fcfs a short
one waits behind them all; under fair it takes the place of the background key's newest.

Prints a markdown table (paste it into docs/BENCHMARKS.md) and writes --json if given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_scheduler import (  # noqa: E402  (a sibling script)
    BENCH_SPEC,
    against_server,
    one_request,
    request_body,
)

# The API keys of the background requests' project and the short ones' (every policy runs
# with both, so that only the policy differs).
BACKGROUND_KEY, SHORT_KEY = "bench-background", "bench-short"


async def drive(port: int, args: argparse.Namespace, background_priority: int | None) -> dict:
    limits = httpx.Limits(max_connections=64)
    base, timeout = f"http://127.0.0.1:{port}", httpx.Timeout(600)
    async with (
        httpx.AsyncClient(
            base_url=base, timeout=timeout, limits=limits, headers=auth(SHORT_KEY)
        ) as client,
        httpx.AsyncClient(
            base_url=base, timeout=timeout, limits=limits, headers=auth(BACKGROUND_KEY)
        ) as background,
    ):
        await one_request(client, request_body(0, 4, args.image_size))  # warm up
        shorts = [request_body(1000 + i, args.short_tokens, args.image_size) for i in range(8)]
        idle = [await one_request(client, body) for body in shorts]
        stop = asyncio.Event()

        async def keep_busy(i: int) -> None:
            body = request_body(2000 + i, args.long_tokens, args.image_size)
            if background_priority is not None:
                body["priority"] = background_priority
            while not stop.is_set():
                await one_request(background, body)

        clients = args.background_clients or args.max_num_seqs
        busy = [asyncio.create_task(keep_busy(i)) for i in range(clients)]
        await asyncio.sleep(args.fill_s)  # the long ones fill the batch
        loaded = [await one_request(client, body) for body in shorts]
        stop.set()
        await asyncio.gather(*busy)
    return {
        "idle_p50_s": statistics.median(r[0] for r in idle),
        "busy_p50_s": statistics.median(r[0] for r in loaded),
        "busy_p50_ttft_s": statistics.median(r[1] for r in loaded),
    }


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "bench-qwen2-vl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--fill-s", type=float, default=3.0)
    parser.add_argument(
        "--background-clients",
        type=int,
        default=0,
        help="clients keeping long requests going (default: --max-num-seqs)",
    )
    parser.add_argument("--policies", nargs="+", default=["fcfs", "priority", "fair"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").exists():
        from server.engine.tiny import TinySpec, make_tiny_checkpoint

        make_tiny_checkpoint(args.checkpoint, TinySpec(**BENCH_SPEC))
    rows = {}
    keys = ["--api-key", BACKGROUND_KEY, "--api-key", SHORT_KEY]
    for policy in args.policies:
        background = 1 if policy == "priority" else None
        # start_server sizes --max-num-seqs from these: the batch holds max_num_seqs
        server_args = argparse.Namespace(**vars(args), concurrency=[0], num_long=args.max_num_seqs)
        rows[policy] = against_server(
            args.checkpoint,
            server_args,
            lambda port, background=background: drive(port, args, background),
            ["--scheduling-policy", policy, *keys],
        )
    clients = args.background_clients or args.max_num_seqs
    print(
        f"| policy | short p50 s, idle | short p50 s, {clients} long ones going "
        f"({args.max_num_seqs} places) | x idle | short p50 TTFT s, busy |"
    )
    print("| --- | --- | --- | --- | --- |")
    for policy, r in rows.items():
        print(
            f"| {policy} | {r['idle_p50_s']:.2f} | {r['busy_p50_s']:.2f} | "
            f"{r['busy_p50_s'] / r['idle_p50_s']:.2f} | {r['busy_p50_ttft_s']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
