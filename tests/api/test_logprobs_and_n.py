"""Chat logprobs (OpenAI's shape, streamed and not) and n choices, through the official
openai client against the in-process app."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.api.test_batching_api import wait_for
from tests.api.test_operator import token_counts
from tests.helpers import make_settings, serve_in_thread

pytestmark = pytest.mark.anyio

# Long enough for several full KV blocks (16 tokens each), so n choices share them.
QUESTION = "Tell me a long story about a lighthouse keeper and the sea. " * 6
MESSAGES = [{"role": "user", "content": QUESTION}]


@pytest.fixture
def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    # Not closed here: closing the SDK client would close the shared httpx client.
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )


async def test_logprobs_and_top_logprobs(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens == 6
    assert choice.logprobs.model_extra == {} and choice.logprobs.refusal is None
    assert "refusal" in choice.logprobs.model_fields_set  # (sent as null, as OpenAI's)
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace") == entry.token
        assert len(entry.top_logprobs) == 3
        # greedy picks the most likely token of the raw distribution
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
    plain = await sdk.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=2, logprobs=True
    )
    assert all(entry.top_logprobs == [] for entry in plain.choices[0].logprobs.content)
    none = await sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert none.choices[0].logprobs is None


async def test_streamed_logprobs_match(sdk: openai.AsyncOpenAI) -> None:
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0.9,
        "seed": 11,
        "logprobs": True,
        "top_logprobs": 2,
    }
    full = await sdk.chat.completions.create(**body)
    stream = await sdk.chat.completions.create(**body, stream=True)
    tokens, text = [], ""
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                tokens += [(e.token, e.logprob) for e in choice.logprobs.content]
    expected = [(e.token, e.logprob) for e in full.choices[0].logprobs.content]
    assert text == full.choices[0].message.content and tokens == expected


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
async def test_logprob_refusals(sdk: openai.AsyncOpenAI, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.chat.completions.create(model="tiny", messages=MESSAGES, **extra)
    assert refused.value.body["param"] == param


async def test_n_choices_share_the_prompt(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    engine = client.app.state.services.engine  # type: ignore[attr-defined]
    question = [{"role": "user", "content": "(n) " + QUESTION}]  # not cached yet
    hits_before = engine.stats()["prefix_cache_hit_tokens"]
    counted_before = await token_counts(client)
    body = {"model": "tiny", "messages": question, "max_tokens": 5, "temperature": 1.0}
    response = await sdk.chat.completions.create(
        **body, n=3, seed=42, extra_body={"ignore_eos": True}
    )
    # /metrics counts the shared prompt once and every choice's tokens, as usage does
    counted = [a - b for a, b in zip(await token_counts(client), counted_before, strict=True)]
    assert counted == [response.usage.prompt_tokens, response.usage.completion_tokens]
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.completion_tokens == 15
    prompt_tokens = response.usage.prompt_tokens
    assert response.usage.total_tokens == prompt_tokens + 15
    # choices 1 and 2 reused the first one's full KV blocks: the prompt was prefilled once
    shared = (prompt_tokens - 1) // 16 * 16
    assert shared >= 64
    first_hits = response.usage.prompt_tokens_details.cached_tokens  # the system prompt's
    assert first_hits < shared
    assert engine.stats()["prefix_cache_hit_tokens"] - hits_before == first_hits + 2 * shared
    texts = [c.message.content for c in response.choices]
    assert len(set(texts)) > 1
    again = await sdk.chat.completions.create(**body, n=3, seed=42, extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == texts  # seeded: reproducible
    # choice i samples with seed + i: choice 1 of seed 42 is choice 0 of seed 43
    single = await sdk.chat.completions.create(**body, seed=43, extra_body={"ignore_eos": True})
    assert single.choices[0].message.content == texts[1]


async def test_n_streamed(sdk: openai.AsyncOpenAI) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "seed": 7, "n": 2}
    full = await sdk.chat.completions.create(**body, extra_body={"ignore_eos": True})
    stream = await sdk.chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
    )
    texts, finished, usage = {0: "", 1: ""}, {}, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finished[choice.index] = choice.finish_reason or finished.get(choice.index)
    assert [texts[0], texts[1]] == [c.message.content for c in full.choices]
    assert finished == {0: "length", 1: "length"}
    assert usage is not None and usage.completion_tokens == 8


async def test_n_above_the_maximum(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.chat.completions.create(model="tiny", messages=MESSAGES, n=9)
    assert refused.value.body["param"] == "n"


async def test_a_disconnect_aborts_every_choice(tiny_model_dir: Path) -> None:
    long = {"model": "tiny", "messages": MESSAGES, "n": 3, "max_tokens": 3000, "ignore_eos": True}
    with serve_in_thread(make_settings(tiny_model_dir)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/chat/completions", json=long, timeout=1)
            await wait_for(client, "num_running", 0)
            payload = {**long, "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=payload):
                await wait_for(client, "num_running", 3)
            await wait_for(client, "num_running", 0)
