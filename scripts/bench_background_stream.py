"""What streaming a response in the background costs against streaming it directly: the same
Responses API request, streamed (`stream: true`) and streamed in the background (`background:
true, stream: true`: a durable job streams it through the app, its events saved in the job
store every 50 ms at most, and the client's stream follows the saved events), one at a time on
an idle `vlm-server serve` process.

    python scripts/bench_background_stream.py               # CPU, bench-sized random checkpoint
    python scripts/bench_background_stream.py --postgres postgresql://postgres@127.0.0.1/test

Medians of --repeats: time to the first output-text delta, to the last event, and the events
received. Prints a markdown table (paste it into docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_jobs import fresh_url  # noqa: E402  (siblings)
from bench_scheduler import BENCH_SPEC, against_server  # noqa: E402


async def one_stream(client: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    """(seconds to the first text delta, to the last event, events received)."""
    started, first, events = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/responses", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            kind = json.loads(line[6:])["type"]
            if first is None and kind == "response.output_text.delta":
                first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started, events


async def drive(port: int, args: argparse.Namespace) -> dict[str, tuple[float, float, float]]:
    body = {
        "model": "bench",
        "input": "Describe a busy street at dusk.",
        "max_output_tokens": args.tokens,
        "temperature": 0,
        "stream": True,
    }
    rows = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        await one_stream(client, body)  # warm up
        for name, extra in (("stream", {}), ("background + stream", {"background": True})):
            runs = [await one_stream(client, {**body, **extra}) for _ in range(args.repeats)]
            rows[name] = tuple(statistics.median(r[i] for r in runs) for i in range(3))
    return rows  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "bench-qwen2-vl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--postgres",
        help="a PostgreSQL URL: the job store in a schema of its own there, dropped "
        "after (default: SQLite in a temp dir)",
    )
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").exists():
        from server.engine.tiny import TinySpec, make_tiny_checkpoint

        make_tiny_checkpoint(args.checkpoint, TinySpec(**BENCH_SPEC))
    backend = "postgres" if args.postgres else "sqlite"
    with (
        tempfile.TemporaryDirectory() as data_dir,
        fresh_url(args, backend, Path(data_dir)) as job_store,
    ):
        extra = ["--data-dir", data_dir, "--job-store", job_store]
        server_args = argparse.Namespace(
            device=args.device, concurrency=[4], num_long=0, max_model_len=2048
        )
        rows = against_server(args.checkpoint, server_args, lambda port: drive(port, args), extra)
    print(f"| {backend}, {args.tokens} tokens | first delta s | last event s | events |")
    print("| --- | ---: | ---: | ---: |")
    for name, (first, last, events) in rows.items():
        print(f"| {name} | {first:.3f} | {last:.3f} | {events:.0f} |")


if __name__ == "__main__":
    main()
