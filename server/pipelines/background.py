"""Background responses (the Responses API's `background: true`): the response is stored as
queued and run as a durable job (kind `response`, the job's id the response's), so it
survives a restart and runs on whichever replica claims it. The job sends the request through
the app's own /v1/responses route (as a batch's lines go), then writes the answer into the
stored response, which GET /v1/responses/{id} polls. A cancel or a delete wins over an answer
that comes after it (server/jobs/responses.py writes only while the response runs).
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.jobs.store import Job, JobStore
from server.jobs.worker import Handler, Progress
from server.pipelines.batch import Dispatch, send_until_served

KIND = "response"


def background_response_handler(
    store: JobStore, dispatch: Dispatch, job_priority: int | None = None
) -> Handler:
    """What the job worker runs for a background response: its request, at the body's
    priority or else job_priority (None: priorities are not looked at)."""

    async def handle(job: Job, progress: Progress) -> dict[str, Any]:
        stored = await asyncio.to_thread(store.get_response, job.id)
        running = {**stored.response, "status": "in_progress"} if stored is not None else None
        if running is None or not await asyncio.to_thread(store.update_response, running):
            return {"response_id": job.id}  # deleted or cancelled before it ran
        body = job.request["body"]
        if job_priority is not None and body.get("priority") is None:
            body = {**body, "priority": job_priority}
        status, answer = await send_until_served(dispatch, "/v1/responses", body, job.id)
        final = answered(running, status, answer)
        await asyncio.to_thread(store.update_response, final)
        return {"response_id": job.id, "status": final["status"]}

    return handle


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
