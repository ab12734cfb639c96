"""The GPU check's CPU-runnable parts: the shell script parses, and the GPU benchmark runs end
to end at a test size on the CPU (model built in memory, engine decode steps, roofline row)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_parses() -> None:
    for script in ("gpu_check.sh", "fetch_gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)


def test_bench_gpu_runs_on_the_cpu_at_test_size(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--device", "cpu"]
    command += ["--sizes", "test", "--batches", "1", "4", "--skip-engine", "--json", str(out)]
    command += ["--loop-batches", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    modes = [(row["batch"], row["decoder"], row["step"]) for row in results["decode"]]
    assert modes == [
        (batch, decoder, step)
        for batch in (1, 4)
        for decoder, step in (("hf", "eager"), ("fused", "eager"), ("fused", "graphs"))
    ] + [(1, "compiled", "graphs")]  # --compile-decoder last, at batch 1 (and 32)
    # float32 on the CPU: the compiled decoder decodes what the fused one does
    assert results["decode"][-1]["same_tokens"] == "1/1 rows = fused"
    assert all(row["tok_s"] > 0 and row["roofline_ms"] > 0 for row in results["decode"])
    # the padded graph step (eager on a CPU) decodes exactly what the eager step does
    assert all(row["same_tokens"] is True for row in results["decode"][2:6:3])
    assert results["memory"]["blocks"] > 0
    # the engine loop with async scheduling decodes exactly what it does without
    assert [(row["batch"], row["async"]) for row in results["loop"]] == [(4, False), (4, True)]
    assert results["loop"][1]["same_tokens"] is True
    assert "| test | reference | fused | graphs | 4 |" in result.stdout
