"""scripts/bench_jobs.py runs end to end at a small size (SQLite and one PostgreSQL replica, then
a short chaos run) and finds no job lost or completed twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.jobs.pg import require_postgres

ROOT = Path(__file__).resolve().parents[2]


def test_bench_jobs_runs_at_a_small_size() -> None:
    url = require_postgres()
    command = [sys.executable, str(ROOT / "scripts" / "bench_jobs.py"), "--postgres", url]
    command += ["--jobs", "60", "--replicas", "1", "--warmup", "2"]
    command += ["--chaos-seconds", "2", "--chaos-jobs", "80"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| sqlite | 1 | 60 |" in result.stdout and "| postgres | 1 | 60 |" in result.stdout
    for line in result.stdout.splitlines():
        if line.startswith(("| sqlite", "| postgres")):
            assert line.endswith("| 0 | 0 |"), line  # none lost, none completed twice
    assert "completed 80, lost 0, completed twice 0" in result.stdout
