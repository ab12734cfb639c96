"""Test helpers: images, data URIs, a real local HTTP media server, the app in-process."""

from __future__ import annotations

import base64
import contextlib
import fractions
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import uvicorn
from asgi_lifespan import LifespanManager
from PIL import Image

from server.config import Settings


def make_image(width: int = 320, height: int = 240, fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A deterministic image with some structure (gradients and a block), encoded as fmt."""
    image = Image.new("RGB", (width, height))
    pixels = [
        ((x * 255) // width, (y * 255) // height, ((x + y + seed * 40) * 7) % 256)
        for y in range(height)
        for x in range(width)
    ]
    image.putdata(pixels)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def make_video(
    seconds: float = 2.0,
    fps: int = 12,
    width: int = 160,
    height: int = 120,
    container: str = "mp4",
    codec: str = "libx264",
    cuts: tuple[float, ...] = (),
    keyframe_interval_s: float | None = None,
    faststart: bool = False,
    pixel_aspect: fractions.Fraction | None = None,
) -> bytes:
    """A small real video encoded with PyAV (no ffmpeg binary needed): a moving bar, on a
    background whose colour changes abruptly at each time in `cuts` (scene cuts). faststart:
    an MP4 with its index first, as made for the web (the muxer rewrites a real file);
    pixel_aspect: how wide a stored pixel is shown (a DVD's 32:27)."""
    import av
    import numpy as np

    palette = [(200, 30, 30), (30, 180, 40), (40, 40, 200), (230, 230, 230), (20, 20, 20)]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "video"
        options = {"movflags": "faststart"} if faststart else {}
        with av.open(str(out), "w", format=container, options=options) as video:
            stream = video.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if pixel_aspect is not None:
                stream.codec_context.sample_aspect_ratio = pixel_aspect
            if keyframe_interval_s is not None:  # exactly this interval: no scene-cut keyframes
                interval = max(1, int(keyframe_interval_s * fps))
                stream.options = {
                    "x264-params": f"keyint={interval}:min-keyint={interval}:scenecut=0"
                }
            for i in range(int(seconds * fps)):
                frame = np.zeros((height, width, 3), np.uint8)
                if cuts:
                    scene = sum(1 for cut in cuts if i / fps >= cut)
                    frame[:, :] = palette[scene % len(palette)]
                else:
                    frame[:, :, 0] = (i * 7) % 256
                x = (i * 5) % width
                frame[:, x : x + 10, 1] = 255
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    video.mux(packet)
            for packet in stream.encode():
                video.mux(packet)
        return out.read_bytes()


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class MediaServer:
    """A real HTTP server on loopback serving fixed bytes per path."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.redirects: dict[str, str] = {}
        self.requested: list[str] = []
        # paths whose answer waits until their event is set (a host that stalls)
        self.stalls: dict[str, threading.Event] = {}
        files, redirects, requested, stalls = (
            self.files,
            self.redirects,
            self.requested,
            self.stalls,
        )

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                requested.append(self.path)
                if self.path in stalls:
                    stalls[self.path].wait(60)
                if self.path in redirects:
                    self.send_response(302)
                    self.send_header("Location", redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path not in files:
                    self.send_error(404)
                    return
                body, content_type = files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def add(self, path: str, body: bytes, content_type: str = "image/jpeg") -> str:
        self.files[path] = (body, content_type)
        return self.url(path)

    def stall(self, path: str, body: bytes, content_type: str = "image/jpeg") -> str:
        """A URL whose answer waits until stalls[path] is set (at most a minute)."""
        self.stalls[path] = threading.Event()
        return self.add(path, body, content_type)


class WebhookReceiver:
    """A real HTTP receiver on loopback that answers with the scripted statuses in turn, each
    after delay_s; `received` and `answered_at` (monotonic times) record what happened.
    answer "endless": the status, then a body that never ends (`body_bytes_sent` counts what
    the sender let through); "trickle": the status line, then a header byte every 0.2 s."""

    def __init__(self, statuses: list[int], delay_s: float = 0.0, answer: str = "plain"):
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answered_at: list[float] = []
        self.body_bytes_sent = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses[min(len(receiver.received), len(receiver.statuses)) - 1]
                time.sleep(delay_s)
                receiver.answered_at.append(time.monotonic())
                self.send_response(status)
                if answer == "plain":
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with contextlib.suppress(OSError):  # (until the sender hangs up)
                    if answer == "trickle":
                        self.wfile.flush()
                        for byte in b"X-Slow: " + b"y" * 10_000:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.2)
                    self.end_headers()
                    while True:
                        self.wfile.write(b"x" * 65536)
                        receiver.body_bytes_sent += 65536

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/vlm"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def make_settings(model_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "model": str(model_dir),
        "served_model_name": ["animuslabs/Qwen2-VL-NSFW-Vision-1.2", "gpt-4o", "tiny"],
        "default_max_tokens": 16,
        # The tests' media server is on loopback: allow it as an operator allows an internal store.
        "allowed_media_domains": ["127.0.0.1"],
        # httpx's in-process clients send Host: testserver (a keyless loopback server answers
        # only localhost, IP addresses and the names allowed).
        "allowed_hosts": ["testserver"],
        # Every app gets its own job store and spool, never the repository's data/.
        "data_dir": Path(tempfile.mkdtemp(prefix="vlm-data-")),
    }
    values.update(overrides)
    return Settings(**values)


async def start_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    from server.api.app import create_app  # (here: importing the helpers stays light)

    app = create_app(settings)
    # (start-up loads the model: its 5 s default is short on a loaded 2-core machine)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            client.app = app  # type: ignore[attr-defined]  # tests may look at the services
            yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(settings: Settings) -> Iterator[str]:
    """The app under a real uvicorn server on loopback (httpx's ASGITransport buffers whole
    responses, so streaming and disconnects need a real server)."""
    from server.api.app import create_app

    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=free_port(), log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def server_process(
    log_path: Path, *args: str, new_session: bool = False, ignore_sigint: bool = False
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `vlm-server serve ARGS` process on a free port; yields (base URL, process).
    new_session: in a process group of its own, as a terminal's Ctrl-C would reach it.
    ignore_sigint: started with SIGINT ignored, as a script's background job (`cmd &`) is."""
    port = free_port()
    script = Path(sys.executable).with_name("vlm-server")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "server"]
    log = log_path.open("w")
    if "--data-dir" not in args:  # never the repository's data/
        args = (*args, "--data-dir", str(log_path.parent / f"data-{port}"))
    process = subprocess.Popen(
        [*command, "serve", "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=new_session,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        if ignore_sigint
        else None,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}: see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy in time")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
        log.close()


def scene_video_job(webhook_url: str) -> dict:
    """An async categories job on a 20 s video with 5 scenes: long enough (one frame at a time,
    --max-num-seqs 1) to kill a server while it runs."""
    video = make_video(seconds=20, fps=12, cuts=(4.0, 8.0, 12.0, 16.0))
    return {
        "model": "tiny",
        "media_url": "data:video/mp4;base64," + base64.b64encode(video).decode(),
        "use_scenes": True,
        "webhook_url": webhook_url,
    }
