"""Shared fixtures: tiny checkpoints (built once per run through the real builder), a real
local HTTP server for media URLs, and the app with its real lifespan."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from server.engine.tiny import TinySpec, make_tiny_checkpoint
from tests.helpers import MediaServer, WebhookReceiver, make_settings, start_client


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", default="cpu", help="device the server-side tests load models on (cpu, cuda)"
    )
    parser.addoption(
        "--dtype",
        default="auto",
        help="dtype they load in; the GPU check uses float32, where token-for-token comparisons "
        "with HF generate are meaningful (bf16 rounds differently with the batch shape)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Settings read VLM_DEVICE / VLM_DTYPE, so every app and engine the tests build uses them.
    os.environ["VLM_DEVICE"] = config.getoption("--device")
    os.environ["VLM_DTYPE"] = config.getoption("--dtype")
    # Started in the background by a shell (`pytest ... &`), this run ignores SIGINT and the
    # servers it starts inherit that: their Ctrl-C tests then saw exit 0, not 130. Handled
    # here, SIGINT is back at its default in every child (as a terminal's run has it).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if config.getoption("--device").startswith("cuda"):
        import torch

        # TF32 matmuls and convolutions (the vision tower's patch embedding) are not float32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        # On CUDA the KV cache is sized by the memory profile: 90% of the card. For the tiny
        # models that is ~16M blocks (a Python object each) and ~125 GiB per engine, and the
        # tests build hundreds of engines. 0.1 GiB holds ~200k of their tokens, more than the
        # CPU runs get; a test that sets kv_cache_memory itself still wins.
        os.environ.setdefault("VLM_KV_CACHE_MEMORY", "0.1")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def tiny25_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl", TinySpec(family="qwen2.5-vl")
    )


@pytest.fixture(scope="session")
def tiny3_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("models") / "tiny-qwen3-vl", TinySpec(family="qwen3-vl")
    )


@pytest.fixture(scope="session")
def tiny3moe_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("models") / "tiny-qwen3-vl-moe", TinySpec(family="qwen3-vl-moe")
    )


@pytest.fixture(scope="session")
def media_server() -> Iterator[MediaServer]:
    server = MediaServer()
    server.thread.start()
    yield server
    server.server.shutdown()


@pytest.fixture
def webhook_receiver() -> Iterator:
    """Makes real webhook receivers (scripted statuses in turn); all shut down afterwards."""
    made: list[WebhookReceiver] = []

    def make(statuses: list[int], delay_s: float = 0.0, answer: str = "plain") -> WebhookReceiver:
        made.append(WebhookReceiver(statuses, delay_s, answer))
        return made[-1]

    yield make
    for receiver in made:
        receiver.server.shutdown()


@pytest.fixture(scope="module")
async def client(tiny_model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in start_client(make_settings(tiny_model_dir)):
        yield c
