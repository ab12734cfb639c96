"""Engine tests: every family loaded once per module, every test with and without async
scheduling, and every engine a test builds must end with all of its KV blocks free."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.loader import LoadedModel, load_model


@pytest.fixture(
    scope="module",
    params=["tiny_model_dir", "tiny25_model_dir", "tiny3_model_dir", "tiny3moe_model_dir"],
)
def loaded(request: pytest.FixtureRequest) -> LoadedModel:
    """Every family: Qwen2-VL, Qwen2.5-VL (window attention, rope in seconds), Qwen3-VL
    (16-pixel patches, DeepStack, interleaved rope, timestamped video frames) and Qwen3-VL's
    mixture of experts (each token's MLP is 2 of 8 experts)."""
    path: Path = request.getfixturevalue(request.param)
    config = Settings(model=str(path)).engine_config()
    moe = request.param == "tiny3moe_model_dir"
    # (the GPU check's float32: test_qwen3.py has a bfloat16 test of the family on CUDA)
    if moe and config.device.startswith("cuda") and config.dtype not in ("auto", "bfloat16"):
        pytest.skip("a mixture of experts runs on CUDA in bfloat16 only")
    return load_model(config)


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "async"])
def async_scheduling(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Engines built from Settings schedule both ways (--async-scheduling)."""
    monkeypatch.setenv("VLM_ASYNC_SCHEDULING", "1" if request.param else "0")
    return request.param


@pytest.fixture(autouse=True)
def every_block_is_freed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    built: list[AsyncEngine] = []
    build = AsyncEngine.build.__func__  # type: ignore[attr-defined]

    def recording_build(cls: type[AsyncEngine], *args: object, **kwargs: object) -> AsyncEngine:
        built.append(build(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(AsyncEngine, "build", classmethod(recording_build))
    yield
    for engine in built:
        blocks = engine.scheduler.blocks
        assert blocks.num_free_blocks == blocks.num_blocks, "KV blocks leaked"
        assert all(block.ref_count == 0 for block in blocks.blocks)
