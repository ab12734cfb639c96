"""What the routes need, built once by the app's lifespan and kept on app.state."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from server.api.protocol import MediaJob
from server.engine.engine import AsyncEngine
from server.engine.loader import LoadedModel
from server.engine.sampling import SamplingDefaults
from server.exceptions import (
    InvalidRequest,
    JobAlreadyEnded,
    JobNotFound,
    ModelNotFound,
    ServerError,
)
from server.jobs.project import current_project, sees
from server.jobs.store import Job, JobStore
from server.jobs.webhooks import WebhookSender
from server.jobs.worker import JobWorker
from server.media.netguard import AddressRefused
from server.pipelines.categories import CategoriesPipeline
from server.pipelines.chat import ChatPipeline
from server.pipelines.completions import TextCompletions

UPLOADS_AT_ONCE = 2  # (see Services.uploads)
# The jobs the /v2/media routes show; batches (/v1/batches) are jobs of kind "batch".
MEDIA_KINDS = ("completions", "categories")


@dataclass
class Services:
    loaded: LoadedModel
    engine: AsyncEngine
    chat: ChatPipeline
    completions: TextCompletions
    categories: CategoriesPipeline
    served_model_names: tuple[str, ...]
    jobs: JobStore
    job_worker: JobWorker
    webhooks: WebhookSender
    max_n: int = 8  # choices per request (n)
    store_responses: bool = True  # the Responses API's answers kept (--no-store-responses)
    max_file_storage_bytes: int = 0  # what a project's files may hold (0: no bound)
    # Uploads read into memory and stored at once: each is up to --max-request-body-bytes, held
    # about twice over while the store takes it; the others wait in their spooled temp files.
    uploads: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(UPLOADS_AT_ONCE))
    # What omitted sampling fields take on the OpenAI routes (--generation-config).
    sampling_defaults: SamplingDefaults = SamplingDefaults()
    started_at: int = field(default_factory=lambda: int(time.time()))

    async def submit_job(self, kind: str, request: dict, idempotency_key: str | None) -> Job:
        if url := request.get("webhook_url"):
            try:
                await self.webhooks.check_url(url)
            except AddressRefused as refused:
                raise InvalidRequest(
                    f"webhook_url cannot be delivered to: {refused}.",
                    param="webhook_url",
                    code="invalid_webhook_url",
                ) from None
        job = await asyncio.to_thread(
            functools.partial(
                self.jobs.create, kind, request, idempotency_key, project=current_project()
            )
        )
        self.job_worker.notify()
        return job

    async def get_job(self, job_id: str, kinds: tuple[str, ...] = MEDIA_KINDS) -> Job | None:
        """The request's project's job, if it is one of these kinds (media jobs and batches
        are listed apart)."""
        job = await asyncio.to_thread(self.jobs.get, job_id)
        if job is None or job.kind not in kinds or not sees(current_project(), job.project):
            return None
        return job

    async def cancel_job(
        self,
        job_id: str,
        kinds: tuple[str, ...] = MEDIA_KINDS,
        not_found: type[ServerError] = JobNotFound,
        ended: type[ServerError] = JobAlreadyEnded,
    ) -> Job:
        """not_found, ended: the errors, in the words of the route's own kind of job."""
        if await self.get_job(job_id, kinds) is None:
            raise not_found(job_id)
        job = await asyncio.to_thread(self.jobs.cancel, job_id)
        if job is None:
            raise not_found(job_id)
        if job.status != "cancelled":
            raise ended(job_id, job.status)
        self.job_worker.cancel_running(job_id)  # its webhook goes out with the next poll
        return job

    async def list_jobs(
        self,
        status: str | None,
        limit: int,
        after: str | None,
        kinds: tuple[str, ...] = MEDIA_KINDS,
    ) -> tuple[list[Job], bool]:
        try:
            return await asyncio.to_thread(
                self.jobs.list, status, limit, after, kinds, current_project()
            )
        except KeyError:
            noun = "batch" if kinds == ("batch",) else "job"
            raise InvalidRequest(
                f"No {noun} `{after}` to list after (deleted, or never existed).",
                param="after",
                code="invalid_value",
            ) from None

    async def job_views(self, jobs: list[Job]) -> list[MediaJob]:
        """Jobs as the API shows them, each with its webhook deliveries."""
        deliveries = await asyncio.to_thread(self.jobs.deliveries_of_jobs, [j.id for j in jobs])
        return [MediaJob.from_job(job, self.jobs.root_path, deliveries[job.id]) for job in jobs]

    async def job_accepted(self, job: Job) -> JSONResponse:
        """202 with the job as its status URL shows it (a job an Idempotency-Key finds again
        may have ended and sent its webhooks); Location points at its status."""
        (view,) = await self.job_views([job])
        headers = {"Location": view.status_url}
        return JSONResponse(view.model_dump(), status_code=202, headers=headers)

    def check_model(self, name: str) -> None:
        if name not in self.served_model_names:
            raise ModelNotFound(name)

    def answering_model(self, name: str | None) -> str:
        """The model a request names (checked), or, where it names none (vLLM lets it), the
        served model's first name: what the answer says it came from."""
        if name is None:
            return self.served_model_names[0]
        self.check_model(name)
        return name


def get_services(request: Request) -> Services:
    return request.app.state.services
