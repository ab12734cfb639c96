"""Job store throughput: jobs claimed (and completed) per second by 1, 2 and 4 replica processes
on one PostgreSQL, and by one process on SQLite; then a chaos run with replicas SIGKILLed and
restarted at random, checking that every job completes and none is completed twice.

    python scripts/bench_jobs.py                                   # all of it, markdown tables
    python scripts/bench_jobs.py --postgres postgresql://postgres@127.0.0.1:5432/test \
        --jobs 2000 --replicas 1 2 4 --chaos-seconds 20

Each replica is a separate process running the server's own JobWorker (claim with a lease,
renew, fenced complete) with a no-op handler (--handler-ms to make it sleep), `--concurrency`
claim loops each. The jobs are queued before the replicas are told to start; the clock runs from
then until the last job is completed. PostgreSQL runs get a schema of their own, dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.jobs import worker as worker_module  # noqa: E402
from server.jobs.store import JobStore, open_job_store  # noqa: E402
from server.jobs.worker import JobWorker  # noqa: E402


# -- one replica (a child process) ------------------------------------------------------------
def run_replica(url: str, go_file: Path, log_file: Path, args: argparse.Namespace) -> None:
    """Waits for the go file, then works until killed; each completion that the store accepted
    is appended to log_file (a job logged twice would be a job completed twice)."""
    store = open_job_store(url, log_file.parent)
    complete = store.complete

    def logged_complete(job, result) -> bool:  # type: ignore[no-untyped-def]
        done = complete(job, result)
        if done:
            with log_file.open("a") as log:
                log.write(f"{job.id}\n")
        return done

    store.complete = logged_complete  # type: ignore[method-assign]

    async def handler(job, progress) -> dict:  # type: ignore[no-untyped-def]
        if args.handler_ms:
            await asyncio.sleep(args.handler_ms / 1000)
        return {}

    async def work() -> None:
        while not go_file.exists():
            await asyncio.sleep(0.01)
        worker_module.IDLE_POLL_S = 0.2
        worker = JobWorker(
            store, {"bench": handler}, concurrency=args.concurrency, lease_s=args.lease
        )
        worker.start()
        await asyncio.Event().wait()

    asyncio.run(work())


# -- the driver --------------------------------------------------------------------------------
@contextmanager
def fresh_url(args: argparse.Namespace, backend: str, workdir: Path):
    if backend == "sqlite":
        yield f"sqlite:///{workdir / f'jobs-{uuid.uuid4().hex[:6]}.sqlite3'}"
        return
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.postgres, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in args.postgres else "?"
    try:
        yield f"{args.postgres}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(args.postgres, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")


def start_replica(url: str, go: Path, log: Path, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, __file__, "--replica", url, str(go), str(log)]
    command += ["--concurrency", str(args.concurrency), "--lease", str(args.lease)]
    command += ["--handler-ms", str(args.handler_ms)]
    return subprocess.Popen(command, stderr=subprocess.DEVNULL)


def queue_jobs(store: JobStore, count: int) -> None:
    for n in range(count):
        store.create("bench", {"n": n}, None)


def completed(store: JobStore) -> int:
    return (store.count_by_status() or {}).get("completed", 0)


def run(args: argparse.Namespace, backend: str, replicas: int, chaos_s: float = 0.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp, fresh_url(args, backend, Path(tmp)) as url:
        workdir = Path(tmp)
        store = open_job_store(url, workdir)
        jobs = args.jobs if not chaos_s else args.chaos_jobs
        queue_jobs(store, jobs)
        go = workdir / "go"
        procs = [start_replica(url, go, workdir / f"log-{i}", args) for i in range(replicas)]
        time.sleep(args.warmup)  # the replicas import and open the store
        go.touch()
        started = time.monotonic()
        kills = 0
        while completed(store) < jobs:
            if chaos_s and random.random() < 0.2:
                victim = random.randrange(replicas)
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait()
                procs[victim] = start_replica(url, go, workdir / f"log-{victim}-{kills}", args)
                kills += 1
            time.sleep(0.05 if not chaos_s else chaos_s / 50)
            if time.monotonic() - started > args.timeout:
                break
        elapsed = time.monotonic() - started
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        logged = [line for log in workdir.glob("log-*") for line in log.read_text().split()]
        with store.transaction(write=False) as execute:
            rows = execute("SELECT attempt, COUNT(*) AS n FROM jobs GROUP BY attempt", ())
            attempts = {row["attempt"]: row["n"] for row in rows.fetchall()}
        done = completed(store)
        store.close()
    return {
        "backend": backend,
        "replicas": replicas,
        "jobs": jobs,
        "seconds": elapsed,
        "per_s": done / elapsed,
        "completed": done,
        "lost": jobs - done,
        "completed_twice": len(logged) - len(set(logged)),
        "retaken": sum(n for attempt, n in attempts.items() if attempt > 1),
        "kills": kills,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--concurrency", type=int, default=4, help="claim loops per replica")
    parser.add_argument("--handler-ms", type=float, default=0.0)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--chaos-seconds", type=float, default=20.0, help="0: no chaos run")
    parser.add_argument("--chaos-jobs", type=int, default=3000)
    parser.add_argument("--replica", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replica:
        url, go, log = args.replica
        with suppress(KeyboardInterrupt):
            run_replica(url, Path(go), Path(log), args)
        return
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results = [run(args, "sqlite", 1)]
    results += [run(args, "postgres", n) for n in args.replicas]
    print("| store | replicas | jobs | seconds | jobs/s | lost | completed twice |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['backend']} | {r['replicas']} | {r['jobs']} | {r['seconds']:.2f} |"
            f" {r['per_s']:.0f} | {r['lost']} | {r['completed_twice']} |"
        )
    if args.chaos_seconds:
        chaos_args = argparse.Namespace(**{**vars(args), "handler_ms": 50.0, "lease": 2.0})
        r = run(chaos_args, "postgres", max(args.replicas), args.chaos_seconds)
        print(
            f"\nchaos: {r['replicas']} replicas, {r['kills']} SIGKILLs + restarts,"
            f" {r['jobs']} jobs of 50 ms in {r['seconds']:.1f} s: completed {r['completed']},"
            f" lost {r['lost']}, completed twice {r['completed_twice']},"
            f" taken over after a kill {r['retaken']}"
        )


if __name__ == "__main__":
    main()
