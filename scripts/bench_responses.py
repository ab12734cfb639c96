"""What continuing a stored conversation costs the job store: reading it back
(`previous_response_id`: one recursive query over its turns; `conversation`: its items, two a
turn) and saving a new turn (which renews every turn before it), by conversation length, on
SQLite and PostgreSQL. Each turn holds a user message of ~200 characters and an answer of
~600.

    python scripts/bench_responses.py                      # markdown table
    python scripts/bench_responses.py --turns 1 10 100 1000 --repeats 20 \
        --postgres postgresql://postgres@127.0.0.1:5432/test

Medians of --repeats reads (and of as many saves, each a new turn after the conversation's
last, as a branch: the conversation stays as long).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_jobs import fresh_url  # noqa: E402
from server.jobs.store import JobStore, open_job_store  # noqa: E402

QUESTION = "Describe what changed between the two frames, in detail. " * 4
ANSWER = "The second frame shows the same street at dusk; the lights are on. " * 9


def turn(rid: str, previous: str | None) -> tuple[dict, list[dict]]:
    output = [{"id": f"msg_{rid}", "type": "message", "role": "assistant", "status": "completed"}]
    output[0]["content"] = [{"type": "output_text", "text": ANSWER, "annotations": []}]
    response = {"id": rid, "previous_response_id": previous, "status": "completed"}
    response["output"] = output
    question = {"id": f"msg_q{rid}", "type": "message", "role": "user"}
    question["content"] = [{"type": "input_text", "text": QUESTION}]
    return response, [question]


def chain(store: JobStore, turns: int) -> str:
    previous = None
    for _ in range(turns):
        rid = f"resp_{uuid.uuid4().hex}"
        store.save_response(*turn(rid, previous), project="")
        previous = rid
    assert previous is not None
    return previous


def median_ms(action, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(store: JobStore, turns: int, repeats: int) -> tuple[float, float, float]:
    last = chain(store, turns)
    read = median_ms(lambda: store.conversation(last, project=""), repeats)
    saved = [last]

    def save() -> None:
        rid = f"resp_{uuid.uuid4().hex}"
        store.save_response(*turn(rid, last), project="")  # a branch: the chain stays `turns` long
        saved.append(rid)

    save_ms = median_ms(save, repeats)
    conversation_id = f"conv_{uuid.uuid4().hex}"
    response, (question,) = turn("x", None)
    store.create_conversation(conversation_id, {}, [], project="")
    for _ in range(turns):  # each turn adds its question and its answer, as a response does
        pair = [question, *response["output"]]
        store.add_items(
            conversation_id, [{**item, "id": uuid.uuid4().hex} for item in pair], project=""
        )
    items_ms = median_ms(lambda: store.conversation_items(conversation_id, project=""), repeats)
    return read, save_ms, items_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    args = parser.parse_args()
    print("| backend | turns | read the chain (ms) | save a turn (ms) | read its items (ms) |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as workdir:
        for backend in args.backends:
            for turns in args.turns:
                with fresh_url(args, backend, Path(workdir)) as url:
                    store = open_job_store(url, Path(workdir))
                    try:
                        read, save, items = measure(store, turns, args.repeats)
                    finally:
                        store.close()
                print(f"| {backend} | {turns} | {read:.2f} | {save:.2f} | {items:.2f} |")


if __name__ == "__main__":
    main()
