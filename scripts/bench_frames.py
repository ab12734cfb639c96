"""Video frame pipeline benchmark: our decode path against qwen-vl-utils, 60 frames each.

    pip install -e '.[bench]'            # qwen-vl-utils, for the comparison
    python scripts/bench_frames.py       # writes clips to models/bench-clips/ on first run

For each generated 720p H.264 clip (10 s, 60 s, 60 s with a keyframe every second, 10 min):
the time to turn the file into 60 model-ready (planned, resized) frames, and the peak RSS of
the process doing it, for
- ours: bytes read from disk, then `VideoDecoder` (probe, plan, PyAV's one pass over exactly the
  planned frames, resize) in its worker process;
- qwen-vl-utils: `fetch_video({"video": path, "nframes": 60, ...})` with its decord backend.
Each measurement runs in a fresh subprocess (peak RSS counts its children too), 3 times; the
median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (seconds, keyframe interval in frames; None: x264's default, 250)
CLIPS = {"10s": (10, None), "60s": (60, None), "60s-gop1s": (60, 24), "10min": (600, None)}
FPS = 24
WIDTH, HEIGHT = 1280, 720
NUM_FRAMES = 60
MAX_PIXELS = 768 * 28 * 28  # the video pixel ceiling both paths resize to


def make_clip(path: Path, seconds: int, keyint: int | None = None) -> None:
    import av
    import numpy as np

    base = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    base[:, :, 2] = np.linspace(0, 255, WIDTH, dtype=np.uint8)[None, :]
    with av.open(str(path), "w", format="mp4") as video:
        stream = video.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        if keyint:
            stream.options["x264-params"] = f"keyint={keyint}:min-keyint={keyint}"
        for i in range(seconds * FPS):
            frame = base.copy()
            frame[:, :, 0] = (i * 3) % 256
            x = (i * 7) % (WIDTH - 40)
            frame[200:520, x : x + 40, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                video.mux(packet)
        for packet in stream.encode():
            video.mux(packet)


def run_ours(path: Path) -> tuple[float, int]:
    """As in the server: a warm worker pool (imports done), then one timed decode."""
    import asyncio

    from server.media.frames import FrameRequest, TokenBudget
    from server.media.video import VideoDecoder

    async def main() -> tuple[float, int]:
        decoder = VideoDecoder(num_workers=1, timeout_s=600, max_fps=FPS)
        await decoder.start()
        budget = TokenBudget(10**7, 0, 0)  # room for 60 frames at the video pixel ceiling
        wish = FrameRequest("native", max_frames=NUM_FRAMES, max_pixels=MAX_PIXELS)
        try:
            await decoder.decode(str(path.with_name("warmup.mp4")), budget, wish)
            started = time.perf_counter()
            decoded = await decoder.decode(str(path), budget, wish)  # the worker reads the file
            return time.perf_counter() - started, len(decoded.frames)
        finally:
            await decoder.close()

    return asyncio.run(main())


def run_qwen_vl_utils(path: Path) -> tuple[float, int]:
    """Imports (torch among them) done first, then one timed fetch_video."""
    os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord"
    from qwen_vl_utils import fetch_video

    started = time.perf_counter()
    video = fetch_video({"video": str(path), "nframes": NUM_FRAMES, "max_pixels": MAX_PIXELS})
    frames = video[0] if isinstance(video, tuple) else video
    return time.perf_counter() - started, int(frames.shape[0])


def measure_once(which: str, path: Path) -> dict:
    seconds, count = run_ours(path) if which == "ours" else run_qwen_vl_utils(path)
    rss_kib = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    return {"seconds": seconds, "peak_rss_mib": rss_kib / 1024, "frames": count}


def measure(which: str, path: Path, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--one", which, str(path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "frames": runs[0]["frames"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-dir", type=Path, default=ROOT / "models" / "bench-clips")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_once(args.one[0], Path(args.one[1]))))
        return
    args.clips_dir.mkdir(parents=True, exist_ok=True)
    if not (args.clips_dir / "warmup.mp4").exists():
        make_clip(args.clips_dir / "warmup.mp4", 1)
    rows = []
    for name, (seconds, keyint) in CLIPS.items():
        path = args.clips_dir / f"{name}-720p-h264.mp4"
        if not path.exists():
            make_clip(path, seconds, keyint)
        ours = measure("ours", path, args.repeats)
        theirs = measure("qwen-vl-utils", path, args.repeats)
        rows.append((name, path.stat().st_size, ours, theirs))
    print(
        "| clip | size MiB | ours s | qwen-vl-utils s | speed-up | ours peak RSS MiB "
        "| qwen-vl-utils peak RSS MiB | frames |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, size, ours, theirs in rows:
        print(
            f"| {name} | {size / 2**20:.1f} | {ours['seconds']:.2f} | {theirs['seconds']:.2f} | "
            f"{theirs['seconds'] / ours['seconds']:.2f}x | {ours['peak_rss_mib']:.0f} | "
            f"{theirs['peak_rss_mib']:.0f} | {ours['frames']} / {theirs['frames']} |"
        )
    ours_10s, ours_10min = rows[0][2]["peak_rss_mib"], rows[-1][2]["peak_rss_mib"]
    print(f"\nOur peak RSS, 10 min against 10 s: {ours_10min / ours_10s:.2f}x")


if __name__ == "__main__":
    main()
