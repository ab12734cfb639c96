"""The scripts' CPU-runnable parts: the GPU check's shell script parses, the GPU benchmark runs
end to end at a test size on the CPU (model built in memory, engine decode steps, roofline row),
and the truncation benchmark runs."""

from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_parses() -> None:
    for script in ("gpu_check.sh", "fetch_gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)


def test_gpu_check_runs_every_engine_test_file() -> None:
    """It names the files one by one (pytest 8.0-8.4 drops files beside a directory): a new
    engine test file must be placed in its list, or the GPU never runs it."""
    import re

    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    listed = re.search(r"for name in (.*?); do engine_files", script, re.S)
    assert listed is not None
    names = {f"test_{name}.py" for name in listed.group(1).replace("\\", " ").split()}
    on_disk = {p.name for p in (ROOT / "tests" / "engine").glob("test_*.py")}
    assert on_disk - names == {"test_host_device.py"}  # (fake CUDA: a CPU test, CI's)
    assert names <= on_disk


def test_bench_gpu_runs_on_the_cpu_at_test_size(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--device", "cpu"]
    command += ["--sizes", "test", "test-moe", "--batches", "1", "4", "--skip-engine"]
    command += ["--loop-batches", "4", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    for size in ("test", "test-moe"):  # a dense model and a mixture of experts
        rows = [row for row in results["decode"] if row["size"] == size]
        modes = [(row["batch"], row["decoder"], row["step"]) for row in rows]
        assert modes == [
            (batch, decoder, step)
            for batch in (1, 4)
            for decoder, step in (("hf", "eager"), ("fused", "eager"), ("fused", "graphs"))
        ] + [(1, "compiled", "graphs")]  # --compile-decoder last, at batch 1 (and 32)
        # float32 on the CPU: the compiled decoder decodes what the fused one does
        assert rows[-1]["same_tokens"] == "1/1 rows = fused"
        # the padded graph step (eager on a CPU) decodes exactly what the eager step does
        assert all(row["same_tokens"] is True for row in rows[2:6:3])
    assert all(row["tok_s"] > 0 and row["roofline_ms"] > 0 for row in results["decode"])
    assert results["memory"]["blocks"] > 0
    # the engine loop with async scheduling decodes exactly what it does without
    assert [(row["batch"], row["async"]) for row in results["loop"]] == [(4, False), (4, True)]
    assert results["loop"][1]["same_tokens"] is True
    assert "| test | reference | fused | graphs | 4 |" in result.stdout


def test_bench_soak_runs_and_leaves_nothing_behind() -> None:
    """A few seconds and a round of every kind of traffic against a started server: each
    answer as expected, each job's webhook delivered, and once idle nothing running or
    waiting, nothing in the KV cache and no temporary file left (the script exits 1 otherwise)."""
    command = [sys.executable, str(ROOT / "scripts" / "bench_soak.py"), "--seconds", "8"]
    command += ["--every", "4", "--concurrency", "3"]
    # Its own session: on a timeout the server and its video workers go with the script.
    script = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = script.communicate(timeout=600)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.communicate()
    assert script.returncode == 0, (stdout + stderr)[-3000:]
    statuses = stdout.split("answers by status: ")[1].split(";")[0]
    assert set(ast.literal_eval(statuses)) == {200, 202, 400}  # a 400: the unreadable image


def test_a_moe_roofline_counts_the_experts_a_step_reads(tiny3moe_model_dir: Path) -> None:
    """4 of 16 experts a token: a row reads a quarter of them, four rows about 68%
    (1 - 0.75^4), and a dense model all its weights whatever the batch."""
    import bench_gpu

    loaded = bench_gpu.random_model("test-moe", "cpu", tiny3moe_model_dir)
    language = loaded.model.model.language_model
    experts = sum(p.numel() * 4 for n, p in language.named_parameters() if ".experts." in n)
    everything = bench_gpu.text_weight_bytes(loaded)
    for batch, share in [(1, 0.25), (4, 1 - 0.75**4), (64, 1 - 0.75**64)]:
        expected = everything - experts * (1 - share)
        assert abs(bench_gpu.step_weight_bytes(loaded, batch) - expected) <= 1
    dense = bench_gpu.random_model("test", "cpu")
    assert bench_gpu.step_weight_bytes(dense, 32) == bench_gpu.text_weight_bytes(dense)


def test_a_part_that_fails_costs_only_its_own_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU this code never ran on, a graph capture or the engine loop may fail: the error
    is recorded and every other part is still measured (one device call brings back what it
    can), and the run then exits non-zero (gpu_check says FAILED)."""
    import bench_gpu

    real = bench_gpu.decode_row

    def graphs_fail(loaded, size, batch, mode, bandwidth):  # type: ignore[no-untyped-def]
        if mode[2]:
            raise RuntimeError("capture failed")
        return real(loaded, size, batch, mode, bandwidth)

    def loop_fails(*args: object) -> list:
        raise torch.cuda.OutOfMemoryError("out of memory")

    monkeypatch.setattr(bench_gpu, "decode_row", graphs_fail)
    monkeypatch.setattr(bench_gpu, "loop_rows", loop_fails)
    monkeypatch.setattr(bench_gpu, "memory_row", lambda loaded: {"blocks": 1})
    args = argparse.Namespace(
        device="cpu", sizes=["test"], batches=[1], loop_batches=[2], skip_engine=True,
        skip_compiled=True,
    )  # fmt: skip
    results: dict = {"bandwidth_gb_s": 1.0, "decode": [], "errors": []}
    bench_gpu.measure(results, args, torch.device("cpu"))
    modes = [(row["decoder"], row["step"]) for row in results["decode"]]
    assert modes == [("hf", "eager"), ("fused", "eager")]  # (fused graphs: failed)
    assert results["memory"] == {"blocks": 1} and results["loop"] == []
    parts = [error.split(": ")[0] for error in results["errors"]]
    assert parts == ["test batch 1 reference/fused/graphs", "test loop"]
    assert "FAILED: test loop: OutOfMemoryError" in bench_gpu.table(results)


def test_bench_truncation_runs_and_keeps_as_much_as_fits() -> None:
    command = [sys.executable, str(ROOT / "scripts" / "bench_truncation.py"), "--repeats", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if " steps, " in line]
    kept = [int(row[3]) for row in rows]
    assert len(kept) == 2 and 400 < kept[0] <= 512 and 6000 < kept[1] <= 8192, result.stdout


def test_bench_grammar_vocab_runs(tmp_path: Path) -> None:
    """(At a small vocabulary: the real size trains for ~15 s and compiles for seconds.)"""
    command = [sys.executable, str(ROOT / "scripts" / "bench_grammar_vocab.py"), "--rounds", "1"]
    command += ["--vocab-size", "2000", "--tokenizer", str(tmp_path / "tokenizer.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert len(rows) == 6 and "categories" in rows[2], result.stdout  # (a header, 5 constraints)
