"""/metrics under vLLM's names (`vllm:*`, labels model_name and engine), so dashboards, alerts and
autoscalers written for vLLM read this server: every series a request moves, with values that
agree with its answer's usage and with each other."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import make_settings, start_client

pytestmark = pytest.mark.anyio


def samples(text: str, model_name: str) -> dict[tuple[str, tuple], float]:
    """Every vllm: sample as {(name, sorted labels but model_name/engine): value}, after
    checking each carries vLLM's two labels (the first served model name, engine 0)."""
    expected = {"model_name": model_name, "engine": "0"}
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("vllm:"):
                continue
            labels = dict(sample.labels)
            assert {k: labels.pop(k) for k in expected} == expected, sample
            found[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return found


async def test_a_request_moves_vllms_series(tiny_model_dir: Path) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    settings = make_settings(tiny_model_dir)
    name = settings.served_model_names()[0]
    async for client in start_client(settings):
        idle = samples((await client.get("/metrics")).text, name)
        assert idle[("vllm:num_requests_running", ())] == 0
        assert idle[("vllm:num_requests_waiting", ())] == 0
        assert idle[("vllm:kv_cache_usage_perc", ())] == 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: {")]
        usage = httpx.Response(200, content=lines[-1][6:]).json()["usage"]
        after = samples((await client.get("/metrics")).text, name)

    def value(name: str, **labels: str) -> float:
        return after[(name, tuple(sorted(labels.items())))]

    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    assert completion == 6
    assert value("vllm:prompt_tokens_total") == prompt
    assert value("vllm:generation_tokens_total") == completion
    assert value("vllm:request_success_total", finished_reason="length") == 1
    assert value("vllm:request_prompt_tokens_sum") == prompt
    assert value("vllm:request_generation_tokens_sum") == completion
    assert value("vllm:request_params_max_tokens_sum") == 6
    assert value("vllm:request_params_n_sum") == value("vllm:request_params_n_count") == 1
    assert value("vllm:request_max_num_generation_tokens_sum") == completion
    # the prompt (in one step or in chunks), then one token a step for all but the last
    assert value("vllm:iteration_tokens_total_sum") == prompt + completion - 1
    info = [labels for (name, labels) in after if name == "vllm:cache_config_info"]
    assert dict(info[0])["block_size"] == "16" and "num_gpu_blocks" in dict(info[0])
    assert value("vllm:prefix_cache_queries_total") >= prompt  # tokens, as vLLM counts them
    assert value("vllm:prefix_cache_hits_total") == 0
    assert value("vllm:prompt_tokens_cached_total") == 0
    assert value("vllm:num_preemptions_total") == 0
    # One interval between each two tokens; every request histogram saw the request once.
    assert value("vllm:inter_token_latency_seconds_count") == completion - 1
    # the names of vLLM before 0.10, for older dashboards: the same values
    assert value("vllm:time_per_output_token_seconds_count") == completion - 1
    assert value("vllm:gpu_cache_usage_perc") == value("vllm:kv_cache_usage_perc")
    seconds = {}
    for name in ("e2e_request_latency", "time_to_first_token", "request_queue_time"):
        seconds[name] = value(f"vllm:{name}_seconds_sum")
        assert value(f"vllm:{name}_seconds_count") == 1
    for name in ("request_inference_time", "request_prefill_time", "request_decode_time"):
        seconds[name] = value(f"vllm:{name}_seconds_sum")
        assert value(f"vllm:{name}_seconds_count") == 1
    # queue, then prefill and decode (together the inference), all within end to end
    inference = seconds["request_inference_time"]
    parts = seconds["request_prefill_time"] + seconds["request_decode_time"]
    assert abs(inference - parts) < 1e-6
    assert seconds["request_queue_time"] + inference <= seconds["e2e_request_latency"]
    assert seconds["time_to_first_token"] <= seconds["e2e_request_latency"]
    assert value("vllm:inter_token_latency_seconds_sum") <= seconds["request_decode_time"] + 1e-6
    # vLLM's per-request mean time per output token: the decode time over the tokens after
    # the first
    assert value("vllm:request_time_per_output_token_seconds_count") == 1
    mean = value("vllm:request_time_per_output_token_seconds_sum")
    assert abs(mean - seconds["request_decode_time"] / (completion - 1)) < 1e-6


def test_a_request_that_never_ran_counts_as_aborted() -> None:
    """A queue timeout is vLLM's abort; it has an end-to-end latency and nothing else."""
    import torch
    from prometheus_client import generate_latest

    from server.engine.inputs import ModelInputs
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import Sequence
    from server.metrics import Metrics

    metrics = Metrics("m")  # both families, as the engine's on_finish records them
    inputs = ModelInputs({"input_ids": torch.zeros(1, 5, dtype=torch.long)}, 5, 0)
    seq = Sequence("r", inputs, SamplingParams(), 16)
    seq.finish_reason, seq.finish_time = "queue_timeout", seq.arrival_time + 60
    metrics.record_finished(seq)
    text = generate_latest(metrics.registry).decode()
    assert "vlm_prompt_tokens_total 0.0" in text  # never computed: nobody's bill
    found = samples(text, "m")
    assert found[("vllm:request_success_total", (("finished_reason", "abort"),))] == 1
    assert found[("vllm:e2e_request_latency_seconds_count", ())] == 1
    assert found[("vllm:request_queue_time_seconds_count", ())] == 0
    assert found[("vllm:time_to_first_token_seconds_count", ())] == 0
    assert found[("vllm:prompt_tokens_total", ())] == 0  # never computed


async def test_an_aborted_request_counts_as_aborted(tiny_model_dir: Path) -> None:
    """A client that goes away: its sequence is aborted, and counted (from the engine, which
    sees every sequence end, not only those whose answer was read), in the server's own
    token counters too (a project's chargeback includes the tokens it had computed)."""
    import asyncio

    settings = make_settings(tiny_model_dir)
    name = settings.served_model_names()[0]
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Go on and on."}],
        "max_tokens": 2000,
        "ignore_eos": True,
    }
    async for client in start_client(settings):
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        request = asyncio.create_task(client.post("/v1/chat/completions", json=body))
        async with asyncio.timeout(30):
            while not engine.num_running:
                await asyncio.sleep(0.01)
        request.cancel()
        async with asyncio.timeout(30):
            while engine.num_running:
                await asyncio.sleep(0.01)
        text = (await client.get("/metrics")).text
        found = samples(text, name)
    assert found[("vllm:request_success_total", (("finished_reason", "abort"),))] == 1
    assert found[("vllm:e2e_request_latency_seconds_count", ())] == 1
    generated = found[("vllm:generation_tokens_total", ())]
    assert generated > 0
    own = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vlm_")
    }
    assert own["vlm_generated_tokens_total"] == generated
    assert own['vlm_project_tokens_total{kind="generated",project="-"}'] == generated
    assert own['vlm_sequences_finished_total{reason="abort"}'] == 1


def test_a_prompt_counts_once_with_its_first_token_or_at_its_end() -> None:
    """Per step: a prompt with its first token, each generated token in its step; a sequence
    that ran and ended before its first token counts its prompt when it ends; a second choice
    of one prompt counts none."""
    import torch
    from prometheus_client import generate_latest

    from server.engine.inputs import ModelInputs
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import Sequence
    from server.metrics import Metrics

    metrics = Metrics("m")
    inputs = ModelInputs({"input_ids": torch.zeros(1, 5, dtype=torch.long)}, 5, 0)
    first, second, cut = (Sequence(f"r{i}", inputs, SamplingParams(), 16) for i in range(3))
    second.choice_index = 1
    for seq in (first, second, cut):
        seq.scheduled_time = seq.arrival_time
    for _ in range(3):
        for seq in (first, second):
            seq.output_token_ids.append(7)
        metrics.record_tokens([first, second])
    cut.finish_reason = "abort"
    metrics.record_finished(cut)
    found = samples(generate_latest(metrics.registry).decode(), "m")
    assert found[("vllm:prompt_tokens_total", ())] == 5 + 5
    assert found[("vllm:generation_tokens_total", ())] == 6


def test_a_requests_most_generated_tokens_wait_for_its_last_choice() -> None:
    """request_max_num_generation_tokens is one observation per request: the most any of its
    n choices generated, once the last has ended; request_params_n its n."""
    import torch
    from prometheus_client import CollectorRegistry, generate_latest

    from server.engine.inputs import ModelInputs
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import Sequence
    from server.vllm_metrics import VllmMetrics

    registry = CollectorRegistry()
    metrics = VllmMetrics(registry, "m")
    inputs = ModelInputs({"input_ids": torch.zeros(1, 5, dtype=torch.long)}, 5, 0)
    for index, generated in ((0, 3), (2, 7), (1, 4)):
        seq = Sequence("req-9" if index == 0 else f"req-9-{index}", inputs, SamplingParams(), 16)
        seq.choice_index, seq.num_choices = index, 3
        seq.group_id = "req-9" if index else ""
        seq.output_token_ids = [1] * generated
        metrics.record(seq)
        found = samples(generate_latest(registry).decode(), "m")
        count = found[("vllm:request_max_num_generation_tokens_count", ())]
        assert count == (1 if generated == 4 else 0)
    assert found[("vllm:request_max_num_generation_tokens_sum", ())] == 7
    assert found[("vllm:request_params_n_sum", ())] == 3


def test_job_counts_unknown_are_nan_and_the_store_says_it_is_down() -> None:
    """A replica that has not read the job store's counts (it started during an outage) says
    NaN, not 0 jobs; vlm_job_store_up follows the store's reachability."""
    from server.metrics import Metrics

    metrics, up = Metrics("tiny"), [False]
    metrics.watch_jobs(lambda: None, lambda: {"pending": 2}, lambda: up[0])
    text = metrics.render().decode()
    assert 'vlm_jobs{status="queued"} NaN' in text and "vlm_job_store_up 0.0" in text
    assert 'vlm_webhook_deliveries{status="pending"} 2.0' in text
    up[0] = True
    assert "vlm_job_store_up 1.0" in metrics.render().decode()


async def test_token_counters_move_while_an_answer_is_still_generated(tiny_model_dir: Path) -> None:
    """As vLLM's: the prompt counts with the first token and each token as it comes, so a rate
    over them is the load now (an hour-long answer is not one spike when it ends)."""
    import asyncio

    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Go on and on."}],
        "max_tokens": 1500,
        "ignore_eos": True,
    }
    settings = make_settings(tiny_model_dir)
    name = settings.served_model_names()[0]
    async for client in start_client(settings):
        request = asyncio.create_task(client.post("/v1/chat/completions", json=body))
        async with asyncio.timeout(60):
            while True:
                text = (await client.get("/metrics")).text
                during = samples(text, name)
                if during[("vllm:generation_tokens_total", ())] > 0:
                    break
                await asyncio.sleep(0.005)
        answered = not request.done()
        usage = (await request).json()["usage"]
        after = samples((await client.get("/metrics")).text, name)
    own = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vlm_")
    }
    assert answered, "the answer had ended before a token was counted"
    generated = during[("vllm:generation_tokens_total", ())]
    assert 0 < generated < 1500 and own["vlm_generated_tokens_total"] == generated
    assert during[("vllm:request_success_total", (("finished_reason", "length"),))] == 0
    assert during[("vllm:prompt_tokens_total", ())] == usage["prompt_tokens"]
    assert own["vlm_prompt_tokens_total"] == usage["prompt_tokens"]
    assert own['vlm_project_tokens_total{kind="generated",project="-"}'] == generated
    assert after[("vllm:generation_tokens_total", ())] == usage["completion_tokens"] == 1500
    assert after[("vllm:prompt_tokens_total", ())] == usage["prompt_tokens"]
