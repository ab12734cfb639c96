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
    for ids in ([-1], [10**12], [[1, 2], [-3]]):  # said as token ids, not as "not a string"
        response = await complete(client, prompt=ids)
        assert response.status_code == 400 and "token id" in response.json()["error"]["message"]


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
        ({"n": 9}, "n"),  # above --max-n (8)
        ({"logprobs": 21}, "logprobs"),
        ({"best_of": 2}, "best_of"),
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


async def test_logprobs_in_vllms_legacy_shape(client: httpx.AsyncClient) -> None:
    # seeded: a random draw can sample two tokens of one text (one legacy top_logprobs key)
    body = {"prompt": "Once upon", "max_tokens": 5, "logprobs": 3, "ignore_eos": True, "seed": 11}
    response = await complete(client, **body)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    logprobs = choice["logprobs"]
    tokens = logprobs["tokens"]
    assert len(tokens) == len(logprobs["token_logprobs"]) == 5
    # A sampled special token (a random model may draw one) is listed by its name, as vLLM
    # lists it, but the text skips it.
    tokenizer = client.app.state.services.engine.tokenizer  # type: ignore[attr-defined]
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    assert "".join(t for t in tokens if t not in special) == choice["text"]
    assert logprobs["text_offset"][0] == 0
    for token, logprob, top, offset, next_offset in zip(
        tokens,
        logprobs["token_logprobs"],
        logprobs["top_logprobs"],
        logprobs["text_offset"],
        [*logprobs["text_offset"][1:], logprobs["text_offset"][-1] + len(tokens[-1])],
        strict=True,
    ):
        # (a token sharing its text with a likelier one: that one's logprob under the text)
        assert logprob <= 0 and top[token] >= logprob
        # the 3 most likely and the sampled token, keyed by text (vLLM's legacy shape): tokens
        # that are pieces of one character all read U+FFFD and share one entry
        assert 3 <= len(top) <= 4 or "\ufffd" in top, top
        assert max(top.values()) >= logprob
        assert next_offset - offset == len(token)


async def test_greedy_logprobs_pick_the_most_likely_token(client: httpx.AsyncClient) -> None:
    response = await complete(client, prompt="Hello", max_tokens=4, logprobs=1, temperature=0)
    logprobs = response.json()["choices"][0]["logprobs"]
    for token, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert len(top) == 1 and top == {token: logprob}  # greedy: the sampled is the top one


async def test_tokens_sharing_a_text_keep_the_likelier_logprob(
    client: httpx.AsyncClient,
) -> None:
    """Byte pieces of characters (CJK, emoji) all read U+FFFD: under that one key the top
    logprobs keep the likelier token's, so the dict's best is the position's best, as the
    ids' own dict says (lm-eval's is_greedy: the token's logprob == the dict's max; the
    sampled piece's own logprob once replaced the best and made a non-greedy token greedy)."""
    body = {"prompt": [[162, 245, 98, 162, 250, 105, 164, 103, 252]], "max_tokens": 1}
    body |= {"temperature": 0, "logprobs": 2, "echo": True}
    by_text = (await complete(client, **body)).json()["choices"][0]["logprobs"]
    by_id = (await complete(client, **body, return_tokens_as_token_ids=True)).json()
    by_id = by_id["choices"][0]["logprobs"]
    assert "\ufffd" in by_text["tokens"]
    for text_top, id_top in zip(
        by_text["top_logprobs"][1:], by_id["top_logprobs"][1:], strict=True
    ):
        assert max(text_top.values()) == max(id_top.values())


async def test_echo_and_n(client: httpx.AsyncClient) -> None:
    body = {"prompt": ["The sky is", "Hi"], "max_tokens": 3, "temperature": 1.0, "seed": 5}
    response = await complete(client, **body, n=3, echo=True, ignore_eos=True)
    assert response.status_code == 200, response.text
    result = response.json()
    choices = result["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    assert all(c["text"].startswith("The sky is") for c in choices[:3])
    assert all(c["text"].startswith("Hi") for c in choices[3:])
    alone = [(await complete(client, prompt=p, max_tokens=1)).json() for p in body["prompt"]]
    usage = result["usage"]
    assert usage["completion_tokens"] == 18
    # each prompt counted once, not once per choice
    assert usage["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert len({c["text"] for c in choices[:3]}) > 1  # choice i samples with seed + i
    again = await complete(client, **body, n=3, echo=True, ignore_eos=True)
    assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in choices]


async def test_streamed_n_logprobs_and_echo(client: httpx.AsyncClient) -> None:
    body = {"prompt": "A", "max_tokens": 4, "temperature": 0.8, "seed": 3, "ignore_eos": True}
    full = (await complete(client, **body, n=2, logprobs=2)).json()
    texts, tokens, finished = {0: "", 1: ""}, {0: [], 1: []}, {}
    payload = {"model": "tiny", **body, "n": 2, "logprobs": 2, "stream": True}
    async with client.stream("POST", "/v1/completions", json=payload) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line.removeprefix("data: "))["choices"]:
                    texts[choice["index"]] += choice["text"]
                    tokens[choice["index"]] += choice["logprobs"]["tokens"]
                    finished[choice["index"]] = choice["finish_reason"]
    for index, choice in enumerate(full["choices"]):
        assert texts[index] == choice["text"] and tokens[index] == choice["logprobs"]["tokens"]
    assert finished == {0: "length", 1: "length"}
    echoed = await complete(client, **{**body, "stream": True}, echo=True)
    assert echoed.status_code == 200
    first = next(line for line in echoed.text.splitlines() if line.startswith("data: {"))
    assert json.loads(first.removeprefix("data: "))["choices"][0]["text"].startswith("A")


async def test_echo_with_logprobs_scores_the_prompt(client: httpx.AsyncClient) -> None:
    """What ranking clients do: echo the prompt with logprobs and read each prompt token's
    logprob. They are the model's own (a plain forward over the prompt), the first token's
    is null, and they come the same streamed, twice (no prefix-cache hit skips them)."""
    import torch

    services = client.app.state.services  # type: ignore[attr-defined]
    runner, tokenizer = services.engine.runner, services.engine.tokenizer
    # Long enough for prefix-cache hits (a 16-token block), with characters of several tokens.
    prompt = "The quick brown fox jumps over the lazy dog near the water. " * 4 + "naïve café 🙂"
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 3}
    first, again = [(await complete(client, **body)).json() for _ in range(2)]
    assert len(tokenizer.encode(prompt)) > 40
    assert first["choices"] == again["choices"]
    details = again["usage"].get("prompt_tokens_details") or {}
    assert details.get("cached_tokens", 0) == 0
    choice = first["choices"][0]
    logprobs = choice["logprobs"]
    ids = tokenizer.encode(prompt)
    assert choice["text"].startswith(prompt)
    assert len(logprobs["tokens"]) == len(ids) + first["usage"]["completion_tokens"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    offsets = logprobs["text_offset"]
    # each token starts where the texts before it end, prompt and answer alike
    assert offsets == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(offsets))]
    with torch.inference_mode():
        logits = runner.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    got = torch.tensor(logprobs["token_logprobs"][1 : len(ids)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for top, token, value in zip(
        logprobs["top_logprobs"][1 : len(ids)],
        logprobs["tokens"][1 : len(ids)],
        logprobs["token_logprobs"][1 : len(ids)],
        strict=True,
    ):
        # the token and the 3 most likely (a likelier token of its text: that one's logprob)
        assert top[token] >= value and (3 <= len(top) <= 4 or "\ufffd" in top)
    streamed, streamed_offsets = [], []
    payload = {"model": "tiny", **body, "stream": True}
    async with client.stream("POST", "/v1/completions", json=payload) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                for part in json.loads(line.removeprefix("data: "))["choices"]:
                    streamed += part["logprobs"]["token_logprobs"]
                    streamed_offsets += part["logprobs"]["text_offset"]
    assert streamed == logprobs["token_logprobs"] and streamed_offsets == offsets
    both = (await complete(client, **body, n=2)).json()["choices"]  # n choices, one prompt
    assert [c["logprobs"]["token_logprobs"][: len(ids)] for c in both] == [
        logprobs["token_logprobs"][: len(ids)]
    ] * 2


def test_a_prompt_stopped_before_it_was_scored_is_not_echoed_in_half() -> None:
    """Echo with logprobs (or prompt_logprobs) of a request the stopping engine ended before
    its prompt was scored: a 503 to retry, not a half-scored prompt (nor a 500)."""
    from server.engine.inputs import ModelInputs
    from server.engine.sampling import SamplingParams, TokenLogprobs
    from server.engine.sequence import Sequence
    from server.exceptions import EngineStopped
    from server.pipelines.logprobs import TokenTexts

    inputs = ModelInputs(tensors={}, num_prompt_tokens=4, num_image_tokens=0)
    inputs.token_ids = [1, 2, 3, 4]  # cached_property: settable
    seq = Sequence("s", inputs, SamplingParams(prompt_logprobs=0), 4)
    seq.prompt_logprobs = [TokenLogprobs.of(-1.0, ())]  # 1 of the 3 scored tokens
    for shown in (TokenTexts(None).prompt, TokenTexts(None).prompt_logprobs):
        with pytest.raises(EngineStopped):
            shown(seq)


async def test_n_choices_echo_one_scoring_of_the_prompt(client: httpx.AsyncClient) -> None:
    """Echo with logprobs and n choices: the first choice scores the prompt, the others show
    the same scores and take the prompt from the prefix cache instead of computing it again."""
    blocks = client.app.state.services.engine.scheduler.blocks  # type: ignore[attr-defined]
    prompt = "The quick brown fox jumps over the lazy dog near the water. " * 3
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0.7, "seed": 1, "echo": True}
    alone = (await complete(client, **body, logprobs=1)).json()["choices"][0]["logprobs"]
    hits = blocks.num_hit_tokens
    response = await complete(client, **body, logprobs=1, n=3)
    assert response.status_code == 200, response.text
    num_prompt = response.json()["usage"]["prompt_tokens"]
    for choice in response.json()["choices"]:
        logprobs = choice["logprobs"]
        assert logprobs["token_logprobs"][:num_prompt] == alone["token_logprobs"][:num_prompt]
        assert logprobs["top_logprobs"][:num_prompt] == alone["top_logprobs"][:num_prompt]
    block = blocks.block_size
    assert blocks.num_hit_tokens - hits >= 2 * ((num_prompt - 1) // block) * block
