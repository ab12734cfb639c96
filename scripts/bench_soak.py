"""A long run of mixed traffic against a real server (`vlm-server serve`, the tiny model): does
anything grow that should not? Every --every seconds it reads the server's memory (the main
process and its video workers apart), open files, threads, the KV cache in use and the
requests in the batch; after the traffic it waits for the server to go idle and reads them
again: the KV cache, the batch and the temporary files must be back to nothing.

    python scripts/bench_soak.py --seconds 600 --concurrency 8

The mix, in turn: chat (whole, streamed, streamed and hung up on after two chunks, given up
by the client part-way), images by URL and inline (a size drawn per request), a JSON schema,
n=2 with logprobs, a video inline, categories of a video by URL, an async media job with a
signed webhook (polled to its end), an upload deleted again, an unreadable image (a 400).
Each client runs until --seconds and at least one round of every kind. Answers are counted by
status. It exits 1 (and says why) if any answer is not the one expected (200, 202, the one
400), a request raised, an accepted job's webhook did not come, or once idle anything still
runs, waits or holds KV blocks, or the traffic left a temporary file. The "caches" column
(the encoder and grammar caches' bytes, bounded, expected to fill) is part of the main RSS
where the model runs on the CPU; on a GPU the encoder cache is device memory.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.helpers import data_uri, free_port, make_video  # noqa: E402

VIDEO = make_video(seconds=3.0, cuts=(1.0, 2.0))
PROMPT = [{"role": "user", "content": "Say something about the sea."}]


def png(width: int, height: int, seed: int) -> bytes:
    image = Image.new("RGB", (width, height), ((seed * 37) % 256, (seed * 91) % 256, 128))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


class Host:
    """The media host and webhook receiver, on loopback (allowed by --allowed-media-domains)."""

    def __init__(self) -> None:
        self.files = {"/clip.mp4": (VIDEO, "video/mp4"), "/photo.png": (png(640, 480, 1), "")}
        self.webhook_ids: set[str] = set()  # (a delivery may be retried: counted once)
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body, kind = host.files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", kind or "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                host.webhook_ids.add(self.headers["webhook-id"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@dataclass
class Tally:
    done: int = 0
    statuses: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)

    def check(self, kind: str, response: httpx.Response, expected: int = 200) -> None:
        self.done += 1
        self.statuses[response.status_code] += 1
        if response.status_code != expected and len(self.unexpected) < 5:
            self.unexpected.append(f"{kind}: {response.status_code} {response.text[:300]}")


def chat(**extra: object) -> dict:
    return {"model": "tiny", "messages": PROMPT, "max_tokens": 24, **extra}


def with_parts(*parts: dict) -> dict:
    text = {"type": "text", "text": "What is in this?"}
    return chat(messages=[{"role": "user", "content": [text, *parts]}])


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


class Traffic:
    def __init__(self, client: httpx.AsyncClient, host: Host, rng: random.Random):
        self.client, self.host, self.rng, self.tally = client, host, rng, Tally()
        self.kinds: list[Callable[[], Awaitable[None]]] = [
            self.whole, self.streamed, self.hung_up, self.given_up, self.image_url,
            self.image_inline, self.schema, self.n_logprobs, self.video, self.categories,
            self.job, self.upload, self.bad_image,
        ]  # fmt: skip

    async def post(self, kind: str, path: str, body: dict, expected: int = 200) -> httpx.Response:
        response = await self.client.post(path, json=body)
        self.tally.check(kind, response, expected)
        return response

    async def whole(self) -> None:
        await self.post("whole", "/v1/chat/completions", chat(temperature=0.8, seed=7))

    async def streamed(self) -> None:
        async with self.client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
            async for _ in r.aiter_lines():
                pass
        self.tally.check("streamed", r)

    async def hung_up(self) -> None:
        body = chat(stream=True, max_tokens=200)
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = 0
            async for _ in r.aiter_lines():
                lines += 1
                if lines >= 4:  # two chunks and their blank lines: then hang up
                    break
        self.tally.check("hung_up", r)

    async def given_up(self) -> None:
        try:
            body = chat(max_tokens=200)
            await self.client.post("/v1/chat/completions", json=body, timeout=0.05)
        except httpx.TimeoutException:
            pass
        self.tally.done += 1

    async def image_url(self) -> None:
        await self.post(
            "image_url", "/v1/chat/completions", with_parts(image_part(self.host.url("/photo.png")))
        )

    async def image_inline(self) -> None:
        side = self.rng.randrange(64, 900)
        picture = png(side, max(32, side * 3 // 4), self.rng.randrange(1000))
        body = with_parts(image_part(data_uri(picture, "image/png")))
        await self.post("image_inline", "/v1/chat/completions", body)

    async def schema(self) -> None:
        schema = {"type": "object", "properties": {"sea": {"type": "string", "maxLength": 20}}}
        schema["required"] = ["sea"]
        format_ = {"type": "json_schema", "json_schema": {"name": "sea", "schema": schema}}
        await self.post("schema", "/v1/chat/completions", chat(response_format=format_))

    async def n_logprobs(self) -> None:
        body = chat(n=2, logprobs=True, top_logprobs=3, temperature=1.0)
        await self.post("n_logprobs", "/v1/chat/completions", body)

    async def video(self) -> None:
        part = {"type": "video_url", "video_url": {"url": data_uri(VIDEO, "video/mp4")}}
        await self.post("video", "/v1/chat/completions", with_parts(part))

    async def categories(self) -> None:
        body = {"media_url": self.host.url("/clip.mp4"), "metadata": ["tags"]}
        await self.post("categories", "/v2/media/categories", body)

    async def job(self) -> None:
        body = with_parts(image_part(self.host.url("/photo.png")))
        body["webhook_url"] = self.host.url("/hook")
        response = await self.post("job", "/v2/media/completions", body, expected=202)
        if response.status_code != 202:
            return
        for _ in range(600):
            status = (await self.client.get(f"/v2/media/status/{response.json()['id']}")).json()
            if status["status"] in ("completed", "failed", "cancelled"):
                if status["status"] != "completed":
                    self.tally.unexpected.append(f"job: {json.dumps(status)[:300]}")
                return
            await asyncio.sleep(0.2)
        self.tally.unexpected.append(f"job: not ended in 120 s: {json.dumps(status)[:300]}")

    async def upload(self) -> None:
        files = {"file": ("photo.png", png(320, 240, self.rng.randrange(1000)), "image/png")}
        response = await self.client.post("/v1/files", files=files, data={"purpose": "vision"})
        self.tally.check("upload", response)
        if response.status_code == 200:
            gone = await self.client.delete(f"/v1/files/{response.json()['id']}")
            self.tally.check("delete", gone)

    async def bad_image(self) -> None:
        body = with_parts(image_part(data_uri(b"not an image at all", "image/png")))
        await self.post("bad_image", "/v1/chat/completions", body, expected=400)

    async def run(self, until: float) -> None:
        """Until `until`, and at least one round of every kind (a short run covers them all)."""
        step = self.rng.randrange(len(self.kinds))
        for done in itertools.count():
            if done >= len(self.kinds) and time.monotonic() >= until:
                return
            step = (step + 1) % len(self.kinds)
            try:
                await self.kinds[step]()
            except Exception as exc:  # (a refused connection, a broken stream: counted, not fatal)
                self.tally.statuses["exception"] += 1
                if len(self.tally.unexpected) < 5:
                    self.tally.unexpected.append(f"{self.kinds[step].__name__}: {exc!r}")


@dataclass
class Reading:
    at_s: float
    requests: int
    main_mib: float
    workers_mib: float
    fds: int
    threads: int
    kv_usage: float
    running: float
    waiting: float
    caches_mib: float  # the encoder and grammar caches: bounded, expected to fill


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def read(server: psutil.Process, client: httpx.Client, start: float, requests: int) -> Reading:
    metrics = client.get("/metrics").text
    workers = server.children(recursive=True)
    return Reading(
        at_s=time.monotonic() - start,
        requests=requests,
        main_mib=server.memory_info().rss / 2**20,
        workers_mib=sum(rss(child) for child in workers) / 2**20,
        fds=server.num_fds(),
        threads=server.num_threads(),
        kv_usage=metric(metrics, "vllm:kv_cache_usage_perc"),
        running=metric(metrics, "vllm:num_requests_running"),
        waiting=metric(metrics, "vllm:num_requests_waiting"),
        caches_mib=(
            metric(metrics, "vlm_encoder_cache_bytes") + metric(metrics, "vlm_grammar_cache_bytes")
        )
        / 2**20,
    )


def growth_per_1000(readings: list[Reading], value: Callable[[Reading], float]) -> float:
    """The slope of value against requests served over the second half of the run."""
    half = readings[len(readings) // 2 :]
    if len(half) < 2 or half[-1].requests == half[0].requests:
        return float("nan")
    return (
        statistics.linear_regression([r.requests for r in half], [value(r) for r in half])[0] * 1000
    )


async def drive(port: int, host: Host, args: argparse.Namespace, tallies: list[Tally]) -> None:
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        until = time.monotonic() + args.seconds
        traffic = [Traffic(client, host, random.Random(i)) for i in range(args.concurrency)]
        tallies.extend(t.tally for t in traffic)
        await asyncio.gather(*(t.run(until) for t in traffic))


def rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.NoSuchProcess:  # (a video worker replaced meanwhile)
        return 0


def wait_idle(client: httpx.Client, timeout_s: float = 60.0) -> None:
    """Until nothing runs or waits (the problems found after it say if that never came)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = client.get("/metrics").text
        busy = metric(metrics, "vllm:num_requests_running") + metric(
            metrics, "vllm:num_requests_waiting"
        )
        if busy == 0:
            return
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--port", type=int, default=0, help="the server's (default: a free one)")
    parser.add_argument("--args", default="", help="more `serve` flags, one string")
    parser.add_argument("--log", type=Path, help="the server's log (default: not kept)")
    args = parser.parse_args()
    args.port = args.port or free_port()
    host = Host()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with tempfile.TemporaryDirectory() as data_dir, tempfile.TemporaryDirectory() as tmp:
        env["TMPDIR"] = tmp  # (what the traffic leaves in temp files is counted at the end)
        command = [sys.executable, "-m", "server", "serve", "--model", "tiny"]
        command += ["--port", str(args.port), "--data-dir", data_dir]
        command += ["--allowed-media-domains", f"127.0.0.1:{host.port}", *shlex.split(args.args)]
        log = args.log.open("w") if args.log else subprocess.DEVNULL
        server = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        try:
            problems = soak(server, host, args, Path(tmp))
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    if problems:
        sys.exit("problems:\n" + "\n".join(problems))


def soak(server: subprocess.Popen, host: Host, args: argparse.Namespace, tmp: Path) -> list[str]:
    process = psutil.Process(server.pid)
    tallies: list[Tally] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=10) as client:
        wait_started(server, client)
        before = set(tmp.rglob("*"))  # (start-up's own: torch's compile cache directory)
        start = time.monotonic()
        readings = [read(process, client, start, 0)]
        failures: list[BaseException] = []

        def traffic() -> None:
            try:
                asyncio.run(drive(args.port, host, args, tallies))
            except BaseException as exc:  # (told as a problem, not lost in a thread)
                failures.append(exc)

        driver = threading.Thread(target=traffic)
        driver.start()
        while driver.is_alive():
            driver.join(args.every)
            readings.append(read(process, client, start, sum(t.done for t in tallies)))
        wait_idle(client)
        accepted = sum(t.statuses[202] for t in tallies)
        for _ in range(30):  # the last jobs' webhooks may still be on their way
            if len(host.webhook_ids) >= accepted:
                break
            time.sleep(1)
        time.sleep(2)
        idle = read(process, client, start, readings[-1].requests)
    left = sorted(p.name for p in set(tmp.rglob("*")) - before)
    report(readings, idle, tallies, host, left)
    return [f"the traffic stopped: {exc!r}" for exc in failures] + problems(
        idle, tallies, host, left
    )


def wait_started(server: subprocess.Popen, client: httpx.Client) -> None:
    for _ in range(240):
        if server.poll() is not None:
            sys.exit(f"the server exited ({server.returncode}) before it answered (see --log)")
        try:
            client.get("/health").raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    sys.exit("the server did not answer /health in 120 s")


def problems(idle: Reading, tallies: list[Tally], host: Host, left: list[str]) -> list[str]:
    """What must hold once the traffic is over: every answer as expected, every accepted job's
    webhook delivered, nothing left running, in the KV cache or in the temporary files."""
    found = [u for t in tallies for u in t.unexpected]
    accepted = sum(t.statuses[202] for t in tallies)
    if len(host.webhook_ids) != accepted:
        found.append(f"{accepted} jobs accepted, {len(host.webhook_ids)} webhooks received")
    if idle.kv_usage != 0 or idle.running != 0 or idle.waiting != 0:
        found.append(
            f"idle, yet KV in use {idle.kv_usage}, {idle.running} running, {idle.waiting} waiting"
        )
    if left:
        found.append(f"temporary files left: {left[:5]}")
    return found


def report(
    readings: list[Reading], idle: Reading, tallies: list[Tally], host: Host, left: list[str]
) -> None:
    print(
        "| s | requests | main RSS MiB | of it caches MiB | video workers RSS MiB | fds "
        "| threads | KV in use | running |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in [*readings, idle]:
        print(
            f"| {r.at_s:.0f} | {r.requests} | {r.main_mib:.0f} | {r.caches_mib:.0f} "
            f"| {r.workers_mib:.0f} | {r.fds} | {r.threads} | {r.kv_usage:.3f} | {r.running:.0f} |"
        )
    statuses = sum((t.statuses for t in tallies), Counter())
    by_status = dict(sorted(statuses.items(), key=lambda item: str(item[0])))
    print(f"\nanswers by status: {by_status}; webhooks: {len(host.webhook_ids)}")
    main_slope = growth_per_1000(readings, lambda r: r.main_mib)
    rest_slope = growth_per_1000(readings, lambda r: r.main_mib - r.caches_mib)
    worker_slope = growth_per_1000(readings, lambda r: r.workers_mib)
    print(
        f"RSS growth over the second half, MiB per 1000 requests: main {main_slope:.2f} "
        f"(less the caches {rest_slope:.2f}), video workers {worker_slope:.2f}"
    )
    print(
        f"idle after: KV in use {idle.kv_usage:.3f}, running {idle.running:.0f}, "
        f"temp files {len(left)} {left[:5]}"
    )


if __name__ == "__main__":
    main()
