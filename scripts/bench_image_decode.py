"""Large-JPEG decode benchmark: the whole image decoded then resized (how every image was read
before JPEG draft decoding) against the server's load_image (a JPEG many times its target is
decoded at 1/2, 1/4 or 1/8 scale by the DCT, then resized to the same target).

    python scripts/bench_image_decode.py                  # 16 and 64 MP photos, detail auto
    python scripts/bench_image_decode.py --megapixels 64 --repeats 5

Each measurement runs in a fresh process (its peak resident memory is its own); the photo is a
smooth gradient with shapes (what a camera's JPEG holds, quality 90). Prints a markdown table
(paste it into docs/BENCHMARKS.md) with medians over --repeats.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def photo(megapixels: int) -> bytes:
    from PIL import Image, ImageDraw

    width = int((megapixels * 2**20 * 4 / 3) ** 0.5)
    height = width * 3 // 4
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for k in range(8):
        box = (k * width // 9, k * height // 11, (k + 2) * width // 9, (k + 3) * height // 11)
        draw.ellipse(box, fill=(40 * k, 255 - 30 * k, 90))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def measure(data: bytes, how: str, queue: multiprocessing.Queue) -> None:
    """(seconds, peak RSS growth in MiB, output size) of one decode in this fresh process."""
    from server.media.image import (
        AUTO_DETAIL_TOKENS,
        decode_image,
        fit_to_budget,
        load_image,
        pixel_range,
    )

    pixels = pixel_range("auto", 16384 * 28 * 28, 28, 0, (None, None), AUTO_DETAIL_TOKENS)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if how == "whole":
        image = fit_to_budget(decode_image(data, param="p"), pixels[1], min_pixels=pixels[0])
    else:
        image = load_image(data, pixels, param="p")
    seconds = time.perf_counter() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    queue.put((seconds, grown, image.size))


def run(data: bytes, how: str) -> tuple[float, float, tuple[int, int]]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(data, how, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| photo | file MB | decode | output | median s | median peak MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for megapixels in args.megapixels:
        data = photo(megapixels)
        for how in ("whole", "draft"):  # (alternated: the machine's noise falls on both)
            runs = [run(data, how) for _ in range(args.repeats)]
            seconds = statistics.median(r[0] for r in runs)
            peak = statistics.median(r[1] for r in runs)
            size = runs[0][2]
            name = "whole, then resized" if how == "whole" else "load_image (draft)"
            print(
                f"| {megapixels} MP JPEG | {len(data) / 1e6:.1f} | {name} | "
                f"{size[0]}x{size[1]} | {seconds:.2f} | {peak:.0f} |"
            )


if __name__ == "__main__":
    main()
