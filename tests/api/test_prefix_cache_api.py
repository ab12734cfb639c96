"""Prefix and encoder caches seen by a client: usage.prompt_tokens_details.cached_tokens, the
same answer either way, hit counters in /metrics, and a flag that turns caching off."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from server.engine.loader import resolve_device, resolve_dtype
from tests.api.test_errors import assert_error
from tests.helpers import data_uri, make_image, make_settings, start_client

pytestmark = pytest.mark.anyio


def body(seed: int, question: str = "What is in this image?") -> dict:
    image = {"type": "image_url", "image_url": {"url": data_uri(make_image(160, 120, seed=seed))}}
    content = [image, {"type": "text", "text": question}]
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
    }


def metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


async def ask(client: httpx.AsyncClient, payload: dict) -> dict:
    response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 200, response.text
    return response.json()


async def test_cached_tokens_and_hit_metrics(tiny_model_dir: Path) -> None:
    async for client in start_client(make_settings(tiny_model_dir, block_size=4)):
        first = await ask(client, body(1))
        again = await ask(client, body(1))
        other = await ask(client, body(2))  # same size, other pixels
        follow_up = await ask(client, body(1, "What is in this image? And its colours?"))
        metrics = (await client.get("/metrics")).text
    details = [r["usage"]["prompt_tokens_details"] for r in (first, again, other, follow_up)]
    prompt_tokens = first["usage"]["prompt_tokens"]
    image_tokens = details[0]["image_tokens"]
    assert details[0]["cached_tokens"] == 0
    assert details[1]["cached_tokens"] == (prompt_tokens - 1) // 4 * 4  # all but the tail
    assert details[2]["cached_tokens"] < prompt_tokens - image_tokens  # never the image's tokens
    assert details[3]["cached_tokens"] > image_tokens  # the image and the text before the change
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    hits = metric(metrics, "vlm_prefix_cache_hit_tokens_total")
    assert hits == sum(d["cached_tokens"] for d in details)
    # vLLM's counter of the same (labelled by model and engine)
    cached = next(line for line in metrics.splitlines() if line.startswith("vllm:prompt_tokens_c"))
    assert float(cached.split()[-1]) == hits
    assert metric(metrics, "vlm_prefix_cache_queried_tokens_total") >= 4 * prompt_tokens
    assert metric(metrics, "vlm_encoder_cache_misses_total") == 2  # two distinct images
    # what the cache holds: the two images' vision-tower outputs, text-width rows of --dtype
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["text_config"]["hidden_size"]
    settings = make_settings(tiny_model_dir)
    width = resolve_dtype(settings.dtype, resolve_device(settings.device)).itemsize
    assert metric(metrics, "vlm_encoder_cache_bytes") == 2 * image_tokens * hidden * width
    assert 0 <= metric(metrics, "vlm_kv_cache_usage") <= 1


async def test_prefix_caching_can_be_turned_off(tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir, enable_prefix_caching=False)
    async for client in start_client(settings):
        first = await ask(client, body(1))
        again = await ask(client, body(1))
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["choices"][0]["message"] == first["choices"][0]["message"]


async def test_cache_salt_isolates_the_caches(tiny_model_dir: Path) -> None:
    """vLLM's cache_salt: prefix-cache blocks and vision-tower outputs are reused only by
    requests with the same salt (none is a salt of its own); the answers stay the same."""

    def salted(salt: str | None) -> dict:
        return body(1) | ({} if salt is None else {"cache_salt": salt})

    async for client in start_client(make_settings(tiny_model_dir, block_size=4)):
        answers = [await ask(client, salted(salt)) for salt in ("a", "a", "b", None, "b", None)]
        metrics = (await client.get("/metrics")).text
        response = await client.post("/v1/chat/completions", json=body(1) | {"cache_salt": ""})
        assert_error(response, 400, "cache_salt")
        text = {"model": "tiny", "prompt": "x" * 40, "max_tokens": 1, "cache_salt": "a"}
        completions = [(await client.post("/v1/completions", json=text)).json() for _ in "12"]
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in answers]
    assert cached[0] == cached[2] == cached[3] == 0
    assert cached[1] == cached[4] == cached[5] > answers[0]["usage"]["prompt_tokens"] // 2
    assert len({r["choices"][0]["message"]["content"] for r in answers}) == 1
    assert metric(metrics, "vlm_encoder_cache_misses_total") == 3  # once per salt
    assert completions[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


@pytest.mark.parametrize("per_project", [True, False])
async def test_cache_per_project_keeps_the_caches_apart(tiny_model_dir: Path, per_project: bool):
    """--cache-per-project: the prefix, vision and grammar caches as if each API key's project
    sent its own cache_salt (another key's hit would tell that its prompt was sent); within a
    project they are shared. Without it, every key shares them."""
    settings = make_settings(
        tiny_model_dir, block_size=4, api_keys=["sk-a", "sk-b"], cache_per_project=per_project
    )
    schema = {"type": "object", "properties": {"per_project": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    async for client in start_client(settings):
        grammars = client.app.state.services.engine.runner.grammars  # type: ignore[attr-defined]
        before = len(grammars._grammars)
        answers = []
        for key in ("sk-a", "sk-a", "sk-b"):
            client.headers["Authorization"] = f"Bearer {key}"
            answers.append(await ask(client, body(1) | {"response_format": fmt, "max_tokens": 2}))
        metrics = (await client.get("/metrics")).text
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in answers]
    assert cached[0] == 0 and cached[1] > 0
    assert (cached[2] == 0) is per_project
    assert metric(metrics, "vlm_encoder_cache_misses_total") == (2 if per_project else 1)
    assert len(grammars._grammars) == before + (2 if per_project else 1)
    assert len({r["choices"][0]["message"]["content"] for r in answers}) == 1


async def test_cache_salt_keeps_compiled_grammars_apart(client: httpx.AsyncClient) -> None:
    """A schema another tenant compiled is compiled again under a new salt (found at once, it
    would tell that it had been used); under the same salt it is found."""
    grammars = client.app.state.services.engine.runner.grammars  # type: ignore[attr-defined]
    schema = {"type": "object", "properties": {"salted": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    before = len(grammars._grammars)
    for salt in ("a", "b", "a", None):
        payload = body(1) | {"response_format": fmt, "max_tokens": 2}
        await ask(client, payload | ({} if salt is None else {"cache_salt": salt}))
    assert len(grammars._grammars) == before + 3
