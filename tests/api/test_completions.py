"""POST /v1/completions: text prompts (string, several, token ids), streaming, refusals."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.anyio


async def complete(client: httpx.AsyncClient, **body: object) -> httpx.Response:
    return await client.post("/v1/completions", json={"model": "tiny", **body})


async def test_a_string_prompt(client: httpx.AsyncClient) -> None:
    response = await complete(client, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 5 and usage["total_tokens"] == (
        usage["prompt_tokens"] + usage["completion_tokens"]
    )


async def test_default_max_tokens_is_16_and_several_prompts(client: httpx.AsyncClient) -> None:
    prompts = ["The sky is", "Two plus two is", "Hello"]
    response = await complete(client, prompt=prompts, temperature=0, ignore_eos=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 3 * 16
    alone = await complete(client, prompt=prompts[1], temperature=0, ignore_eos=True)
    assert alone.json()["choices"][0]["text"] == body["choices"][1]["text"]


async def test_token_id_prompts(client: httpx.AsyncClient) -> None:
    one = await complete(client, prompt=[10, 20, 30], max_tokens=3, temperature=0)
    two = await complete(client, prompt=[[10, 20, 30], [40, 50]], max_tokens=3, temperature=0)
    assert one.status_code == two.status_code == 200, two.text
    assert one.json()["usage"]["prompt_tokens"] == 3
    assert two.json()["choices"][0]["text"] == one.json()["choices"][0]["text"]
    too_big = await complete(client, prompt=[10**9])
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "prompt"


async def test_streaming_equals_non_streaming(client: httpx.AsyncClient) -> None:
    body = {"prompt": ["A", "B"], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    full = (await complete(client, **body)).json()
    texts = {0: "", 1: ""}
    finished, usage = {}, None
    payload = {"model": "tiny", **body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=payload) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert chunk["object"] == "text_completion"
            if not chunk["choices"]:
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["text"]
                if choice["finish_reason"]:
                    finished[choice["index"]] = choice["finish_reason"]
    assert [texts[0], texts[1]] == [c["text"] for c in full["choices"]]
    assert finished == {0: "length", 1: "length"}
    assert usage["completion_tokens"] == 12


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"n": 2}, "n"),
        ({"logprobs": 2}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "<|vision_start|><|image_pad|><|vision_end|>"}, "prompt"),
        ({"surprise": 1}, "surprise"),
    ],
)
async def test_refusals_name_the_field(client: httpx.AsyncClient, extra: dict, param: str) -> None:
    response = await complete(client, **{"prompt": "Hi", **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
