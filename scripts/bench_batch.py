"""Batch API benchmark: the same image requests sent by a client over HTTP (as many at once as
the server's batch holds) and as one batch (POST /v1/files + /v1/batches, polled), side by
side on one real `vlm-server serve` process.

    python scripts/bench_batch.py                          # CPU, bench-sized random checkpoint
    python scripts/bench_batch.py --device cuda --checkpoint models/qwen2-vl-2b-random

What it shows: a batch's lines go through the app's own routes in-process, lines
--max-num-seqs at a time, so it should keep the engine as busy as the best HTTP client does
(wall time and generated tokens per second, the ratio of the two). Both runs decode
greedily with ignore_eos, so they generate the same number of tokens.

Prints a markdown table (paste it into docs/BENCHMARKS.md) and writes --json if given.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_scheduler import BENCH_SPEC, against_server, request_body  # noqa: E402


def bodies(args: argparse.Namespace) -> list[dict]:
    return [
        {
            **request_body(i, args.tokens, args.image_size, stream=False),
            "ignore_eos": True,
        }
        for i in range(args.requests)
    ]


async def over_http(client: httpx.AsyncClient, requests: list[dict], concurrency: int) -> dict:
    """Every request, `concurrency` at a time (a client keeping the engine's batch full)."""
    queue = iter(requests)
    tokens = 0

    async def work() -> None:
        nonlocal tokens
        for body in queue:
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    await asyncio.gather(*(work() for _ in range(concurrency)))
    return {"seconds": time.perf_counter() - started, "tokens": tokens}


async def as_batch(client: httpx.AsyncClient, requests: list[dict]) -> dict:
    """The same requests as one batch: upload, create, poll every 0.1 s until it ends."""
    lines = [
        json.dumps(
            {"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions", "body": b}
        )
        for i, b in enumerate(requests)
    ]
    started = time.perf_counter()
    upload = await client.post(
        "/v1/files",
        files={"file": ("bench.jsonl", io.BytesIO("\n".join(lines).encode()))},
        data={"purpose": "batch"},
    )
    upload.raise_for_status()
    body = {
        "input_file_id": upload.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    batch = (await client.post("/v1/batches", json=body)).json()
    while batch["status"] not in ("completed", "failed", "cancelled"):
        await asyncio.sleep(0.1)
        batch = (await client.get(f"/v1/batches/{batch['id']}")).json()
    seconds = time.perf_counter() - started
    assert batch["status"] == "completed", batch
    assert batch["request_counts"]["completed"] == len(requests), batch
    return {"seconds": seconds, "tokens": batch["usage"]["output_tokens"]}


async def drive(port: int, args: argparse.Namespace) -> dict:
    requests = bodies(args)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=httpx.Timeout(3600)
    ) as client:
        await over_http(client, requests[:2], 2)  # warm up
        http = await over_http(client, requests, args.max_num_seqs)
        batch = await as_batch(client, requests)
    return {"http": http, "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "bench-qwen2-vl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").exists():
        from server.engine.tiny import TinySpec, make_tiny_checkpoint

        make_tiny_checkpoint(args.checkpoint, TinySpec(**BENCH_SPEC))
    server_args = argparse.Namespace(**vars(args), concurrency=[args.max_num_seqs], num_long=0)
    rows = against_server(args.checkpoint, server_args, lambda port: drive(port, args))
    print(f"| how ({args.requests} image requests, {args.tokens} tokens each) | wall s | tok/s |")
    print("| --- | --- | --- |")
    for name, label in (
        ("http", f"HTTP client, {args.max_num_seqs} at a time"),
        ("batch", "one batch (upload, create, poll)"),
    ):
        r = rows[name]
        print(f"| {label} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:.1f} |")
    ratio = rows["batch"]["seconds"] / rows["http"]["seconds"]
    print(f"\nbatch wall time / HTTP client's: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
