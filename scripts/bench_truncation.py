"""What `truncation: "auto"` costs a Responses request whose tool loop is past the context:
wall time, the prompt it keeps and how many prompts were built to find it. Two loops on the
tiny model, in this process (no HTTP server): 100 text steps at a 512-token context, and 30
steps each with a 1280x720 screenshot at 8192 tokens.

    python scripts/bench_truncation.py                # markdown table, medians of 5

Run it from two checkouts (PYTHONPATH=<checkout>) to compare them side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.api.app import create_app  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.tiny import make_tiny_checkpoint  # noqa: E402


def screenshot(width: int, height: int) -> str:
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def tool_loop(steps: int, shot: str | None) -> list[dict[str, Any]]:
    """One task, then `steps` calls, each answered with text (and the screen, if given)."""
    items: list[dict[str, Any]] = [{"role": "user", "content": "Tidy the desktop."}]
    for k in range(steps):
        output: Any = f"moved file {k}"
        if shot is not None:
            output = [{"type": "input_text", "text": f"step {k}"}]
            output.append({"type": "input_image", "image_url": shot, "detail": "auto"})
        items.append({"type": "function_call", "call_id": f"c{k}", "name": "f", "arguments": "{}"})
        items.append({"type": "function_call_output", "call_id": f"c{k}", "output": output})
    return items


def counting(method: Any, count: list[int]) -> Any:
    async def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return await method(*args, **kwargs)

    return counted


async def measure(model: Path, context: int, items: list, repeats: int) -> tuple[float, int, int]:
    """Median seconds of one truncated request, its input tokens, and how many prompts one
    built (attempts to answer, and prompts built to measure them)."""
    data_dir = Path(tempfile.mkdtemp())
    settings = Settings(
        model=str(model), served_model_name=["tiny"], max_model_len=context, data_dir=data_dir
    )
    app = create_app(settings)
    body = {"model": "tiny", "input": items, "truncation": "auto", "max_output_tokens": 1}
    async with LifespanManager(app, startup_timeout=120) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            chat = app.state.services.chat
            built = [0]  # attempts to answer and prompts built to measure, for one request
            for name in ("start", "prompt"):
                setattr(chat, name, counting(getattr(chat, name), built))
            times, answer = [], {}
            for _ in range(repeats):
                built[0] = 0
                start = time.perf_counter()
                answer = (await client.post("/v1/responses", json=body)).json()
                times.append(time.perf_counter() - start)
            assert "usage" in answer, answer
            return statistics.median(times), answer["usage"]["input_tokens"], built[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-qwen2-vl")
    cases = [
        ("100 text steps, 512-token context", 512, tool_loop(100, None)),
        ("30 screenshot steps, 8192-token context", 8192, tool_loop(30, screenshot(1280, 720))),
    ]
    print("| loop | median (s) | input tokens kept | prompts built (attempts + probes) |")  # noqa: T201
    print("|---|---:|---:|---:|")  # noqa: T201
    for name, context, items in cases:
        seconds, tokens, built = await measure(model, context, items, args.repeats)
        print(f"| {name} | {seconds:.3f} | {tokens} | {built} |")  # noqa: T201


if __name__ == "__main__":
    asyncio.run(main())
