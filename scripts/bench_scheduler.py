"""Continuous-batching benchmark: drives a running vlm-server over HTTP.

    python scripts/bench_scheduler.py                       # CPU, bench-sized random checkpoint
    python scripts/bench_scheduler.py --device cuda --checkpoint models/qwen2-vl-2b-random

1. Ceiling: one in-process batched `model.generate` over the same requests the server gets at
   the highest concurrency (measured first, with no server running).
2. A real `vlm-server serve` process; at each concurrency, that many clients send image requests
   that all produce exactly --tokens tokens (ignore_eos): output tokens/s, requests/s,
   p50/p99 latency, p50 time to first token.
3. Short among long: p50 latency of short requests while long ones keep the batch full, against
   the same short requests on an idle server.

Prints a markdown table (paste it into docs/BENCHMARKS.md) and writes --json if given.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T = TypeVar("T")
BENCH_SPEC = dict(  # hidden 512, 8 layers: big enough that compute matters on a CPU
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    intermediate_size=1376,
    vision_depth=4,
    vision_embed_dim=128,
    vision_heads=4,
)


def image_uri(seed: int, size: int) -> str:
    image = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, 128))
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


# --sampling mixed: requests cycle through these (bench_sampler.py's mix over HTTP); every 8th
# is under a json_schema instead (its answer ends when the JSON does).
MIXED_SAMPLING = [
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 1.0, "top_k": 40},
    {"temperature": 0.8, "frequency_penalty": 0.5, "presence_penalty": 0.5},
    {"temperature": 0.8, "repetition_penalty": 1.1},
    {"temperature": 0.9, "seed": 42},
    {"temperature": 1.0},
    {"temperature": 0.7, "top_p": 0.8, "top_k": 20},
]
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "caption",
        "schema": {"type": "object", "properties": {"caption": {"type": "string"}}},
    },
}


def sampling_fields(i: int, sampling: str) -> dict:
    if sampling == "greedy":
        return {"temperature": 0, "ignore_eos": True}
    if i % 8 == 7:
        return {"temperature": 0.7, "response_format": SCHEMA_FORMAT}
    return {**MIXED_SAMPLING[i % len(MIXED_SAMPLING)], "ignore_eos": True}


def request_body(
    i: int, tokens: int, image_size: int, stream: bool = True, sampling: str = "greedy"
) -> dict:
    return {
        "model": "bench",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_uri(i, image_size)}},
                    {"type": "text", "text": f"Describe image number {i} in detail."},
                ],
            }
        ],
        "max_tokens": tokens,
        **sampling_fields(i, sampling),
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- ceiling: in-process batched generate -------------------------------------------------


def ceiling_tokens_per_s(checkpoint: Path, n: int, tokens: int, image_size: int, device: str):
    import torch

    from server.config import Settings
    from server.engine.loader import load_model

    loaded = load_model(Settings(model=str(checkpoint), device=device).engine_config())
    processor = loaded.processor
    processor.tokenizer.padding_side = "left"
    texts, images = [], []
    for i in range(n):
        body = request_body(i, tokens, image_size)
        messages = [
            {"role": "user", "content": [{"type": "image"}, body["messages"][0]["content"][1]]}
        ]
        texts.append(
            processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
        raw = base64.b64decode(body["messages"][0]["content"][0]["image_url"]["url"].split(",")[1])
        images.append(Image.open(io.BytesIO(raw)).convert("RGB"))
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(
        loaded.device
    )
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.generate(
                **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
        assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
    return n * tokens / min(timings)


# -- the server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    checkpoint: Path, port: int, args: argparse.Namespace, extra: list[str] | None = None
) -> subprocess.Popen:
    """A `vlm-server serve` process (extra: more flags), once /health answers."""
    command = [
        sys.executable,
        "-m",
        "server",
        "serve",
        "--model",
        str(checkpoint),
        "--served-model-name",
        "bench",
        "--port",
        str(port),
        "--device",
        args.device,
        "--max-num-seqs",
        str(max(args.concurrency) + args.num_long),
        "--max-model-len",
        str(args.max_model_len),
        "--log-level",
        "warning",
        *(extra or []),
    ]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("server did not start")


def against_server(
    checkpoint: Path,
    args: argparse.Namespace,
    drive: Callable[[int], Coroutine[Any, Any, T]],
    extra: list[str] | None = None,
) -> T:
    """drive(port) run against a `vlm-server serve` process of its own, stopped after."""
    port = free_port()
    server = start_server(checkpoint, port, args, extra)
    try:
        return asyncio.run(drive(port))
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    """(latency, time to first token, completion tokens) of one streamed request."""
    started = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        # Parse as little as possible: on a small machine the client competes for the CPU.
        async for line in response.aiter_lines():
            if first is None and '"content":' in line and '"content":""' not in line:
                first = time.perf_counter() - started
            elif '"usage":' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    latency = time.perf_counter() - started
    return latency, first if first is not None else latency, tokens


async def run_concurrency(client: httpx.AsyncClient, concurrency: int, args) -> dict:
    bodies = [
        request_body(i, args.tokens, args.image_size, sampling=args.sampling)
        for i in range(concurrency * args.rounds)
    ]
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    results: list[tuple[float, float, int]] = []

    async def worker() -> None:
        while not queue.empty():
            results.append(await one_request(client, queue.get_nowait()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies = [r[0] for r in results]
    total_tokens = sum(r[2] for r in results)
    if args.sampling == "greedy":
        assert total_tokens == len(bodies) * args.tokens, "every request must make --tokens"
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "tokens_per_s": total_tokens / wall,
        "requests_per_s": len(bodies) / wall,
        "p50_latency_s": statistics.median(latencies),
        "p99_latency_s": percentile(latencies, 0.99),
        "p50_ttft_s": statistics.median(r[1] for r in results),
    }


async def short_among_long(client: httpx.AsyncClient, args) -> dict:
    shorts = [
        request_body(1000 + i, args.short_tokens, args.image_size) for i in range(args.num_short)
    ]
    idle = [(await one_request(client, b))[0] for b in shorts]
    stop = asyncio.Event()

    async def keep_busy(i: int) -> None:
        while not stop.is_set():
            await one_request(client, request_body(2000 + i, args.long_tokens, args.image_size))

    busy = [asyncio.create_task(keep_busy(i)) for i in range(args.num_long)]
    await asyncio.sleep(2.0)  # let the long ones fill the batch
    loaded = [(await one_request(client, b))[0] for b in shorts]
    stop.set()
    await asyncio.gather(*busy)
    return {
        "idle_p50_s": statistics.median(idle),
        "busy_p50_s": statistics.median(loaded),
        "ratio": statistics.median(loaded) / statistics.median(idle),
    }


async def drive_server(port: int, args) -> tuple[list[dict], dict]:
    timeout = httpx.Timeout(600)
    limits = httpx.Limits(max_connections=256)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=timeout, limits=limits
    ) as client:
        await one_request(client, request_body(0, 4, args.image_size))  # warm up
        rows = [await run_concurrency(client, c, args) for c in args.concurrency]
        mixed = None if args.skip_short_among_long else await short_among_long(client, args)
    return rows, mixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "bench-qwen2-vl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3, help="requests per client")
    parser.add_argument("--num-long", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--num-short", type=int, default=8)
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument(
        "--sampling",
        choices=["greedy", "mixed"],
        default="greedy",
        help="mixed: temperature/top_p/top_k, penalties, seeds; every 8th a json_schema",
    )
    parser.add_argument("--skip-short-among-long", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    if not (args.checkpoint / "config.json").exists():
        from server.engine.tiny import TinySpec, make_tiny_checkpoint

        make_tiny_checkpoint(args.checkpoint, TinySpec(**BENCH_SPEC))
    n = max(args.concurrency)
    ceiling = None
    if not args.skip_ceiling:
        ceiling = ceiling_tokens_per_s(
            args.checkpoint, n, args.tokens, args.image_size, args.device
        )
    rows, mixed = against_server(args.checkpoint, args, lambda port: drive_server(port, args))

    base = rows[0]["tokens_per_s"]
    print(
        "| concurrency | requests | output tok/s | x c=1 | req/s | p50 latency s "
        "| p99 latency s | p50 TTFT s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / base:.2f} | {r['requests_per_s']:.2f} | "
            f"{r['p50_latency_s']:.2f} | {r['p99_latency_s']:.2f} | {r['p50_ttft_s']:.3f} |"
        )
    if ceiling is not None:
        top = rows[-1]["tokens_per_s"]
        print(
            f"\nIn-process batched generate, {n} requests: {ceiling:.1f} tok/s; "
            f"server at c={rows[-1]['concurrency']}: {top / ceiling:.0%} of it"
        )
    if mixed is not None:
        print(
            f"\nShort among long: idle p50 {mixed['idle_p50_s']:.2f} s, with {args.num_long} "
            f"long requests running {mixed['busy_p50_s']:.2f} s, ratio {mixed['ratio']:.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "ceiling": ceiling, "mixed": mixed}, indent=2)
        )


if __name__ == "__main__":
    main()
