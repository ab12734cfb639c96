"""Paged attention: the reference against dense causal sdpa (decodes, chunks over cached
context, scattered blocks, GQA), and the Triton decode kernel against the reference (on the
CPU through Triton's interpreter, in a subprocess: the interpreter is chosen at import)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from server.engine import attention
from tests.engine.attention_cases import GQA_SHAPES, make_case


@pytest.mark.parametrize("shape", GQA_SHAPES)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("gather_cap", [64, 1 << 18])  # decodes split into groups, or not
def test_reference_matches_dense_sdpa(
    shape: str, block_size: int, gather_cap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attention, "MAX_GATHERED_TOKENS", gather_cap)
    heads, kv_heads = GQA_SHAPES[shape]
    # Decodes of several lengths, a first chunk, a chunk over a longer cached context
    # (lower-right causal), one over a shorter cached context (padded to a causal square), a
    # one-block prompt.
    case = make_case(
        heads,
        kv_heads,
        32,
        [40, 23, 70, 50, 5, 9, 33],
        [1, 23, 30, 30, 5, 1, 1],
        block_size,
        "cpu",
        torch.float32,
    )
    torch.testing.assert_close(case.paged(False), case.dense(), rtol=1e-5, atol=1e-5)


def test_triton_decode_kernel_matches_the_reference_interpreted() -> None:
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from tests.engine.attention_cases import max_kernel_error\n"
        "print(max_kernel_error('cpu', torch.float32, head_dim=32))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_decode_kernel_on_cuda(dtype: torch.dtype) -> None:
    from tests.engine.attention_cases import max_kernel_error

    assert max_kernel_error("cuda", dtype) < 2e-2


def test_engine_on_triton_interpreted_decodes_like_the_reference(tiny_model_dir) -> None:
    pytest.importorskip("triton")
    code = (
        "import sys\n"
        "from tests.engine.attention_cases import engine_tokens\n"
        "print(engine_tokens(sys.argv[1], 'triton'))\n"
        "print(engine_tokens(sys.argv[1], 'triton', graphs=True))\n"
        "print(engine_tokens(sys.argv[1], 'reference'))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # eager, then the decode steps through the graph buffers (what a GPU captures and replays;
    # with and without async scheduling, as every engine test here)
    triton_tokens, graph_tokens, reference_tokens = result.stdout.strip().splitlines()[-3:]
    assert triton_tokens == graph_tokens == reference_tokens and "[]" not in triton_tokens


def test_a_triton_kernel_that_cannot_compile_stops_the_start(
    loaded, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Triton builds its launcher with a C compiler at the kernel's first run: that run is at
    start, so a machine without one fails there with the reason, not in the first decode."""
    pytest.importorskip("triton")
    if loaded.device.type == "cuda":  # (a real compiler there; and float32 is refused first)
        pytest.skip("a CPU test of the start's refusal (Triton's interpreter)")
    from server.engine import triton_attention
    from server.engine.runner import use_decode_kernel
    from server.exceptions import ModelLoadError

    def no_compiler(*args: object) -> None:
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable")

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the CUDA check, on this CPU
    monkeypatch.setattr(triton_attention, "compile_now", no_compiler)
    with pytest.raises(ModelLoadError, match="C compiler and Python's headers"):
        use_decode_kernel("triton", loaded, 16)

    def out_of_resources(*args: object) -> None:
        raise RuntimeError("out of resource: shared memory, Required: 262144")

    monkeypatch.setattr(triton_attention, "compile_now", out_of_resources)
    with pytest.raises(ModelLoadError, match="shared memory") as error:  # no compiler hint
        use_decode_kernel("triton", loaded, 16)
    assert "C compiler" not in str(error.value)
