"""Runs a batch (a job of kind `batch`): its input file's requests, each answered by the route
its line names, exactly as an HTTP client would have been answered.

Each line goes through the app itself (httpx's ASGI transport: no socket), so every check,
default, limit and error of /v1/chat/completions, /v1/completions and /v1/responses applies
with no second copy of them; a line's answer is its status and body. A 503 (the engine's queue
full, or waited too long) is not an answer: that line is sent again, backing off, as a client
would. Lines run `concurrency` at a time, so the engine's batch stays full without flooding
its queue; under --scheduling-policy priority they run at --job-priority unless they name one.

The output file holds the 200s, the error file every other answer, each as OpenAI writes
them (`{id, custom_id, response: {status_code, request_id, body}, error}`), in input order.
Answers and request counts are saved a few times a second while it runs (the job store's
`batch_answers`): a batch taken over (its replica died or was redeployed) goes on from them,
a cancelled one keeps them, and its end turns them into the two files in one transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from server.api.batches import BatchCreateRequest
from server.exceptions import EngineStopped, JobStoreUnavailable
from server.jobs.project import current_project
from server.jobs.store import Job, JobStore
from server.jobs.worker import INTERNAL_ERROR, JobFailed, Progress, cancel_and_wait
from server.strict_json import loads

logger = logging.getLogger(__name__)

MAX_REQUESTS = 50_000  # OpenAI's limit per batch
MAX_OUTPUT_BYTES = 512 * 2**20  # the output and error files together (stored whole)
# 503s a client retries: the engine busy, or the job store out for a moment (a request that
# reads it: previous_response_id, a file by id). Any other 503 is an engine stopped or a server
# shutting down.
RETRIED_CODES = ("server_overloaded", "queue_timeout", "job_store_unavailable")
MAX_REPORTED_ERRORS = 100  # invalid lines listed in a failed batch's errors
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # a line's 503s, then every 30 s
COUNTS_FLUSH_S = 1.0
CHECKED_KEYS = ("custom_id", "method", "url", "body")

# (url, body, request id) -> (status, JSON body)
Dispatch = Callable[[str, dict[str, Any], str], Awaitable[tuple[int, dict[str, Any]]]]


@dataclass(frozen=True)
class BatchLine:
    custom_id: str
    body: dict[str, Any]


@dataclass
class Tally:
    """What a batch has done so far, as its status shows it."""

    total: int
    completed: int = 0
    failed: int = 0
    usage: dict[str, int] = field(default_factory=dict)
    output_bytes: int = 0
    model: str | None = None  # the first line's, as the batch shows it

    def add(self, status: int, body: dict[str, Any]) -> None:
        if status != 200:
            self.failed += 1
            return
        self.completed += 1
        usage = body.get("usage") or {}
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        output_details = (
            usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
        )
        for key, value in (
            ("input_tokens", usage.get("prompt_tokens", usage.get("input_tokens"))),
            ("output_tokens", usage.get("completion_tokens", usage.get("output_tokens"))),
            ("cached_tokens", details.get("cached_tokens")),
            ("reasoning_tokens", output_details.get("reasoning_tokens")),
        ):
            self.usage[key] = self.usage.get(key, 0) + (value or 0)

    def counts(self) -> dict[str, int]:
        return {"total": self.total, "completed": self.completed, "failed": self.failed}

    def progress(self, started: int) -> dict[str, Any]:
        """What the batch's status shows while it runs (and keeps, if it is cancelled)."""
        return {
            "request_counts": self.counts(),
            "in_progress_at": started,
            "model": self.model,
            "usage": self.usage_object(),
        }

    def usage_object(self) -> dict[str, Any]:
        get = self.usage.get
        return {
            "input_tokens": get("input_tokens", 0),
            "input_tokens_details": {"cached_tokens": get("cached_tokens", 0)},
            "output_tokens": get("output_tokens", 0),
            "output_tokens_details": {"reasoning_tokens": get("reasoning_tokens", 0)},
            "total_tokens": get("input_tokens", 0) + get("output_tokens", 0),
        }


def asgi_dispatch(client: httpx.AsyncClient) -> Dispatch:
    """Lines sent to the app through `client` (an httpx client over the app's ASGI transport,
    as internal requests: no API key)."""

    async def dispatch(url: str, body: dict[str, Any], request_id: str) -> tuple[int, dict]:
        headers = {"X-Request-ID": request_id}
        try:
            response = await client.post(url, json=body, headers=headers)
        except Exception:  # the route crashed (its 500 is in the log): this line alone fails
            logger.exception("batch line %s failed", request_id)
            return 500, {"error": INTERNAL_ERROR}
        try:
            return response.status_code, response.json()
        except ValueError:  # not JSON (no route answers so): kept as an error
            error = {"message": response.text[:1000], "type": "server_error"}
            return response.status_code, {"error": error}

    return dispatch


async def send_until_served(
    dispatch: Dispatch, url: str, body: dict[str, Any], request_id: str
) -> tuple[int, dict]:
    """A job's request and its answer, sent again while the engine is busy (the queue full, or
    waited too long); an engine that stopped, or a server shutting down, puts the job back in
    the queue (for another replica, or the next start)."""
    retries = 0
    while True:
        status, answer = await dispatch(url, body, request_id)
        if status != 503:
            return status, answer
        await wait_to_retry(answer, retries)
        retries += 1


async def wait_to_retry(answer: dict[str, Any], retries: int) -> None:
    """After a 503: the pause before the next try while the engine is busy; EngineStopped
    (the job back to the queue) when it stopped or the server is shutting down."""
    if (answer.get("error") or {}).get("code") not in RETRIED_CODES:
        raise EngineStopped("The engine stopped under the job.")
    await asyncio.sleep(RETRY_DELAYS_S[min(retries, len(RETRY_DELAYS_S) - 1)])


def parse_lines(content: bytes, endpoint: str) -> list[BatchLine]:
    """The file's requests, or JobFailed listing the lines that are not one (as OpenAI checks
    them: JSON, a unique custom_id, POST to the batch's endpoint, a body object)."""
    try:
        text = content.decode("utf-8-sig")  # (a byte-order mark, as some editors write, is fine)
    except UnicodeDecodeError:
        raise _invalid([_problem("invalid_file", "The input file is not UTF-8 text.")]) from None
    lines: list[BatchLine] = []
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    # Lines end at \n only: JSON text may hold U+2028 and the like, where splitlines() cuts.
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        line, problem = _parse_line(raw, number, endpoint, seen)
        if problem is not None:
            problems.append(problem)
        elif line is not None:
            seen.add(line.custom_id)
            lines.append(line)
    if not lines and not problems:
        problems.append(_problem("empty_file", "The input file holds no requests."))
    if len(lines) > MAX_REQUESTS:
        message = f"A batch holds at most {MAX_REQUESTS} requests; this file has {len(lines)}."
        problems.append(_problem("too_many_requests", message))
    if problems:
        raise _invalid(problems)
    return lines


def _parse_line(
    raw: str, number: int, endpoint: str, seen: set[str]
) -> tuple[BatchLine | None, dict[str, Any] | None]:
    try:
        item = loads(raw)  # (NaN and Infinity: not JSON, as in a request's body)
    except (ValueError, RecursionError):  # (RecursionError: nested past Python's stack)
        return None, _problem("invalid_json_line", "This line is not valid JSON.", line=number)
    if not isinstance(item, dict):
        return None, _problem("invalid_json_line", "This line is not a JSON object.", line=number)
    if unknown := sorted(set(item) - set(CHECKED_KEYS)):
        message = f"Unknown keys {unknown}: a line holds custom_id, method, url and body."
        return None, _problem("invalid_request", message, param=unknown[0], line=number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        message = "custom_id must be a non-empty string, unique in the batch."
        return None, _problem("missing_required_parameter", message, "custom_id", number)
    if custom_id in seen:
        message = f"custom_id {custom_id!r} is used by an earlier line; each must be unique."
        return None, _problem("duplicate_custom_id", message, "custom_id", number)
    if item.get("method") != "POST":
        message = "method must be POST."
        return None, _problem("invalid_method", message, "method", number)
    if item.get("url") != endpoint:
        message = f"url must be the batch's endpoint, {endpoint}."
        return None, _problem("mismatched_url", message, "url", number)
    body = item.get("body")
    if not isinstance(body, dict):
        return None, _problem("invalid_body", "body must be a JSON object.", "body", number)
    return BatchLine(custom_id, body), None


def _problem(
    code: str, message: str, param: str | None = None, line: int | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _invalid(problems: list[dict[str, Any]]) -> JobFailed:
    listed = problems[:MAX_REPORTED_ERRORS]
    message = f"The input file has {len(problems)} invalid line(s)"
    if len(listed) < len(problems):
        message += f" (the first {len(listed)} are listed)"
    return JobFailed(message + ".", listed, code="invalid_batch_file")


class BatchRunner:
    """The job worker's handler for `batch` jobs."""

    def __init__(
        self,
        store: JobStore,
        dispatch: Dispatch,
        concurrency: int,
        job_priority: int | None = None,
    ):
        self.store = store
        self.dispatch = dispatch
        self.concurrency = max(1, concurrency)
        self.job_priority = job_priority  # None: priorities are not looked at

    async def __call__(self, job: Job, progress: Progress) -> dict[str, Any]:
        request = BatchCreateRequest.model_validate(job.request)
        content = await asyncio.to_thread(
            self.store.file_content,
            request.input_file_id,
            current_project(),  # (the batch's)
            True,  # (deleted since the batch was made: kept for it)
        )
        if content is None:
            message = f"The input file {request.input_file_id} was deleted before the batch ran."
            raise JobFailed(message, [_problem("file_not_found", message, "input_file_id")])
        lines = await asyncio.to_thread(parse_lines, content, request.endpoint)
        del content  # (up to the upload limit: not kept while the lines run)
        started = (job.result or {}).get("in_progress_at") or int(time.time())
        model = lines[0].body.get("model")
        tally = Tally(total=len(lines), model=model if isinstance(model, str) else None)
        done = await self._resume(job, tally)
        todo = [(index, line) for index, line in enumerate(lines) if index not in done]
        pending: list[tuple[int, int, str]] = []  # answers not saved yet
        lost = asyncio.Event()  # a save was refused: the batch is no longer this attempt's
        saver = asyncio.create_task(self._save_loop(job, tally, started, pending, lost))
        try:
            await self._run_lines(job, todo, pending, tally, progress, lost)
        finally:
            await cancel_and_wait([saver])
        await self._save(job, tally, started, pending, retry=True)
        logger.info(
            "batch %s: %d requests, %d completed, %d failed",
            job.id,
            tally.total,
            tally.completed,
            tally.failed,
        )
        # (its files: the saved answers, turned into them as the batch completes)
        return tally.progress(started)

    async def _resume(self, job: Job, tally: Tally) -> set[int]:
        """The lines an earlier attempt answered (a batch taken over goes on from them),
        counted into `tally`."""
        saved = await asyncio.to_thread(self.store.answers, job.id)
        for _, status, entry in saved:
            tally.add(status, json.loads(entry)["response"]["body"])
            tally.output_bytes += len(entry) + 1
        if saved:
            logger.info("batch %s: going on after %d saved answers", job.id, len(saved))
        return {line for line, _, _ in saved}

    async def _run_lines(
        self,
        job: Job,
        todo: list[tuple[int, BatchLine]],
        pending: list[tuple[int, int, str]],
        tally: Tally,
        progress: Progress,
        lost: asyncio.Event,
    ) -> None:
        """`concurrency` workers take the lines in order, until the batch is lost (cancelled
        elsewhere, or taken over); each answer joins `pending`."""
        queue = iter(todo)

        async def work() -> None:
            for index, line in queue:
                if lost.is_set():
                    return
                status, answer, entry = await self._answer(job, line)
                pending.append((index, status, entry))
                tally.add(status, answer)
                tally.output_bytes += len(entry) + 1
                if tally.output_bytes > MAX_OUTPUT_BYTES:
                    raise _too_large()
                progress((tally.completed + tally.failed) / tally.total)

        workers = [asyncio.create_task(work()) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            await cancel_and_wait(workers)

    async def _answer(self, job: Job, line: BatchLine) -> tuple[int, dict[str, Any], str]:
        """One line's status and answer, and its output or error file line."""
        request_id = f"batch_req_{uuid.uuid4().hex}"
        body = line.body
        if refused := next((f for f in ("stream", "background") if body.get(f)), None):
            status, answer = 400, {"error": _refused_in_a_batch(refused)}
        else:
            if self.job_priority is not None and body.get("priority") is None:
                body = {**body, "priority": self.job_priority}
            status, answer = await self._send(job, body, request_id)
        entry = {
            "id": request_id,
            "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": answer},
            "error": None,
        }
        # ASCII: a line of the output is one line whatever the answer's characters.
        return status, answer, json.dumps(entry)

    async def _send(self, job: Job, body: dict[str, Any], request_id: str) -> tuple[int, dict]:
        return await send_until_served(self.dispatch, job.request["endpoint"], body, request_id)

    async def _save_loop(
        self,
        job: Job,
        tally: Tally,
        started: int,
        pending: list[tuple[int, int, str]],
        lost: asyncio.Event,
    ) -> None:
        """The answers so far and the request counts, saved a few times a second."""
        while True:
            await asyncio.sleep(COUNTS_FLUSH_S)
            try:
                if not await self._save(job, tally, started, pending, retry=False):
                    lost.set()
                    return
            except Exception:  # not an outage: logged, and the next save tries again
                logger.exception("batch %s: saving its answers failed", job.id)

    async def _save(
        self,
        job: Job,
        tally: Tally,
        started: int,
        pending: list[tuple[int, int, str]],
        retry: bool,
    ) -> bool:
        """Saves `pending` (emptying it) and the counts; False: refused (the batch is no
        longer this attempt's). A store outage keeps them for the next save, or (retry: the
        last one) waits for the store."""
        failures = 0
        while True:
            rows = pending[:]
            try:
                if rows:
                    saved = await asyncio.to_thread(
                        self.store.save_answers, job.id, job.attempt, rows
                    )
                    if not saved:
                        return False
                    del pending[: len(rows)]
                partial = tally.progress(started)
                await asyncio.to_thread(self.store.set_partial_result, job, partial)
                return True
            except JobStoreUnavailable:
                if not retry:
                    return True
                failures += 1
                await asyncio.sleep(RETRY_DELAYS_S[min(failures, len(RETRY_DELAYS_S)) - 1])


def _too_large() -> JobFailed:
    message = (
        f"The batch's answers exceed {MAX_OUTPUT_BYTES >> 20} MiB; split its requests over "
        "smaller batches."
    )
    return JobFailed(message, [_problem("output_too_large", message)], code="output_too_large")


def _refused_in_a_batch(field: str) -> dict[str, Any]:
    """stream, background: a line's answer is written whole, into the batch's output."""
    return {
        "message": f"{field} is not supported in a batch: each answer is written whole.",
        "type": "invalid_request_error",
        "param": field,
        "code": "invalid_value",
    }
