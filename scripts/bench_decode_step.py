"""Time one decode step of the batching runner against HF's own forward with a DynamicCache.

    python scripts/bench_decode_step.py [--checkpoint models/bench-qwen2-vl] [--device cpu]

For each batch size: prefill that many image prompts, decode 150 steps to grow the cache, then
time 30 decode steps of the scheduler + paged runner and 30 of `model(...)` with the model's
own cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine_step import engine_step  # noqa: E402

from server.config import Settings  # noqa: E402
from server.engine.block_manager import BlockManager  # noqa: E402
from server.engine.inputs import InputBuilder  # noqa: E402
from server.engine.loader import load_model  # noqa: E402
from server.engine.runner import ModelRunner  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from server.engine.sequence import Sequence  # noqa: E402

BLOCK_SIZE = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "bench-qwen2-vl"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 17, 32])
    args = parser.parse_args()
    loaded = load_model(Settings(model=args.checkpoint, device=args.device).engine_config())
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    num_blocks = max(args.batch_sizes) * 2048 // BLOCK_SIZE
    runner = ModelRunner(loaded, num_blocks, BLOCK_SIZE, encoder_cache_bytes=0)
    scheduler = Scheduler(
        SchedulerConfig(max(args.batch_sizes), 1 << 20, 1 << 20, 3600.0),
        BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=False),
    )
    steps = 30

    def step() -> None:
        engine_step(scheduler, runner)

    print("| batch | runner decode step | HF forward + DynamicCache |\n| --- | --- | --- |")
    for batch in args.batch_sizes:
        seqs = []
        for i in range(batch):
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}
            ]
            inputs = builder.build(messages, [Image.new("RGB", (224, 224), (i * 30 % 256, 40, 50))])
            seq = Sequence(f"s{i}", inputs, SamplingParams(temperature=0), 500)
            scheduler.add(seq)
            seqs.append(seq)
        for _ in range(151):  # the prefill, then 150 decodes
            step()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        ours = (time.perf_counter() - started) / steps
        ids = torch.randint(0, 500, (batch, seqs[0].num_tokens), device=loaded.device)
        with torch.inference_mode():
            cache = loaded.model(input_ids=ids, use_cache=True).past_key_values
            started = time.perf_counter()
            for _ in range(steps):
                loaded.model(input_ids=ids[:, :1], past_key_values=cache, logits_to_keep=1)
            theirs = (time.perf_counter() - started) / steps
        print(f"| {batch} | {ours * 1000:.1f} ms | {theirs * 1000:.1f} ms |")
        for seq in seqs:
            scheduler.remove(seq)
            runner.release(seq)


if __name__ == "__main__":
    main()
