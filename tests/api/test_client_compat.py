"""What real clients send: the current OpenAI SDK's fields, vLLM's extra_body parameters,
Responses-style content parts, explicit nulls, curl's form Content-Type. Each is accepted (and
honoured where it means something) or refused by name; truly unknown fields stay a 400."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.test_errors import assert_error
from tests.helpers import data_uri, make_image, make_settings, start_client

pytestmark = pytest.mark.anyio

URL = "/v1/chat/completions"


def chat(content: str | list = "Hi", **extra: object) -> dict:
    messages = [{"role": "user", "content": content}]
    return {"model": "tiny", "messages": messages, "max_tokens": 4, **extra}


async def ok(client: httpx.AsyncClient, body: dict, url: str = URL) -> dict:
    response = await client.post(url, json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def sse(client: httpx.AsyncClient, body: dict, url: str = URL) -> list[dict]:
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


# The OpenAI SDK's chat.completions.create fields with no effect here (sent as the SDK does).
SDK_FIELDS = {
    "prompt_cache_key": "user-42",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"mode": "implicit"},
    "safety_identifier": "hash-of-user",
    "verbosity": "low",
    "moderation": None,
    "web_search_options": None,
    "store": True,
    "reasoning_effort": "high",
    "service_tier": "auto",
    # vLLM's
    "priority": 0,  # (non-zero: test_priority.py)
    "request_id": "client-id-1",
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "add_generation_prompt": True,
}


async def test_sdk_fields_are_accepted(client: httpx.AsyncClient) -> None:
    await ok(client, chat(**SDK_FIELDS))
    options = {"include_usage": True, "include_obfuscation": False}
    chunks = await sse(client, chat(**SDK_FIELDS, stream_options=options))
    assert chunks[-1]["usage"]["total_tokens"] > 0


async def test_chat_metadata_within_openais_bounds(client: httpx.AsyncClient) -> None:
    """Ignored, but bounded as OpenAI bounds it (two million pairs were read and taken)."""
    await ok(client, chat(metadata={f"k{n}": "v" for n in range(16)}))
    for metadata in (
        {f"k{n}": "v" for n in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
    ):
        response = await client.post("/v1/chat/completions", json=chat(metadata=metadata))
        error = assert_error(response, 400, "metadata")
        assert "at most 16 pairs" in error["message"], error


async def test_the_openai_sdk_with_its_current_fields(client: httpx.AsyncClient) -> None:
    """chat.completions.create's own keyword arguments, typed as the SDK types them, and
    vLLM's extra_body parameters, as clients pass them."""
    sdk = openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )
    stream = await sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        prompt_cache_key="k",
        prompt_cache_retention="in_memory",
        safety_identifier="s",
        verbosity="medium",
        moderation=None,
        store=True,
        reasoning_effort="minimal",
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
        # ignore_eos: a random model may end before max_tokens
        extra_body={
            "chat_template_kwargs": {"enable_thinking": False},
            "priority": 0,
            "ignore_eos": True,
        },
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    answer = await sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Yes or no?"}],
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert answer.choices[0].message.content in ("yes", "no")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("moderation", {"model": "omni-moderation-latest"}),
        ("web_search_options", {}),
    ],
)
async def test_fields_that_would_change_the_answer_are_refused_by_name(
    client: httpx.AsyncClient, field: str, value: object
) -> None:
    response = await client.post(URL, json=chat(**{field: value}))
    error = assert_error(response, 400, field)
    assert error["code"] in ("unsupported_parameter", "unknown_parameter")


async def test_the_legacy_functions_fields_say_what_to_send_instead(
    client: httpx.AsyncClient,
) -> None:
    """OpenAI's deprecated `functions` / `function_call`: refused by name, and the message says
    they are `tools` / `tool_choice` here."""
    function = {"name": "f", "parameters": {"type": "object"}}
    for field, value, instead in (
        ("functions", [function], "`tools`"),
        ("function_call", "auto", "`tool_choice`"),
    ):
        error = assert_error(await client.post(URL, json=chat(**{field: value})), 400, field)
        assert error["code"] == "unsupported_parameter" and instead in error["message"], error
        assert "yet" not in error["message"]
    # ...and their messages: an assistant's function_call, a function role's result
    call = {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}
    result = {"role": "function", "name": "f", "content": "42"}
    for message, instead in ((call, "tool_calls"), (result, "role 'tool'")):
        messages = [{"role": "user", "content": "Hi"}, message]
        error = assert_error(await client.post(URL, json=chat(messages=messages)), 400)
        assert error["param"].startswith("messages[1]") and instead in error["message"], error


async def test_explicit_nulls_are_the_defaults(client: httpx.AsyncClient) -> None:
    body = chat(stream=None, n=None, logprobs=None, temperature=None, stream_options=None)
    assert (await ok(client, body))["object"] == "chat.completion"
    completion = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "stream": None, "echo": None}
    assert (await ok(client, completion, "/v1/completions"))["object"] == "text_completion"


async def test_azure_openai_and_groq_clients_reach_the_routes(tiny_model_dir: Path) -> None:
    """Azure OpenAI's SDK calls /openai/deployments/{deployment}/chat/completions?api-version=
    with its key as api-key (the deployment: a served model's name); its v1 path, and Groq's
    SDK, call /openai/v1/...: each is the /v1 route (each was a 401, then a 404)."""
    settings = make_settings(tiny_model_dir, api_keys=["sk-azure"])
    async for client in start_client(settings):
        azure = openai.AsyncAzureOpenAI(
            azure_endpoint="http://testserver",
            api_version="2024-10-21",
            api_key="sk-azure",
            http_client=client,
            max_retries=0,
        )
        messages = [{"role": "user", "content": "Hi"}]
        answer = await azure.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        assert answer.object == "chat.completion" and answer.model == "tiny"
        stream = await azure.chat.completions.create(
            model="tiny", messages=messages, max_tokens=2, stream=True
        )
        assert [chunk async for chunk in stream]
        v1 = openai.AsyncOpenAI(
            base_url="http://testserver/openai/v1/", api_key="sk-azure", http_client=client
        )
        assert "tiny" in [m.id async for m in v1.models.list()]
        response = await client.post(
            "/openai/deployments/tiny/chat/completions?api-version=2024-10-21",
            json={"messages": messages, "max_tokens": 2, "model": "tiny"},
            headers={"api-key": "wrong"},
        )
        assert response.status_code == 401
        missing = await client.get(
            "/openai/deployments/tiny/nothing", headers={"api-key": "sk-azure"}
        )
        assert missing.status_code == 404


async def test_hosted_apis_json_modes_with_a_schema_follow_it(client: httpx.AsyncClient) -> None:
    """Hugging Face's InferenceClient sends {"type": "json", "value": schema} (its docs) and
    rewrites OpenAI's json_schema to {"type": "json_object", "value": schema}; Together and
    Fireworks document {"type": "json_object", "schema": schema}: each is that schema (they
    were 400s), not strict; json without a schema is json_object."""
    schema = {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["code"],
        "additionalProperties": False,
    }
    for response_format in (
        {"type": "json", "value": schema},
        {"type": "json_object", "value": schema},
        {"type": "json_object", "schema": schema},
    ):
        body = chat(max_tokens=40, seed=1, response_format=response_format)
        answer = json.loads((await ok(client, body))["choices"][0]["message"]["content"])
        assert set(answer) == {"code"} and re.fullmatch("[A-Z]{3}", answer["code"]), answer
    plain = chat(max_tokens=20, seed=1, response_format={"type": "json"})
    assert (await ok(client, plain))["choices"][0]["message"]["content"].startswith("{")
    # TGI's (and InferenceClient's) regex, Fireworks' grammar: vLLM's guided_regex, _grammar
    regex = chat(max_tokens=10, seed=1, response_format={"type": "regex", "value": "[a-c]{4}"})
    assert re.fullmatch("[a-c]{4}", (await ok(client, regex))["choices"][0]["message"]["content"])
    grammar = {"type": "grammar", "grammar": 'root ::= "yes" | "no"'}
    answer = await ok(client, chat(max_tokens=10, seed=1, response_format=grammar))
    assert answer["choices"][0]["message"]["content"] in ("yes", "no")
    for bad in (
        {"type": "regex"},
        {"type": "grammar", "grammar": ""},
        {"type": "text", "value": "x"},
    ):
        assert_error(await client.post(URL, json=chat(response_format=bad)), 400)
    # a bare schema as json_schema (Dify passes the one its user typed so)
    bare = chat(
        max_tokens=40, seed=1, response_format={"type": "json_schema", "json_schema": schema}
    )
    answer = json.loads((await ok(client, bare))["choices"][0]["message"]["content"])
    assert set(answer) == {"code"}, answer
    both = {"type": "json_object", "value": schema, "schema": schema}
    assert_error(await client.post(URL, json=chat(response_format=both)), 400)
    not_a_schema = {"type": "json_object", "schema": "object"}
    assert_error(await client.post(URL, json=chat(response_format=not_a_schema)), 400)


async def test_an_integer_logprobs_is_how_many_top_logprobs(client: httpx.AsyncClient) -> None:
    """Together and Fireworks document chat's logprobs as an integer k, the k likeliest tokens
    at each step: logprobs true with top_logprobs k (0: none, as false)."""
    for k, top in ((1, 1), (3, 3)):
        choice = (await ok(client, chat(logprobs=k)))["choices"][0]
        assert all(len(entry["top_logprobs"]) == top for entry in choice["logprobs"]["content"])
    assert (await ok(client, chat(logprobs=0)))["choices"][0]["logprobs"] is None
    explicit = (await ok(client, chat(logprobs=2, top_logprobs=1)))["choices"][0]
    assert all(len(entry["top_logprobs"]) == 1 for entry in explicit["logprobs"]["content"])
    assert_error(await client.post(URL, json=chat(logprobs=21)), 400, "logprobs")
    assert_error(await client.post(URL, json=chat(logprobs=-1)), 400, "logprobs")


async def test_hosted_apis_own_chat_fields_are_read(client: httpx.AsyncClient) -> None:
    """Fields hosted APIs document, which their SDKs and the apps written for them send (each
    was a 400): OpenRouter's routing hints change nothing; Mistral's random_seed is seed, its
    tool_choice "any" is "required", safe_prompt false its default; Groq's reasoning_format
    and reasoning_effort "default"; Fireworks' prompt_truncate_len, context_length_exceeded_
    behavior "error". What they would do that is not done here is a 400 naming the field."""
    hints = {"models": ["a", "b"], "provider": {"order": ["x"]}, "route": "fallback"}
    hints |= {"transforms": ["middle-out"], "usage": {"include": True}}
    assert (await ok(client, chat(**hints)))["object"] == "chat.completion"
    sampled = {"temperature": 1.0, "max_tokens": 8}
    seeded = (await ok(client, chat(seed=5, **sampled)))["choices"][0]["message"]["content"]
    mistral = await ok(client, chat(random_seed=5, safe_prompt=False, **sampled))
    assert mistral["choices"][0]["message"]["content"] == seeded
    tool = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
    forced = await ok(client, chat(tools=[tool], tool_choice="any", max_tokens=30))
    assert forced["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "now"
    for fields in (
        {"reasoning_format": "parsed"},
        {"reasoning_format": "hidden"},
        {"reasoning_effort": "default"},
        {"context_length_exceeded_behavior": "error"},
    ):
        assert (await ok(client, chat(**fields)))["object"] == "chat.completion", fields
    for off in ({"enable_search": False}, {"web_search": False}):  # (Dify's, DashScope's)
        assert (await ok(client, chat(**off)))["object"] == "chat.completion", off
    cut = await ok(client, chat("one two three four five six seven", prompt_truncate_len=5))
    assert cut["usage"]["prompt_tokens"] == 5
    for field, value in (
        ("safe_prompt", True),
        ("reasoning_format", "raw"),
        ("context_length_exceeded_behavior", "truncate"),
        ("enable_search", True),
        ("web_search", True),
    ):
        assert_error(await client.post(URL, json=chat(**{field: value})), 400, field)


async def test_a_null_image_detail_is_auto(client: httpx.AsyncClient) -> None:
    """async-openai (to 0.33) writes an image without a detail as "detail": null, in chat and
    in the Responses API: the default, as for every optional field."""
    image = data_uri(make_image(seed=2))
    parts = [{"type": "image_url", "image_url": {"url": image, "detail": None}}]
    body = chat(messages=[{"role": "user", "content": parts}])
    auto = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": image}]}])
    tokens = [(await ok(client, b))["usage"]["prompt_tokens"] for b in (body, auto)]
    assert tokens[0] == tokens[1]
    counted = []
    for part in (
        {"type": "input_image", "image_url": image, "detail": None},
        {"type": "input_image", "image_url": image},
    ):
        responses = {"model": "tiny", "max_output_tokens": 16}
        responses["input"] = [{"role": "user", "content": [part]}]
        counted.append((await ok(client, responses, "/v1/responses"))["usage"]["input_tokens"])
    assert counted[0] == counted[1], counted


async def test_continuous_usage_stats(client: httpx.AsyncClient) -> None:
    """vLLM's: with include_usage, every chunk carries the usage so far."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = chat(max_tokens=5, ignore_eos=True, stream_options=options)
    chunks = await sse(client, body)
    assert all(chunk.get("usage") for chunk in chunks)
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == 5
    assert chunks[-1]["choices"] == []
    completion = {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "ignore_eos": True}
    chunks = await sse(client, {**completion, "stream_options": options}, "/v1/completions")
    assert all(chunk.get("usage") for chunk in chunks)
    # Without it, only the final chunk has usage, as before.
    chunks = await sse(client, chat(stream_options={"include_usage": True}))
    assert [bool(c.get("usage")) for c in chunks].count(True) == 1
    # continuous_usage_stats alone asks for usage (vLLM's include_usage defaults to true);
    # include_usage false turns it off, and `{}` asks for none (OpenAI's).
    chunks = await sse(client, chat(stream_options={"continuous_usage_stats": True}))
    assert all(chunk.get("usage") for chunk in chunks)
    off = {"continuous_usage_stats": True, "include_usage": False}
    for options in (off, {}):
        chunks = await sse(client, chat(stream_options=options))
        assert not any(chunk.get("usage") for chunk in chunks)


@pytest.mark.parametrize("path", [URL, "/v1/completions"])
async def test_continuous_usage_stats_count_the_chunks_choice(
    client: httpx.AsyncClient, path: str
) -> None:
    """As vLLM counts them: a chunk's usage is its own choice's tokens so far (each of n=2
    choices reaches 4); the final usage chunk sums the choices."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    common = {"max_tokens": 4, "ignore_eos": True, "n": 2, "stream_options": options}
    body = chat(**common) if path == URL else {"model": "tiny", "prompt": "Hi", **common}
    chunks = await sse(client, body, path)
    per_choice: dict[int, list[int]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        per_choice[chunk["choices"][0]["index"]].append(chunk["usage"]["completion_tokens"])
    assert all(c == sorted(c) and c[-1] == 4 for c in per_choice.values()), per_choice
    if path == URL:  # each choice's role chunk comes before its first token
        assert [c[0] for c in per_choice.values()] == [0, 0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("path", [URL, "/v1/completions"])
async def test_continuous_usage_counts_what_the_stream_has_sent(
    client: httpx.AsyncClient, path: str
) -> None:
    """Never a token ahead of the chunks (the engine may hold a choice's next token while its
    chunk is written): with several streams at once, each chunk's usage is the ids its
    choice's chunks have carried, that chunk's included."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    common = {"max_tokens": 16, "n": 3, "return_token_ids": True, "stream_options": options}
    common |= {"temperature": 1.0, "ignore_eos": True}
    bodies = [
        (chat(seed=seed, **common) if path == URL else {"model": "tiny", "prompt": "Hi", **common})
        | {"seed": seed}
        for seed in range(4)
    ]
    for chunks in await asyncio.gather(*(sse(client, body, path) for body in bodies)):
        sent: dict[int, int] = {0: 0, 1: 0, 2: 0}
        for chunk in chunks[:-1]:
            (choice,) = chunk["choices"]
            sent[choice["index"]] += len(choice.get("token_ids") or [])
            assert chunk["usage"]["completion_tokens"] == sent[choice["index"]], chunk
        assert chunks[-1]["usage"]["completion_tokens"] == sum(sent.values()) == 48


async def test_param_has_no_class_names(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, json=chat(tool_choice={"type": "function"}))
    assert_error(response, 400, "tool_choice.function", "missing_required_parameter")


async def test_json_body_with_curls_form_content_type(client: httpx.AsyncClient) -> None:
    """curl -d sends application/x-www-form-urlencoded: the body is read as JSON anyway."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    response = await client.post(URL, content=json.dumps(chat()), headers=form)
    assert response.status_code == 200, response.text
    response = await client.post(URL, content=b"model=tiny&messages=hi", headers=form)
    assert_error(response, 400, None, "invalid_json")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_a_browsers_simple_post_is_not_read_as_json(
    client: httpx.AsyncClient, content_type: str
) -> None:
    """A cross-site page may post text/plain or a form without a CORS preflight: with an Origin
    (a browser), such a body is not read as JSON, so no page can drive a server without keys
    (chat, or a media job that would send the answer to the page's webhook)."""
    headers = {"content-type": content_type, "origin": "https://evil.example"}
    jobs_before = (await client.get("/v2/media/jobs")).json()["data"]
    for url, body in (
        (URL, chat()),
        ("/v2/media/completions", {**chat(), "async": True}),
    ):
        response = await client.post(url, content=json.dumps(body), headers=headers)
        error = assert_error(response, 415, None, "unsupported_media_type")
        assert "Content-Type: application/json" in error["message"]  # what to do instead
    assert (await client.get("/v2/media/jobs")).json()["data"] == jobs_before


async def test_responses_style_and_history_parts(client: httpx.AsyncClient) -> None:
    """input_text / input_image (as vLLM's parser reads them), detail "original" (as high),
    and refusal / output_text parts in the assistant's history: the same prompt as the plain
    parts."""
    url = data_uri(make_image(320, 240))

    def conversation(image: dict, said: list[dict], question: dict) -> dict:
        return {
            "model": "tiny",
            "max_tokens": 2,
            "messages": [
                {"role": "user", "content": [image, question]},
                {"role": "assistant", "content": said},
                {"role": "user", "content": "And now?"},
            ],
        }

    plain = conversation(
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
        [{"type": "text", "text": "No."}, {"type": "text", "text": "Sorry."}],
        {"type": "text", "text": "What is it?"},
    )
    responses_style = conversation(
        {"type": "input_image", "image_url": url, "detail": "original"},
        [{"type": "refusal", "refusal": "No."}, {"type": "output_text", "text": "Sorry."}],
        {"type": "input_text", "text": "What is it?"},
    )
    expected = (await ok(client, plain))["usage"]
    assert (await ok(client, responses_style))["usage"]["prompt_tokens"] == expected[
        "prompt_tokens"
    ]


async def test_dashscopes_high_resolution_switch_reads_auto_images_as_high(
    client: httpx.AsyncClient,
) -> None:
    """DashScope's vl_high_resolution_images: true: an image without a detail (or auto) gets
    the model's full budget, as detail high; an explicit detail is kept."""
    url = data_uri(make_image(1600, 1200))  # (past auto's budget of 1,280 tokens)

    async def image_tokens(image_url: dict, **extra: object) -> int:
        part = {"type": "image_url", "image_url": {"url": url, **image_url}}
        answer = await ok(client, {**chat([part]), **extra})
        return answer["usage"]["prompt_tokens_details"]["image_tokens"]

    low, high = await image_tokens({"detail": "low"}), await image_tokens({"detail": "high"})
    assert low < await image_tokens({}) < high
    switch = {"vl_high_resolution_images": True}
    assert await image_tokens({}, **switch) == await image_tokens({"detail": "auto"}, **switch)
    assert await image_tokens({}, **switch) == high
    assert await image_tokens({"detail": "low"}, **switch) == low
    off = await image_tokens({}, vl_high_resolution_images=False)
    assert off == await image_tokens({})


async def test_vllms_short_media_parts_without_a_type(client: httpx.AsyncClient) -> None:
    """{"image_url": URL} typed by its key, as vLLM's parser does: the typed part's prompt; a
    part with no type and no media key (or two) is still named as having no type."""
    url = data_uri(make_image(64, 64))
    typed = await ok(client, chat([{"type": "image_url", "image_url": url}]))
    short = await ok(client, chat([{"image_url": url}]))
    assert short["usage"]["prompt_tokens"] == typed["usage"]["prompt_tokens"]
    beside = await ok(client, chat([{"image_url": url, "text": "ignored, as vLLM's parser"}]))
    assert beside["usage"]["prompt_tokens"] == typed["usage"]["prompt_tokens"]
    for part in (
        {"file": url},
        {"image_url": url, "video_url": url},
        {"image": url, "text": "x"},
        {"text": "what is this?", "url": url},  # (DashScope's text item holds only its text)
        {"text": "x", "audio": url},
    ):
        response = await client.post(URL, json=chat([part]))
        assert_error(response, 400, "messages[0].content[0]", "invalid_value")
        assert "has no `type`" in response.json()["error"]["message"], part


async def test_dashscopes_image_and_text_items(client: httpx.AsyncClient) -> None:
    """DashScope's and qwen-vl-utils' content items, {"type": "image", "image": URL} and
    DashScope's untyped {"image": URL} / {"text": ...} (its native API's, Qwen-Agent's
    Message.model_dump): read as the image_url and text parts they mean, pixel options too."""
    url = data_uri(make_image(640, 480))  # (392 tokens: more than detail low's 256)
    question = {"type": "text", "text": "What is it?"}
    typed = await ok(client, chat([{"type": "image_url", "image_url": url}, question]))
    for image, text in (
        ({"type": "image", "image": url}, question),
        ({"image": url}, {"text": "What is it?"}),
    ):
        same = await ok(client, chat([image, text]))
        assert same["usage"]["prompt_tokens"] == typed["usage"]["prompt_tokens"]
        details = same["usage"]["prompt_tokens_details"]
        assert details["image_tokens"] == typed["usage"]["prompt_tokens_details"]["image_tokens"]
    for small in (
        {"type": "image", "image": url, "max_pixels": 28 * 28 * 4},
        {"image": url, "max_pixels": 28 * 28 * 4},
        {"type": "image", "image": url, "detail": "low"},
    ):
        fewer = await ok(client, chat([small, question]))
        details = fewer["usage"]["prompt_tokens_details"]
        typed_tokens = typed["usage"]["prompt_tokens_details"]["image_tokens"]
        assert details["image_tokens"] < typed_tokens, small
    for bad in ({"type": "image", "image": 3}, {"type": "image"}):
        response = await client.post(URL, json=chat([bad, question]))
        assert_error(response, 400)
        assert response.json()["error"]["param"].startswith("messages[0].content[0]")


async def test_chat_template_kwargs(client: httpx.AsyncClient) -> None:
    """Passed to the template when it reads them (Qwen's read add_vision_id); others are
    harmless."""
    content = [{"type": "image_url", "image_url": data_uri(make_image(64, 64))}]
    base = (await ok(client, chat(content)))["usage"]["prompt_tokens"]
    kwargs = {"add_vision_id": True, "not_in_the_template": 1, "messages": []}
    labelled = (await ok(client, chat(content, chat_template_kwargs=kwargs)))["usage"]
    assert labelled["prompt_tokens"] > base  # "Picture 1: "


async def test_add_generation_prompt_and_continue_final_message(client) -> None:
    base = (await ok(client, chat()))["usage"]["prompt_tokens"]
    bare = (await ok(client, chat(add_generation_prompt=False)))["usage"]["prompt_tokens"]
    assert bare < base  # no "<|im_start|>assistant\n"
    prefill = {
        "model": "tiny",
        "max_tokens": 2,
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ],
    }
    continued = (await ok(client, {**prefill, "continue_final_message": True}))["usage"]
    closed = (await ok(client, prefill))["usage"]
    no_turn = (await ok(client, {**prefill, "add_generation_prompt": False}))["usage"]
    # the prefill stays open: no new assistant turn after it, and no "<|im_end|>\n" either
    assert continued["prompt_tokens"] < no_turn["prompt_tokens"] < closed["prompt_tokens"]
    both = {**prefill, "continue_final_message": True, "add_generation_prompt": True}
    assert_error(await client.post(URL, json=both), 400, None, "invalid_value")
    not_assistant = chat(continue_final_message=True)
    assert_error(await client.post(URL, json=not_assistant), 400, None, "invalid_value")


GUIDED = {
    "guided_choice": (["yes", "no", 'say "maybe"'], lambda t: t in ("yes", "no", 'say "maybe"')),
    "guided_regex": ("[ab]{3}", lambda t: re.fullmatch("[ab]{3}", t)),
    "guided_json": (
        {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]},
        lambda t: json.loads(t)["a"] in ("x", "y"),
    ),
    "guided_grammar": ('root ::= "x" ("y" | "z")', lambda t: t in ("xy", "xz")),
}


@pytest.mark.parametrize("field", GUIDED)
async def test_vllm_guided_decoding(client: httpx.AsyncClient, field: str) -> None:
    """Onto the structured-output grammar: the answer is exactly the constrained text, from
    a random-weight model too (guided_choice: the plain choice, as vLLM answers)."""
    value, check = GUIDED[field]
    for body in (chat(**{field: value}), chat(structured_outputs={field[7:]: value})):
        body["max_tokens"] = 30
        text = (await ok(client, body))["choices"][0]["message"]["content"]
        assert check(text), text


async def test_lark_grammars(client: httpx.AsyncClient) -> None:
    """A grammar without `::=` is Lark's syntax (vLLM's older docs' form, with `start`),
    read as vLLM reads it: terminals, regular expressions, repetition, common imports."""
    lark = (
        '// a list of lower-case names\n?start: "names: " NAME (", " NAME)*\nNAME: /[a-z]{1,6}/\n'
    )
    text_body = {"model": "tiny", "prompt": "Hi", "guided_grammar": lark}
    for body in (chat(guided_grammar=lark), text_body):
        path = URL if "messages" in body else "/v1/completions"
        body["max_tokens"] = 40
        answer = (await ok(client, body, path))["choices"][0]
        text = answer["message"]["content"] if "message" in answer else answer["text"]
        assert re.fullmatch(r"names: [a-z]{1,6}(, [a-z]{1,6})*", text) or (
            answer["finish_reason"] == "length" and text.startswith("names: ")
        ), text
    bad = await client.post(URL, json=chat(guided_grammar="start: undefined_rule"))
    error = assert_error(bad, 400, "guided_grammar", "invalid_schema")
    assert "undefined_rule" in error["message"]


async def test_guided_decoding_refusals(client: httpx.AsyncClient) -> None:
    two = chat(guided_regex="a+", response_format={"type": "json_object"})
    assert_error(await client.post(URL, json=two), 400, None, "invalid_value")
    two = chat(structured_outputs={"regex": "a", "choice": ["b"]})
    assert_error(await client.post(URL, json=two), 400, "structured_outputs", "invalid_value")
    bad = await client.post(URL, json=chat(guided_regex="(unclosed"))
    assert_error(bad, 400, "guided_regex", "invalid_schema")
    bad = await client.post(URL, json=chat(guided_json="{not json"))
    assert_error(bad, 400, "guided_json", "invalid_schema")


async def test_cors_is_opt_in(client: httpx.AsyncClient, tiny_model_dir: Path) -> None:
    """A browser's preflight: refused by default (a web page cannot drive a local server);
    with --allowed-origins, answered for those origins, before the API key is checked."""
    preflight = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    response = await client.options(URL, headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    settings = make_settings(tiny_model_dir, allowed_origins=["http://app.example"], api_keys=["k"])
    async for cors in start_client(settings):
        response = await cors.options(URL, headers=preflight)
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        headers = {"Origin": "http://app.example", "Authorization": "Bearer k"}
        response = await cors.post(URL, json=chat(), headers=headers)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        other = await cors.options(URL, headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert other.status_code == 400  # in the API's envelope, naming the flag
        assert other.headers["content-type"] == "application/json"
        assert "--allowed-origins" in other.json()["error"]["message"]


async def test_stored_chat_completions_and_model_deletion_as_the_sdk_calls_them(
    client: httpx.AsyncClient,
) -> None:
    """The SDK's stored-completions calls (OpenAI keeps a chat completion sent with store:
    true): none is kept here, so the list is empty and an id is a coded 404 saying why;
    deleting the served model is a 403 (both were bare 404s and 405s)."""
    sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    page = await sdk.chat.completions.list(limit=5)
    assert page.data == [] and not page.has_more
    calls = (
        sdk.chat.completions.retrieve("chatcmpl-1"),
        sdk.chat.completions.update("chatcmpl-1", metadata={"a": "b"}),
        sdk.chat.completions.delete("chatcmpl-1"),
        sdk.chat.completions.messages.list("chatcmpl-1"),
    )
    for call in calls:
        with pytest.raises(openai.NotFoundError) as caught:
            await call
        assert caught.value.code == "chat_completion_not_found"
        assert "does not store" in caught.value.message
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await sdk.models.delete("tiny")
    assert denied.value.code == "model_not_deletable"
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.models.delete("other")
    assert missing.value.code == "model_not_found"


async def test_audio_parts_and_custom_tools_are_unsupported_not_invalid(
    client: httpx.AsyncClient,
) -> None:
    """OpenAI's audio parts and custom tools are kinds this server knows and does not serve:
    unsupported_parameter saying so (they were invalid_value, listing the part types)."""
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    custom = {"type": "custom", "custom": {"name": "grep"}}
    for path, body, param in (
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [audio]}]},
            "messages[0].content[0]",
        ),
        ("/v1/responses", {"input": [{"role": "user", "content": [audio]}]}, "input[0].content[0]"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "tools": [custom]},
            "tools[0].type",
        ),
    ):
        response = await client.post(path, json={"model": "tiny", **body})
        error = assert_error(response, 400, param, "unsupported_parameter")
        assert "not supported" in error["message"], error
    # hosted tools on chat (Dify's web search, OpenAI's): said so, not "should be 'function'"
    for kind in ("web_search", "web_search_preview", "file_search", "code_interpreter"):
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": kind}]}
        response = await client.post("/v1/chat/completions", json={"model": "tiny", **body})
        error = assert_error(response, 400, "tools[0].type", "unsupported_parameter")
        assert f"{kind} tool is a hosted tool" in error["message"], error
    for odd in ({"a": 1}, ["web_search"], 3):  # (any JSON there: a 400, never a 500)
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": odd}]}
        response = await client.post("/v1/chat/completions", json={"model": "tiny", **body})
        assert_error(response, 400, "tools[0].type")
