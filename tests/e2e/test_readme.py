"""The README's examples, run as written against a live `vlm-server` with a ~1 MB photo and a
~1 MB video: every bash block that calls the server (curl with heredocs or jq), and every Python
block (httpx, the OpenAI SDK). Only the addresses change: the server's port, and example.com
URLs served by a local media server (allowed with --allowed-media-domains)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import MediaServer, WebhookReceiver, make_image, server_process

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
README_URL = "http://127.0.0.1:8000"
MEGABYTE = 1024 * 1024


def noisy_photo() -> bytes:
    """A JPEG of about 1 MB (noise does not compress)."""
    pixels = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def noisy_video(seconds: int = 4, fps: int = 8) -> bytes:
    """An MP4 of about 1 MB: noise over a few scenes."""
    import av

    rng = np.random.default_rng(1)
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 256, 192, "yuv420p"
        for _ in range(seconds * fps):
            pixels = rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def blocks(language: str) -> list[str]:
    found = re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(), re.M | re.S)
    calls = "curl " if language == "bash" else README_URL  # not `make serve` and the like
    return [b for b in found if README_URL in b and calls in b]


@pytest.fixture(scope="module")
def live(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, media_server: MediaServer
) -> Iterator[tuple[str, Path, dict[str, str]]]:
    work = tmp_path_factory.mktemp("readme")
    photo, video = noisy_photo(), noisy_video()
    assert 0.7 * MEGABYTE < len(photo) < 2 * MEGABYTE, len(photo)
    assert 0.7 * MEGABYTE < len(video) < 3 * MEGABYTE, len(video)
    (work / "photo.jpg").write_bytes(photo)
    (work / "clip.mp4").write_bytes(video)
    urls = {
        f"https://example.com/{name}": media_server.add(f"/readme/{name}", data, mime)
        for name, data, mime in [
            ("a.jpg", make_image(320, 240), "image/jpeg"),
            ("b.jpg", make_image(320, 240, seed=1), "image/jpeg"),
            ("cityscape.jpg", photo, "image/jpeg"),
            ("clip.mp4", video, "video/mp4"),
        ]
    }
    hooks = WebhookReceiver([200] * 10)
    urls["https://hooks.example.com/vlm"] = hooks.url
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny"]
    # Short answers from the random-weight model keep the test quick; the examples are unchanged.
    args += ["--default-max-tokens", "8", "--caption-tokens", "8"]
    args += ["--allowed-media-domains", "127.0.0.1"]
    with server_process(work / "server.log", *args) as (url, _):
        urls[README_URL] = url
        yield url, work, urls
    hooks.server.shutdown()


def localised(block: str, urls: dict[str, str]) -> str:
    for public, local in urls.items():
        block = block.replace(public, local)
    return block


@pytest.mark.parametrize("index", range(len(blocks("bash"))))
def test_readme_shell_example(index: int, live: tuple[str, Path, dict[str, str]]) -> None:
    _, work, urls = live
    script = localised(blocks("bash")[index], urls)
    if "jq " in script and shutil.which("jq") is None:
        if os.environ.get("CI") == "true" or os.environ.get("UI_TESTS_REQUIRED"):
            pytest.fail("this example needs jq; .ci/run installs it")
        pytest.skip("this example needs jq (apt-get install -y jq); CI installs it")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # (split at newlines only: a random model's text may hold U+2028 or U+0085, which JSON
    # carries as they are and str.splitlines() would split at)
    answers = [json.loads(line) for line in done.stdout.split("\n") if line.strip()]
    assert answers, "no output"
    for answer in answers:
        assert answer.get("error") is None, answer


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_example(index: int, live: tuple[str, Path, dict[str, str]]) -> None:
    _, work, urls = live
    done = subprocess.run(
        [sys.executable, "-c", localised(blocks("python")[index], urls)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # It printed what it reads (a random-weight model's answer may be empty: one CI run's
    # first token was the end of text; the response still parsed as the example reads it).
    assert done.stdout
