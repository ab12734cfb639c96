"""Prometheus metrics, one registry per app (no module globals, so tests can build many apps).

HTTP-level numbers are recorded by MetricsMiddleware; request-level ones (tokens, time to first
token, images) by the pipelines; engine state (queue depth, running batch) is read at scrape time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine.sequence import Sequence
from server.log import INTERNAL
from server.vllm_metrics import VllmMetrics

if TYPE_CHECKING:
    from server.pipelines.slots import Slots

CLIENT_CLOSED_REQUEST = 499  # (nginx's status for it)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# `_created` series double every counter and histogram and few dashboards use them.
disable_created_metrics()


class Metrics:
    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The same engine figures under vLLM's names, for dashboards written for it.
        self.vllm = VllmMetrics(r, model_name)
        self.requests = Counter(
            "vlm_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.internal_requests = Counter(
            "vlm_internal_requests",
            "The server's own requests to itself (a batch's lines, background responses) by "
            "route and status",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "vlm_http_request_duration_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "vlm_time_to_first_token_seconds",
            "From request arrival to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("vlm_prompt_tokens", "Prompt tokens", registry=r)
        self.image_tokens = Counter("vlm_image_tokens", "Prompt tokens from images", registry=r)
        self.generated_tokens = Counter("vlm_generated_tokens", "Generated tokens", registry=r)
        # Who used the engine: by API key project (server/jobs/project.py; "-" without keys),
        # a key's own under its label (ProjectLabels, set once the job store is open)
        self.project_label: Callable[[str], str] = lambda project: project
        self.project_tokens = Counter(
            "vlm_project_tokens",
            "Prompt and generated tokens by API key project",
            ["project", "kind"],
            registry=r,
        )
        self.images = Counter("vlm_images_decoded", "Images fetched and decoded", registry=r)
        self.video_frames = Counter("vlm_video_frames_decoded", "Video frames decoded", registry=r)
        self.finished = Counter(
            "vlm_sequences_finished", "Finished sequences by reason", ["reason"], registry=r
        )
        # (store-wide: every replica of a shared store shows the same: read with max, not sum)
        self.jobs = Gauge(
            "vlm_jobs", "Async jobs by status, in the whole job store", ["status"], registry=r
        )
        self.webhook_attempts = Counter(
            "vlm_webhook_attempts",
            "Webhook delivery attempts by outcome (delivered, retrying, failed)",
            ["outcome"],
            registry=r,
        )
        self.webhook_deliveries = Gauge(
            "vlm_webhook_deliveries",
            "Webhook deliveries by status, in the whole job store",
            ["status"],
            registry=r,
        )
        self.job_store_up = Gauge(
            "vlm_job_store_up",
            "1 while the job store answers, 0 while it cannot be reached",
            registry=r,
        )
        self.queue_depth = Gauge("vlm_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("vlm_running_sequences", "Sequences in the batch", registry=r)
        # Before the engine's queue: requests downloading or decoding their media, and those
        # waiting for a slot to (--max-concurrent-downloads, --max-concurrent-preprocessing)
        self.media_slots = Gauge(
            "vlm_media_slots",
            "Requests holding or waiting for a media download or preprocessing slot",
            ["slot", "state"],
            registry=r,
        )
        self.refreshers: list[Callable[[], None]] = []
        self.engine_collector: EngineCollector | None = None

    def record_finished(self, seq: Sequence) -> None:
        """The engine's on_finish: every sequence that ends, however (a client that went
        away too: what it had computed), in both families of metrics."""
        self.finished.labels(seq.finish_reason or "unknown").inc()
        if seq.num_completion_tokens == 0:  # ended before a token: its prefill, if it ran
            self._count_tokens(prompted=[seq], generated=[])
        self.vllm.record(seq)

    def record_tokens(self, seqs: list[Sequence]) -> None:
        """The engine's on_tokens: the sequences that got a token this step. The counters move
        as the tokens come (as vLLM's), not when a request ends, so a rate over them is the
        load now, and an hour-long answer is not one spike. A prompt counts with its first
        token."""
        first = [seq for seq in seqs if seq.num_completion_tokens == 1]
        self._count_tokens(prompted=first, generated=seqs)

    def _count_tokens(self, prompted: list[Sequence], generated: list[Sequence]) -> None:
        """The prompts computed (n choices of one prompt count it once; one never started,
        aborted while queued, was never computed) and one generated token of each of
        `generated`."""
        prompts, images, cached = 0, 0, 0
        by_project: dict[tuple[str, str], int] = {}

        def add(seq: Sequence, kind: str, count: int) -> None:
            key = (self.project_label(seq.project) if seq.project else "-", kind)
            by_project[key] = by_project.get(key, 0) + count

        for seq in prompted:
            if seq.choice_index == 0 and seq.is_admitted:
                prompts += seq.inputs.num_prompt_tokens
                images += seq.inputs.num_image_tokens
                cached += seq.num_cached_tokens
                add(seq, "prompt", seq.inputs.num_prompt_tokens)
        for seq in generated:
            add(seq, "generated", 1)
        generated_count = len(generated)
        self.prompt_tokens.inc(prompts)
        self.image_tokens.inc(images)
        self.generated_tokens.inc(generated_count)
        for (project, kind), count in by_project.items():
            self.project_tokens.labels(project, kind).inc(count)
        self.vllm.record_tokens(prompts, cached, generated_count)

    def watch_engine(
        self,
        num_queued: Callable[[], int],
        num_running: Callable[[], int],
        stats: Callable[[], dict[str, float]],
        num_waiting: Callable[[], int],
        cache_info: dict[str, str],
    ) -> None:
        """num_waiting: the queued and the preempted (vLLM's waiting); cache_info: the KV
        cache's configuration (vLLM's cache_config_info)."""
        self.queue_depth.set_function(num_queued)
        self.running.set_function(num_running)
        self.engine_collector = EngineCollector(stats)
        self.registry.register(self.engine_collector)
        self.vllm.watch_engine(num_waiting, num_running, stats, cache_info)

    def watch_media(self, slots: dict[str, Slots]) -> None:
        """slots: by name (downloads, preprocessing)."""
        for name, counted in slots.items():
            for state in ("held", "waiting"):
                count = partial(getattr, counted, f"num_{state}")
                self.media_slots.labels(name, state).set_function(count)

    def watch_jobs(
        self,
        jobs_by_status: Callable[[], dict[str, int] | None],
        deliveries_by_status: Callable[[], dict[str, int] | None],
        store_up: Callable[[], bool],
    ) -> None:
        """The job store is counted once per scrape (one query per table), in render; while
        it cannot be reached, vlm_job_store_up is 0 and the counts are its last ones (NaN
        before any: a replica that started during an outage read zeros)."""
        self.job_store_up.set_function(lambda: float(store_up()))
        self.refreshers.append(
            lambda: _set_counts(
                self.jobs,
                ("queued", "processing", "completed", "failed", "cancelled"),
                jobs_by_status(),
            )
        )
        self.refreshers.append(
            lambda: _set_counts(
                self.webhook_deliveries, ("pending", "delivered", "failed"), deliveries_by_status()
            )
        )

    def unwatch(self) -> None:
        """Forget the engine and the job store (the lifespan ended): the app outlives them, and
        its gauges' callbacks must not keep a stopped engine and its KV cache in memory."""
        self.queue_depth.set_function(lambda: 0)
        self.running.set_function(lambda: 0)
        self.media_slots.clear()  # (their callbacks hold the ended lifespan's slots)
        self.job_store_up.set_function(lambda: 0)
        if self.engine_collector is not None:
            self.registry.unregister(self.engine_collector)
            self.engine_collector = None
        self.vllm.unwatch()
        self.refreshers.clear()

    def render(self) -> bytes:
        """Blocking (database counts): call it from a worker thread."""
        for refresh in self.refreshers:
            refresh()
        return generate_latest(self.registry)


class EngineCollector:
    """KV cache, prefix cache and encoder cache figures, read from the engine at scrape time.
    Hit rates: rate(..._hit_tokens_total) / rate(..._queried_tokens_total), and the same for
    the encoder cache's hits and misses."""

    COUNTERS = {
        "prefix_cache_queried_tokens": "Prompt tokens looked up in the prefix cache",
        "prefix_cache_hit_tokens": "Prompt tokens whose KV came from the prefix cache",
        "encoder_cache_hits": "Images/videos whose vision-tower output was reused",
        "encoder_cache_misses": "Images/videos that went through the vision tower",
        "preemptions": (
            "Sequences preempted (KV blocks ran out, or a higher-priority request took their "
            "place) and recomputed later"
        ),
    }
    GAUGES = {
        "kv_cache_usage": "Share of the KV cache blocks in use (0..1)",
        "kv_cache_blocks": "KV cache blocks in all",
        "grammar_cache_bytes": "Memory of the cached structured-output grammars (at most 512 MiB; "
        "a running request keeps its own grammar also once the cache lets go of it)",
        "encoder_cache_bytes": "Memory of the cached vision-tower outputs (at most "
        "--encoder-cache-memory; on the model's device)",
    }

    def __init__(self, stats: Callable[[], dict[str, float]]):
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.stats()
        for name, doc in self.COUNTERS.items():
            yield CounterMetricFamily(f"vlm_{name}", doc, value=stats[name])
        for name, doc in self.GAUGES.items():
            yield GaugeMetricFamily(f"vlm_{name}", doc, value=stats[name])


def _set_counts(gauge: Gauge, statuses: tuple[str, ...], counts: dict[str, int] | None) -> None:
    for status in statuses:
        gauge.labels(status).set(math.nan if counts is None else counts.get(status, 0))


class MetricsMiddleware:
    """Counts every HTTP request by route template (not raw path) and status, with its latency;
    the server's own (a job's lines and background responses) apart, as internal requests: a
    fleet's request rate counts a client's request once."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, answered = 500, False

        async def recording_send(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except asyncio.CancelledError:
            if not answered:  # the caller went away (a cancelled batch's lines): not a 500
                status = CLIENT_CLOSED_REQUEST
            raise
        finally:
            route = route_label(scope)
            if scope.get(INTERNAL):
                self.metrics.internal_requests.labels(route, str(status)).inc()
            else:
                self.metrics.requests.labels(route, str(status)).inc()
                self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)


def route_label(scope: Scope) -> str:
    """The route template (/v2/media/status/{id}, never a raw id); a mounted app (the docs'
    and the playground's static files) by its mount path; "unmatched" for a 404."""
    route = scope.get("route")
    if route is not None:
        return route.path
    if "endpoint" not in scope:  # never routed: refused before (a 401, a drain's 503), or a 404
        return _route_matching(scope)
    if scope.get("app_root_path") is not None:  # (a mount's path: its root less the server's)
        return scope.get("root_path", "")[len(scope["app_root_path"]) :] or "unmatched"
    # A plain Starlette route (FastAPI's /openapi.json) records only its endpoint.
    for candidate in getattr(scope.get("app"), "routes", ()):
        if getattr(candidate, "endpoint", None) is scope["endpoint"]:
            return candidate.path
    return "unmatched"


def _route_matching(scope: Scope) -> str:
    """The route a request refused before routing was for, as the router would match it: a
    full match first, else one that takes another method (a 405's route, a HEAD's GET);
    "unmatched" when none would."""
    routes = getattr(scope.get("app"), "routes", ())
    try:
        found = _matching(routes, scope, Match.FULL) or _matching(routes, scope, Match.PARTIAL)
    except Exception:  # (a label must never cost the request its own outcome)
        found = None
    return found or "unmatched"


def _matching(routes: Iterable[Any], scope: Scope, wanted: Match) -> str | None:
    for candidate in routes:
        # FastAPI keeps an included router whole: its routes as they were added (with no
        # prefix: this server's routers have none); other routes match as themselves.
        included = getattr(candidate, "original_router", None)
        if included is not None:
            if (found := _matching(included.routes, scope, wanted)) is not None:
                return found
            continue
        match, _ = candidate.matches(scope)
        if match == wanted:
            return getattr(candidate, "path", None)
    return None
