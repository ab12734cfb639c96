"""create_app(settings): the FastAPI app; its lifespan builds the engine and the pipelines."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import httpx
from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from transformers import GenerationConfig

from server import __version__
from server.api.body import check_json_body
from server.api.errors import install_error_handlers
from server.api.middleware import (
    ApiKeyMiddleware,
    BodyLimitsMiddleware,
    CorsMiddleware,
    DrainMiddleware,
    HeadMiddleware,
    JsonBodyMiddleware,
    LocalHostMiddleware,
    PathMiddleware,
    RequestIdMiddleware,
    internal,
)
from server.api.protocol import OPENAI_DEFAULTS
from server.api.routes import (
    batches,
    chat,
    completions,
    conversations,
    files,
    health,
    invocations,
    media,
    messages,
    playground,
    responses,
    tokenize,
)
from server.api.routes.chat import completions_job_handler
from server.api.routes.media import categories_job_handler
from server.api.services import MEDIA_KINDS, Services
from server.config import LOOPBACK_HOSTS, Settings
from server.engine.engine import AsyncEngine
from server.engine.inputs import InputBuilder
from server.engine.loader import LoadedModel, load_model
from server.engine.sampling import SamplingDefaults
from server.jobs.project import ProjectLabels, named_projects
from server.jobs.store import JobStore, open_job_store
from server.jobs.webhooks import WebhookSender, load_or_create_secret
from server.jobs.worker import JobWorker
from server.media.fetch import FetchPolicy, MediaFetcher
from server.media.spool import Spool
from server.media.video import VideoDecoder
from server.metrics import Metrics, MetricsMiddleware
from server.pipelines.background import KIND as BACKGROUND
from server.pipelines.background import background_response_handler
from server.pipelines.batch import BatchRunner, asgi_dispatch
from server.pipelines.categories import CategoriesPipeline
from server.pipelines.chat import ChatPipeline
from server.pipelines.completions import TextCompletions
from server.pipelines.loopback import loopback_streams
from server.pipelines.media_loader import MediaLoader

logger = logging.getLogger(__name__)


# Threads for asyncio.to_thread. Most of them wait rather than work: on the job store (SQLite's
# one connection behind its lock, PostgreSQL's pool), on a video worker's answer (a whole
# decode), on files. Python's default (cores + 4: 6 on 2 cores) let four job claims and one
# job's insert take them all, and a plain chat's template render waited seconds behind them.
BLOCKING_THREADS = 64


def _warn_of_keyed_objects(tables: list[str]) -> None:
    """A restart that lost its keys (a variable not passed on) would show every tenant's
    objects to anyone: say so at start-up."""
    if tables:
        logger.warning(
            "the job store holds %s that API keys' projects made, and this server has no "
            "--api-key: every client sees all of them (and may delete them); pass the keys "
            "it was started with",
            ", ".join(tables),
        )


def create_app(settings: Settings, loaded: LoadedModel | None = None) -> FastAPI:
    """loaded: a model the caller already loaded (the CLI does, to fail before serving)."""
    keys = settings.all_api_keys()  # (read once: --api-key-file is a file)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal loaded
        loop = asyncio.get_running_loop()
        blocking = ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="blocking")
        loop.set_default_executor(blocking)
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        spool = Spool(settings.data_dir / "spool")  # its own: never another server's files
        if loaded is None:
            loaded = await asyncio.to_thread(load_model, settings.engine_config())
        engine = AsyncEngine.build(loaded, settings.engine_config())
        engine.start()
        jobs = await asyncio.to_thread(open_job_store, settings.job_store, settings.data_dir)
        jobs.root_path = settings.root_path
        if not keys:
            _warn_of_keyed_objects(await asyncio.to_thread(jobs.keyed_tables))
        input_builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
        fetcher, decoder, media = await _media_loader(
            settings, jobs, input_builder, loaded, engine, spool, metrics
        )
        pipeline = ChatPipeline(
            engine,
            input_builder,
            media,
            caption_tokens=settings.caption_tokens,
            metrics=metrics,
        )
        _watch_engine(engine, settings, metrics)
        metrics.watch_media(media.slots())
        categories = CategoriesPipeline(engine, input_builder, media)
        # A batch's lines and background responses go through this app itself (see
        # pipelines/batch.py), as internal requests: in their job's project, with no key.
        batch_client = httpx.AsyncClient(
            # A route that crashes answers its 500 to that line; it is not raised here.
            transport=httpx.ASGITransport(app=internal(app), raise_app_exceptions=False),
            base_url="http://batch",
            timeout=None,
        )
        job_worker = _job_worker(app, settings, engine, jobs, pipeline, categories, batch_client)
        metrics.watch_jobs(
            jobs.count_by_status,
            jobs.count_deliveries_by_status,
            lambda: jobs.unreachable_since is None,
        )
        label_key = await asyncio.to_thread(  # (before any job runs: none counted unlabelled)
            jobs.shared_value, "metrics_label_key", secrets.token_hex(32)
        )
        metrics.project_label = ProjectLabels(label_key, named_projects(keys))
        job_worker.start()
        secret = await asyncio.to_thread(
            load_or_create_secret, settings.webhook_secret, jobs, settings.data_dir
        )
        webhooks = WebhookSender(
            jobs,
            secret,
            tuple(float(d) for d in settings.webhook_retry_delays),
            settings.webhook_timeout,
            tuple(settings.allowed_media_domains),
            metrics.webhook_attempts,
            settings.webhook_secret_per_project,
        )
        webhooks.start()
        app.state.services = Services(
            loaded=loaded,
            engine=engine,
            chat=pipeline,
            completions=TextCompletions(
                engine, loaded.tokenizer, (loaded.image_token_id, loaded.video_token_id)
            ),
            categories=categories,
            jobs=jobs,
            job_worker=job_worker,
            webhooks=webhooks,
            served_model_names=tuple(settings.served_model_names()),
            max_n=settings.max_n,
            store_responses=settings.store_responses,
            max_file_storage_bytes=settings.max_file_storage_bytes,
            sampling_defaults=sampling_defaults(settings, loaded),
        )
        logger.info("serving %s", ", ".join(settings.served_model_names()))
        try:
            yield
        finally:
            try:
                await job_worker.stop()  # jobs running here go back to the queue
                await batch_client.aclose()
                await webhooks.stop()  # pending deliveries stay in the store
                jobs.close()
                await engine.stop()
                await fetcher.aclose()
                await decoder.close()
                spool.close()
            finally:
                # The app object can outlive its lifespan (FastAPI's caches keep its routes'
                # closures): let go of the model, the engine and its KV cache now.
                metrics.unwatch()
                app.state.services = None
                loaded = None
                # Its idle threads go now, not at the loop's end (an app restarted on one loop,
                # as tests do); a call still in one finishes there. The loop gets a plain one.
                blocking.shutdown(wait=False)
                loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="asyncio"))

    metrics = Metrics(model_name=settings.served_model_names()[0])
    # Offline: /docs and /redoc load their JS and CSS from this server, never a CDN.
    app = FastAPIOffline(
        title="vlm-server",
        version=__version__,
        summary="OpenAI-compatible inference server for Qwen2-VL vision-language models",
        lifespan=lifespan,
        dependencies=[Depends(check_json_body)],
    )
    install_error_handlers(app)
    app.openapi = lambda: _openapi(app, settings.served_model_names())
    app.include_router(health.router)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(invocations.router)
    app.include_router(media.router)
    app.include_router(responses.router)
    app.include_router(conversations.router)
    app.include_router(messages.router)
    app.include_router(tokenize.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    if settings.playground:
        playground.mount(app)
    # Added last = outermost: ids, metrics (which see every refusal too), drain, keys, body cap.
    open_paths = frozenset({"/health", "/metrics"} if settings.metrics_open() else {"/health"})
    app.add_middleware(HeadMiddleware)  # (innermost: the others see the HEAD it was)
    app.add_middleware(JsonBodyMiddleware, allowed_origins=tuple(settings.allowed_origins))
    app.add_middleware(BodyLimitsMiddleware, max_bytes=settings.max_request_body_bytes)
    # Keys are checked before any body is buffered: no upload work for unauthenticated callers.
    app.add_middleware(ApiKeyMiddleware, keys=keys, open_paths=open_paths)
    app.add_middleware(DrainMiddleware)
    if settings.allowed_origins:
        # Outside the key check: a browser's preflight OPTIONS carries no Authorization.
        app.add_middleware(
            CorsMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After", "Location"],
        )
    if not keys and settings.host in LOOPBACK_HOSTS:  # (outside CORS: refused whatever asks)
        app.add_middleware(LocalHostMiddleware, allowed=tuple(settings.allowed_hosts))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(PathMiddleware, root_path=settings.root_path)
    app.state.metrics = metrics
    app.state.metrics_project = settings.metrics_project
    app.state.draining = False
    return app


def sampling_defaults(settings: Settings, loaded: LoadedModel) -> SamplingDefaults:
    """OpenAI's, or the checkpoint's generation_config (--generation-config auto) or a
    folder's, then --override-generation-config's; logged unless OpenAI's, as vLLM does."""
    source = settings.generation_config
    defaults = OPENAI_DEFAULTS
    if source != "openai":
        config = (
            loaded.model.generation_config
            if source == "auto"
            else GenerationConfig.from_pretrained(source)
        )
        defaults = SamplingDefaults.from_generation_config(config, OPENAI_DEFAULTS)
    defaults = defaults.overridden(settings.override_generation_config)
    if source == "openai" and not settings.override_generation_config:
        return defaults
    taken = {k: v for k, v in vars(defaults).items() if v != getattr(OPENAI_DEFAULTS, k)}
    logger.info(
        "--generation-config %s%s: sampling defaults %s",
        source,
        " with --override-generation-config" if settings.override_generation_config else "",
        ", ".join(f"{k} {v}" for k, v in taken.items()) or "OpenAI's",
    )
    return defaults


def _openapi(app: FastAPI, served_names: list[str]) -> dict:
    """FastAPI's document, made exact: `model` takes the served names only, and the 422 FastAPI
    documents for every body is gone (validation errors are 400s here)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        schemas = schema["components"]["schemas"]
        for name in ("ChatCompletionRequest", "MediaCompletionRequest", "CompletionRequest"):
            schemas[name]["properties"]["model"]["enum"] = served_names
        # Categories: optional (the first served name), but never null.
        schemas["MediaCategoriesRequest"]["properties"]["model"] = {
            "type": "string",
            "enum": served_names,
            "title": "Model",
            "description": f"Defaults to {served_names[0]!r}.",
        }
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


async def _media_loader(
    settings: Settings,
    jobs: JobStore,
    input_builder: InputBuilder,
    loaded: LoadedModel,
    engine: AsyncEngine,
    spool: Spool,
    metrics: Metrics,
) -> tuple[MediaFetcher, VideoDecoder, MediaLoader]:
    """The media side: the fetcher, the video decode workers (started) and their loader."""
    fetcher = MediaFetcher(
        FetchPolicy(
            timeout_s=settings.media_fetch_timeout,
            allowed_hosts=tuple(settings.allowed_media_domains),
            follow_redirects=settings.media_follow_redirects,
            local_media_root=settings.allowed_local_media_path,
        ),
        uploads=jobs,  # images uploaded to the Files API, named by their ids
    )
    decoder = VideoDecoder(
        settings.video_decode_workers,
        settings.video_decode_timeout,
        settings.video_max_fps,
        max_jobs_per_worker=settings.video_decode_worker_max_jobs,
    )
    await decoder.start()
    media = MediaLoader(
        fetcher,
        decoder,
        settings.media_limits(),
        model_max_pixels=loaded.processor.image_processor.size["longest_edge"],
        metrics=metrics,
        spool_dir=spool.dir,
        token_side=input_builder.token_side,
        model_min_pixels=input_builder.min_image_pixels,
        context_length=engine.max_seq_len,
        auto_image_tokens=settings.auto_image_tokens,
    )
    return fetcher, decoder, media


def _watch_engine(engine: AsyncEngine, settings: Settings, metrics: Metrics) -> None:
    metrics.watch_engine(
        lambda: engine.num_queued,
        lambda: engine.num_running,
        engine.stats,
        lambda: engine.num_waiting,
        {**engine.cache_info(), "gpu_memory_utilization": str(settings.gpu_memory_utilization)},
    )
    # Token and request metrics see every sequence that ends, aborted ones too.
    engine.on_finish = metrics.record_finished
    engine.on_tokens = metrics.record_tokens
    engine.on_step = metrics.vllm.record_step


def _job_worker(
    app: FastAPI,
    settings: Settings,
    engine: AsyncEngine,
    jobs: JobStore,
    pipeline: ChatPipeline,
    categories: CategoriesPipeline,
    batch_client: httpx.AsyncClient,
) -> JobWorker:
    """The worker that runs every kind of job (not started)."""
    # Jobs' requests rank below interactive ones where the policy looks at ranks.
    job_priority = settings.job_priority if settings.scheduling_policy == "priority" else None
    dispatch = asgi_dispatch(batch_client)
    batches = BatchRunner(
        jobs,
        dispatch,
        concurrency=settings.max_num_seqs,
        job_priority=job_priority,
    )
    handlers = {
        "categories": categories_job_handler(categories, job_priority),
        "completions": completions_job_handler(pipeline, job_priority),
        "batch": batches,
        BACKGROUND: background_response_handler(
            jobs, dispatch, job_priority, loopback_streams(internal(app))
        ),
    }

    def can_start_a_job(kinds: tuple[str, ...]) -> bool:
        """No hoarding: a job is claimed while the engine could start it now, and not
        while this replica drains (another one takes it). No starving either: with no job
        of its lane's kinds running here, one is claimed whatever the engine's load (its
        requests wait their turn in the queue), so neither interactive traffic that keeps
        the queue busy nor a batch that fills the engine for hours holds every media job
        (and its webhook) back until it stops."""
        if app.state.draining:
            return False
        room = engine.num_queued == 0 and engine.num_running < settings.max_num_seqs
        return room or not job_worker.runs_any(kinds)

    job_worker = JobWorker(
        jobs,
        handlers,
        retention_s=settings.job_retention_hours * 3600,
        lease_s=settings.job_lease,
        max_attempts=settings.job_max_attempts,
        can_start=can_start_a_job,
        # Two media jobs, one batch (it can run for hours) and four background responses
        # at a time.
        lanes={MEDIA_KINDS: 2, ("batch",): 1, (BACKGROUND,): 4},
    )
    return job_worker
