"""Image decode memory benchmark: requests of huge-pixel, tiny-file images (a 64-megapixel RGBA
PNG of one colour compresses to a few hundred KB) against the server's peak memory, with the
decode memory budget (--image-decode-memory) at its default and at a size that bounds nothing.

    python scripts/bench_image_memory.py                     # CPU, bench-sized checkpoint
    python scripts/bench_image_memory.py --budgets 1 64 --requests 2 --images 4

For each budget a real `vlm-server serve` process; --requests clients each send one request
with --images such images (detail low: the answer's cost is small, the decode is the work),
all at once; the server's resident memory (its process and its children) is sampled every
0.1 s. Prints a markdown table (paste it into docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_scheduler import BENCH_SPEC, free_port, start_server  # noqa: E402  (a sibling)


def bomb_png(side: int) -> str:
    """A side x side RGBA PNG of one colour, as a data URI."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (40, 90, 160, 255)).save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def resident_mib(pid: int) -> float:
    """Resident memory of a process and its children, in MiB (Linux's /proc)."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [pid, *map(int, children.read_text().split())] if children.exists() else [pid]
    for each in pids:
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        total += int(status.split("VmRSS:")[1].split()[0])
    return total / 1024


async def drive(port: int, args: argparse.Namespace, image: str) -> float:
    body = {
        "model": "bench",
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [
                    *[
                        {"type": "image_url", "image_url": {"url": image, "detail": "low"}}
                        for _ in range(args.images)
                    ],
                    {"type": "text", "text": "Describe."},
                ],
            }
        ],
    }
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(args.requests))
        )
    for response in responses:
        response.raise_for_status()
    return time.perf_counter() - started


def measure(args: argparse.Namespace, budget: float, image: str) -> dict:
    server_args = argparse.Namespace(**vars(args), concurrency=[args.requests], num_long=0)
    extra = ["--image-decode-memory", str(budget), "--max-images-per-request", str(args.images)]
    server = start_server(args.checkpoint, args.port, server_args, extra)
    try:
        baseline, peak, stop = resident_mib(server.pid), [0.0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], resident_mib(server.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            seconds = asyncio.run(drive(args.port, args, image))
        finally:
            stop.set()
            sampler.join()
        return {"baseline": baseline, "peak": peak[0], "seconds": seconds}
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "bench-qwen2-vl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--side", type=int, default=7999, help="pixels (64 MP is the limit)")
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 64.0], help="GiB")
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").exists():
        from server.engine.tiny import TinySpec, make_tiny_checkpoint

        make_tiny_checkpoint(args.checkpoint, TinySpec(**BENCH_SPEC))
    args.port = free_port()
    image = bomb_png(args.side)
    kb = len(image) * 3 // 4 // 1024
    print(f"{args.requests} requests x {args.images} images of {args.side}x{args.side} ({kb} KB)")
    print("| --image-decode-memory GiB | baseline MiB | peak MiB | peak - baseline MiB | s |")
    print("| --- | --- | --- | --- | --- |")
    for budget in args.budgets:
        r = measure(args, budget, image)
        print(
            f"| {budget:g} | {r['baseline']:.0f} | {r['peak']:.0f} | "
            f"{r['peak'] - r['baseline']:.0f} | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
