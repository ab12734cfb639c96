"""Background responses (the Responses API's `background: true`): the response is stored as
queued, in the transaction that queues its durable job (kind `response`, the job's id the
response's), so it survives a restart and runs on whichever replica claims it. The job sends
the request through the app's own /v1/responses route (as a batch's lines go), a
conversation's items read at that moment as the start of its input, then writes the answer
into the stored response, which GET /v1/responses/{id} polls, and the response's items into
its conversation, in one transaction. A cancel or a delete wins over an answer that comes after
it (server/jobs/responses.py writes only while the response runs), and a run that fails for
any other reason than an engine stopping leaves the response failed, never running.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from server.exceptions import EngineStopped, JobStoreUnavailable
from server.jobs.responses import StoredTurn
from server.jobs.store import Job, JobStore
from server.jobs.worker import Handler, Progress
from server.pipelines.batch import Dispatch, send_until_served

logger = logging.getLogger(__name__)

KIND = "response"
ANSWERED = ("completed", "incomplete")
# What a run that ended without an answer says (the server log has the reason).
NO_ANSWER = {"code": "server_error", "message": "The background run failed; see the server log."}


def background_response_handler(
    store: JobStore, dispatch: Dispatch, job_priority: int | None = None
) -> Handler:
    """What the job worker runs for a background response: its request, at the body's
    priority or else job_priority (None: priorities are not looked at)."""

    async def handle(job: Job, progress: Progress) -> dict[str, Any]:
        stored = await asyncio.to_thread(store.get_response, job.id)
        if stored is None:
            return {"response_id": job.id}  # deleted before it ran
        running = {**stored.response, "status": "in_progress"}
        if not await asyncio.to_thread(store.update_response, running, None, job.attempt):
            return {"response_id": job.id}  # cancelled before it ran (or not this attempt's)
        try:
            final, conversation = await run(job, stored, running)
        except (asyncio.CancelledError, EngineStopped, JobStoreUnavailable):
            raise  # cancelled (the cancel wrote its status), or back to the queue
        except Exception:
            logger.exception("background response %s failed", job.id)
            failed = {**running, "status": "failed", "error": NO_ANSWER}
            await asyncio.to_thread(store.update_response, failed, None, job.attempt)
            raise
        await asyncio.to_thread(store.update_response, final, conversation, job.attempt)
        return {"response_id": job.id, "status": final["status"]}

    async def run(
        job: Job, stored: StoredTurn, running: dict[str, Any]
    ) -> tuple[dict[str, Any], tuple[str, list[dict[str, Any]]] | None]:
        """The answered response, and (its conversation's id, the items to add to it)."""
        body = job.request["body"]
        conversation_id = (running.get("conversation") or {}).get("id")
        if conversation_id is not None:
            history = await asyncio.to_thread(store.conversation_items, conversation_id)
            if history is None:
                error = {"code": "conversation_not_found", "message": "The conversation is gone."}
                return {**running, "status": "failed", "error": error}, None
            body = {**body, "input": [*history, *stored.input]}
            body.pop("conversation", None)
        if job_priority is not None and body.get("priority") is None:
            body = {**body, "priority": job_priority}
        status, answer = await send_until_served(dispatch, "/v1/responses", body, job.id)
        final = answered(running, status, answer)
        if conversation_id is None:
            return final, None
        if final["status"] not in ANSWERED:
            final["error"] = named_in_conversation(final["error"], history)
            return final, None
        return final, (conversation_id, [*stored.input, *final["output"]])

    return handle


def named_in_conversation(error: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """An error of the run, naming the conversation's items as the client knows them: the
    run's input[i] is the conversation's item i, then the request's own input."""

    def name(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if index < len(history):
            return f"conversation item {history[index].get('id')}"
        return f"input[{index - len(history)}]"

    return {**error, "message": INPUT_INDEX.sub(name, error.get("message", ""))}


INPUT_INDEX = re.compile(r"input\[(\d+)\]")


def answered(running: dict[str, Any], status: int, answer: dict[str, Any]) -> dict[str, Any]:
    """The stored response once its request was answered: the answer's output, usage and
    status, or failed with the error the request got."""
    if status != 200:
        error = answer.get("error") or {}
        code = error.get("code") or error.get("type") or "server_error"
        message = error.get("message") or "The response failed."
        return {**running, "status": "failed", "error": {"code": code, "message": message}}
    kept = ("status", "output", "usage", "completed_at", "incomplete_details", "error")
    return {**running, **{key: answer.get(key) for key in kept}}
