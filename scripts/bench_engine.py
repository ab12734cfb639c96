"""Engine benchmarks for the paged KV cache, chunked prefill and the prefix cache (in-process).

    python scripts/bench_engine.py capacity   # 32 short image requests, KV budget of 2 contexts
    python scripts/bench_engine.py chunked    # a stream's largest gap as a 9k prompt arrives
    python scripts/bench_engine.py prefix     # the same image + question twice; another image
    python scripts/bench_engine.py all [--device cuda] [--checkpoint DIR] [--json OUT]

Only the engine's public surface is used (AsyncEngine.build / add_request / stream, Settings,
scheduler.peak_num_running), so the same script measures an older checkout for a before/after
table: `VLM_CODE_ROOT=/path/to/old/checkout python scripts/bench_engine.py capacity`.
Settings an older engine does not know are ignored by it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import bench_scheduler  # its BENCH_SPEC; it puts this checkout on sys.path, so first
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("VLM_CODE_ROOT", str(ROOT)))  # the code measured

from server.config import Settings  # noqa: E402
from server.engine.engine import AsyncEngine  # noqa: E402
from server.engine.inputs import InputBuilder, ModelInputs  # noqa: E402
from server.engine.loader import LoadedModel, load_model  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402

# bench_scheduler.py's checkpoint, with a 16k context for a 9k-token prompt
BENCH_SPEC = {**bench_scheduler.BENCH_SPEC, "max_position_embeddings": 16384}


def image_prompt(
    builder: InputBuilder, seed: int, question: str = "Describe it.", size: int = 224
) -> ModelInputs:
    image = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, 128))
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return builder.build([{"role": "user", "content": content}], [image])


def text_prompt(builder: InputBuilder, num_tokens: int) -> ModelInputs:
    """A text prompt of about num_tokens tokens (the word count calibrated on 1000 words)."""

    def build(num_words: int) -> ModelInputs:
        words = " ".join(f"w{i % 97}" for i in range(num_words))
        return builder.build([{"role": "user", "content": words}], [])

    per_word = build(1000).num_prompt_tokens / 1000
    return build(int(num_tokens / per_word))


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    text = loaded.model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    size = loaded.dtype.itemsize
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * size


def engine(loaded: LoadedModel, **settings: object) -> AsyncEngine:
    built = AsyncEngine.build(loaded, Settings(model="bench", **settings).engine_config())
    built.start()
    return built


async def finish(built: AsyncEngine, seq) -> list[float]:
    """Arrival times of the sequence's outputs."""
    times = []
    async for _ in built.stream(seq):
        times.append(time.perf_counter())
    return times


async def capacity(loaded: LoadedModel, builder: InputBuilder) -> dict:
    """--kv-cache-memory of exactly two full-context sequences; 32 short image requests."""
    context = loaded.context_length
    budget_gib = 2 * context * kv_bytes_per_token(loaded) / 2**30
    built = engine(loaded, kv_cache_memory=budget_gib, max_num_seqs=64)
    sampling = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    prompts = [image_prompt(builder, i) for i in range(32)]
    started = time.perf_counter()
    seqs = [built.add_request(f"c{i}", p, sampling) for i, p in enumerate(prompts)]
    await asyncio.gather(*(finish(built, s) for s in seqs))
    seconds = time.perf_counter() - started
    await built.stop()
    return {
        "kv_cache_gib": round(budget_gib, 3),
        "context": context,
        "prompt_tokens": prompts[0].num_prompt_tokens,
        "peak_running": built.scheduler.peak_num_running,
        "seconds": round(seconds, 2),
        "output_tok_s": round(32 * 64 / seconds, 1),
    }


async def chunked(loaded: LoadedModel, builder: InputBuilder, budget: int) -> dict:
    """A stream decodes; a 9k-token prompt arrives mid-stream: the stream's largest gap."""
    built = engine(loaded, max_num_batched_tokens=budget, kv_cache_memory=2.0)
    stream = built.add_request(
        "stream", image_prompt(builder, 1), SamplingParams(max_tokens=120, ignore_eos=True)
    )
    long_prompt = text_prompt(builder, min(9000, loaded.context_length - 400))
    times: list[float] = []
    long = None
    async for output in built.stream(stream):
        times.append(time.perf_counter())
        if long is None and output.num_completion_tokens >= 40:
            arrived = times[-1]
            long = built.add_request("long", long_prompt, SamplingParams(max_tokens=1))
    long_done = await finish(built, long)
    await built.stop()
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "max_num_batched_tokens": budget,
        "long_prompt_tokens": long.inputs.num_prompt_tokens,
        "median_gap_ms": round(statistics.median(gaps) * 1000, 1),
        "max_gap_ms": round(max(gaps) * 1000, 1),
        "long_ttft_s": round(long_done[0] - arrived, 2),
    }


async def prefix(loaded: LoadedModel, builder: InputBuilder, caching: bool) -> dict:
    """A 448x448 image (256 image tokens) and a question, asked twice, then another image of
    the same size; after one warm-up request on a third image."""
    built = engine(loaded, enable_prefix_caching=caching, kv_cache_memory=1.0)
    sampling = SamplingParams(max_tokens=1, temperature=0)
    question = "What is in this image? Answer in detail."
    await finish(built, built.add_request("warm-up", image_prompt(builder, 3, size=448), sampling))
    rows = {}
    for name, prompt in (
        ("first", image_prompt(builder, 7, question, 448)),
        ("same again", image_prompt(builder, 7, question, 448)),
        ("other image", image_prompt(builder, 8, question, 448)),
    ):
        started = time.perf_counter()
        seq = built.add_request(name, prompt, sampling)
        first = (await finish(built, seq))[0]
        rows[name] = {
            "prompt_tokens": prompt.num_prompt_tokens,
            "cached_tokens": getattr(seq, "num_cached_tokens", 0),
            "ttft_ms": round((first - started) * 1000, 1),
        }
    await built.stop()
    return {"prefix_caching": caching, **rows}


def load(args: argparse.Namespace) -> LoadedModel:
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        from server.engine.tiny import TinySpec, make_tiny_checkpoint

        make_tiny_checkpoint(checkpoint, TinySpec(**BENCH_SPEC))
    return load_model(Settings(model=str(checkpoint), device=args.device).engine_config())


async def run(args: argparse.Namespace) -> dict:
    loaded = load(args)
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    import server

    results: dict = {"code": str(Path(server.__file__).parent)}
    if args.what in ("capacity", "all"):
        results["capacity"] = await capacity(loaded, builder)
    if args.what in ("chunked", "all"):
        results["chunked"] = [await chunked(loaded, builder, b) for b in args.budgets]
    if args.what in ("prefix", "all"):
        results["prefix"] = [await prefix(loaded, builder, c) for c in (False, True)]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["capacity", "chunked", "prefix", "all"])
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "bench-qwen2-vl-16k"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budgets", type=int, nargs="+", default=[16384, 2048, 512])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
