"""What an idle server costs: its transactions a second on a PostgreSQL job store (every
replica adds its own) and its CPU, measured on a real server (`vlm-server serve`, the tiny
model) doing nothing for --seconds after --warmup.

    python scripts/bench_idle.py --postgres postgresql://postgres@127.0.0.1:5432/postgres

A database of its own is made (and dropped after): pg_stat_database counts its transactions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]


def transactions(admin: psycopg.Connection, database: str) -> int:
    row = admin.execute(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
        (database,),
    ).fetchone()
    return int(row[0]) if row else 0


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_healthy(port: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--port", type=int, default=8391)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    database = f"bench_idle_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.postgres, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
        url = args.postgres.rsplit("/", 1)[0] + "/" + database
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        with tempfile.TemporaryDirectory() as data_dir:
            command = [sys.executable, "-m", "server", "serve", "--model", "tiny"]
            command += ["--port", str(args.port), "--job-store", url, "--data-dir", data_dir]
            quiet = {"stdout": subprocess.DEVNULL, "stderr": sys.stderr}
            server = subprocess.Popen(command, env=env, **quiet)
            try:
                wait_healthy(args.port)
                time.sleep(args.warmup)
                before = transactions(admin, database), cpu_ticks(server.pid)
                time.sleep(args.seconds)
                after = transactions(admin, database), cpu_ticks(server.pid)
            finally:
                server.terminate()
                server.wait(30)
        admin.execute(f"DROP DATABASE {database} WITH (FORCE)")
    per_s = (after[0] - before[0]) / args.seconds
    hz = os.sysconf("SC_CLK_TCK")
    cpu = (after[1] - before[1]) / hz / args.seconds * 100
    print("| idle for | job store transactions / s | server CPU |")
    print("| --- | --- | --- |")
    print(f"| {args.seconds:g} s | {per_s:.1f} | {cpu:.2f} % |")


if __name__ == "__main__":
    main()
