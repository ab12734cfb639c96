"""The engine's metrics under vLLM's names (`vllm:*`, labels `model_name` and `engine`).

Dashboards, alerts and autoscalers written for vLLM (its Grafana dashboard, KEDA or an HPA on
`vllm:num_requests_waiting`, a router reading `vllm:kv_cache_usage_perc`) then work against
this server unchanged. The intervals are vLLM's: queue (arrival to first scheduled), prefill
(scheduled to first token), decode (first to last token), inference (scheduled to last), end to
end and time to first token (from the HTTP request's arrival), and every inter-token interval.
The server's own `vlm_*` metrics stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.engine.sequence import Sequence

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0)
TTFT_BUCKETS += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
ITL_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)
REQUEST_BUCKETS += (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM's finish reasons; a request that waited past --queue-timeout was aborted.
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "error": "error"}
FINISH_REASONS["queue_timeout"] = "abort"
FINISH_REASONS["dead_end"] = "error"  # (a grammar that allowed no next token)
FINISH_REASONS["grammar_too_slow"] = "error"
LABELS = ("model_name", "engine")


# Token counts: 1, 2, 5, 10, 20, 50, ... (vLLM's, which stop at the context length).
TOKEN_BUCKETS = [m * 10**e for e in range(7) for m in (1, 2, 5)][:-2]  # ... 1,000,000
N_BUCKETS = (1, 2, 5, 10, 20)  # vLLM's, for request_params_n
# vLLM's iteration_tokens_total: tokens per engine step.
STEP_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Requests with several choices whose first ended, the rest not yet (a bound: choices that
# never came, their request cancelled while the first was prefilled, are forgotten).
MAX_OPEN_REQUESTS = 10_000


class VllmMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str):
        self.labels = {"model_name": model_name, "engine": "0"}

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, [*LABELS, *extra], registry=registry)

        def histogram(name: str, doc: str, buckets: tuple | list) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=registry)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed")
        self.prompt_tokens_cached = counter(
            "vllm:prompt_tokens_cached", "Prompt tokens read from the prefix cache"
        )
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens")
        self.success = counter(
            "vllm:request_success", "Finished requests by finish reason", "finished_reason"
        )
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS
        )
        self.itl = histogram("vllm:inter_token_latency_seconds", "Inter-token latency", ITL_BUCKETS)
        # The name dashboards made for vLLM before 0.10 read (the same values).
        self.tpot = histogram(
            "vllm:time_per_output_token_seconds", "Time per output token", ITL_BUCKETS
        )
        # vLLM's per-request mean: its decode time over its tokens after the first.
        self.request_tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Time per output token, each request's mean",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency", REQUEST_BUCKETS
        )
        self.queue = histogram("vllm:request_queue_time_seconds", "Queue time", REQUEST_BUCKETS)
        self.inference = histogram(
            "vllm:request_inference_time_seconds", "Inference (running) time", REQUEST_BUCKETS
        )
        self.prefill = histogram(
            "vllm:request_prefill_time_seconds", "Prefill time", REQUEST_BUCKETS
        )
        self.decode = histogram("vllm:request_decode_time_seconds", "Decode time", REQUEST_BUCKETS)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Generated tokens per request", TOKEN_BUCKETS
        )
        self.max_tokens = histogram(
            "vllm:request_params_max_tokens", "The max_tokens of requests", TOKEN_BUCKETS
        )
        self.n = histogram("vllm:request_params_n", "The n of requests", N_BUCKETS)
        self.max_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "The most tokens one choice of a request generated",
            TOKEN_BUCKETS,
        )
        self.step_tokens = histogram(
            "vllm:iteration_tokens_total", "Tokens per engine step", STEP_BUCKETS
        )
        # Every series from the start (at 0), as vLLM's: a rate over a series that appears
        # with the first request would miss it.
        for reason in sorted(set(FINISH_REASONS.values())):
            self.success.labels(**self.labels, finished_reason=reason)
        for metric in vars(self).values():
            if isinstance(metric, Histogram | Counter) and metric is not self.success:
                metric.labels(**self.labels)
        self.registry = registry
        self.engine_collector: EngineCollector | None = None
        # request (its first choice's id) -> (choices still going, most tokens so far)
        self._open: dict[str, tuple[int, int]] = {}

    def watch_engine(
        self,
        num_queued: Callable[[], int],
        num_running: Callable[[], int],
        stats: Callable[[], dict[str, float]],
        cache_info: dict[str, str],
    ) -> None:
        self.engine_collector = EngineCollector(
            self.labels, num_queued, num_running, stats, cache_info
        )
        self.registry.register(self.engine_collector)

    def record_step(self, num_tokens: int) -> None:
        self.step_tokens.labels(**self.labels).observe(num_tokens)

    def record_tokens(self, prompt: int, cached: int, generated: int) -> None:
        """A step's tokens (Metrics.record_tokens counts them): prompts computed, read from the
        prefix cache, and generated."""
        labels = self.labels
        self.prompt_tokens.labels(**labels).inc(prompt)
        self.prompt_tokens_cached.labels(**labels).inc(cached)
        self.generation_tokens.labels(**labels).inc(generated)

    def unwatch(self) -> None:
        if self.engine_collector is not None:
            self.registry.unregister(self.engine_collector)
            self.engine_collector = None

    def record(self, seq: Sequence) -> None:
        """A finished sequence (one choice of a request: the prompt counts with the first)."""
        labels = self.labels
        reason = FINISH_REASONS.get(seq.finish_reason or "", "abort")
        self.success.labels(**labels, finished_reason=reason).inc()
        if seq.choice_index == 0:
            self.request_prompt_tokens.labels(**labels).observe(seq.inputs.num_prompt_tokens)
        self.request_generation_tokens.labels(**labels).observe(seq.num_completion_tokens)
        self.max_tokens.labels(**labels).observe(seq.max_tokens)
        if seq.choice_index == 0:
            self.n.labels(**labels).observe(seq.num_choices)
        self._generated(seq)
        itl, tpot = self.itl.labels(**labels), self.tpot.labels(**labels)
        for seconds in seq.inter_token_latencies:
            itl.observe(seconds)
            tpot.observe(seconds)
        end = seq.finish_time
        if end is None:
            return
        self.e2e.labels(**labels).observe(end - seq.received_time)
        if seq.scheduled_time is None:  # never ran (a queue timeout, or aborted waiting)
            return
        self.queue.labels(**labels).observe(seq.scheduled_time - seq.arrival_time)
        self.inference.labels(**labels).observe(end - seq.scheduled_time)
        if seq.first_token_time is not None:
            self.ttft.labels(**labels).observe(seq.first_token_time - seq.received_time)
            self.prefill.labels(**labels).observe(seq.first_token_time - seq.scheduled_time)
            self.decode.labels(**labels).observe(end - seq.first_token_time)
            after_first = seq.num_completion_tokens - 1  # (0 for one token or none, as vLLM)
            mean = (end - seq.first_token_time) / after_first if after_first > 0 else 0.0
            self.request_tpot.labels(**labels).observe(mean)

    def _generated(self, seq: Sequence) -> None:
        """request_max_num_generation_tokens, once the request's last choice has ended."""
        group = seq.group_id or seq.request_id
        going, most = self._open.pop(group, (seq.num_choices, 0))
        going, most = going - 1, max(most, seq.num_completion_tokens)
        if going <= 0:
            self.max_generation_tokens.labels(**self.labels).observe(most)
            return
        if len(self._open) >= MAX_OPEN_REQUESTS:
            self._open.pop(next(iter(self._open)))
        self._open[group] = (going, most)


class EngineCollector:
    """What the engine holds, read at scrape time: the queue, the batch, the KV cache and its
    prefix cache (vLLM counts the prefix cache in tokens too), the preemptions."""

    GAUGES = {
        "vllm:num_requests_running": "Requests in the running batch",
        "vllm:num_requests_waiting": "Requests waiting to run: queued, or preempted",
        "vllm:kv_cache_usage_perc": "KV cache usage; 1 is 100 percent",
        # The name dashboards made for vLLM before 0.10 read (the same value).
        "vllm:gpu_cache_usage_perc": "KV cache usage; 1 is 100 percent (the older name)",
    }
    COUNTERS = {  # name: (doc, the engine's stat)
        "vllm:num_preemptions": ("Preemptions", "preemptions"),
        "vllm:prefix_cache_queries": (
            "Prefix cache queries, in queried tokens",
            "prefix_cache_queried_tokens",
        ),
        "vllm:prefix_cache_hits": ("Prefix cache hits, in tokens", "prefix_cache_hit_tokens"),
    }

    def __init__(
        self,
        labels: dict[str, str],
        num_queued: Callable[[], int],
        num_running: Callable[[], int],
        stats: Callable[[], dict[str, float]],
        cache_info: dict[str, str],
    ):
        self.labels = labels
        self.num_queued, self.num_running, self.stats = num_queued, num_running, stats
        self.cache_info = cache_info

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.stats()
        usage = stats["kv_cache_usage"]
        values = [self.num_running(), self.num_queued(), usage, usage]
        names, label_values = list(self.labels), list(self.labels.values())
        for (name, doc), value in zip(self.GAUGES.items(), values, strict=True):
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(label_values, value)
            yield family
        for name, (doc, stat) in self.COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(label_values, stats[stat])
            yield family
        # vLLM's info gauge: 1, the cache's configuration in its labels
        info_labels = {**self.labels, **self.cache_info}
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "The KV cache's configuration", labels=list(info_labels)
        )
        info.add_metric(list(info_labels.values()), 1)
        yield info
