"""vLLM's request fields beyond OpenAI's, as vLLM clients send them to chat and text
completions: prompt_logprobs, return_token_ids, echo without generation, structured output
on /v1/completions, truncate_prompt_tokens, mm_processor_kwargs / media_io_kwargs, the model
left out, and the fields accepted at their neutral values or refused by name."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from tests.api.test_errors import assert_error
from tests.helpers import data_uri, make_image, make_video

pytestmark = pytest.mark.anyio
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def chat(content: object = "Say something.", **extra: object) -> dict:
    messages = [{"role": "user", "content": content}]
    return {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0, **extra}


def text_body(**extra: object) -> dict:
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **extra}


async def events(client: httpx.AsyncClient, path: str, body: dict) -> list[dict]:
    async with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        return [
            json.loads(line[6:])
            async for line in response.aiter_lines()
            if line.startswith("data: {")
        ]


async def test_null_max_tokens_on_completions_is_the_default_16(client: httpx.AsyncClient):
    body = text_body(max_tokens=None, ignore_eos=True)
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 16


async def test_the_model_may_be_left_out(client: httpx.AsyncClient) -> None:
    """vLLM answers with the served model (its first name) when a body names none; Animus'
    routes require it."""
    served = (await client.get("/v1/models")).json()["data"][0]["id"]
    for path, body in (("/v1/chat/completions", chat()), ("/v1/completions", text_body())):
        del body["model"]
        response = await client.post(path, json=body)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == served
    media = chat()
    del media["model"]
    assert_error(await client.post("/v2/media/completions", json=media), 400, "model")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_vllm_fields_at_their_neutral_values_are_accepted(
    client: httpx.AsyncClient, path: str
) -> None:
    neutral = {
        "use_beam_search": False,
        "length_penalty": 1.0,
        "add_special_tokens": "chat" not in path,  # vLLM's defaults (Qwen's add none)
        "request_id": "client-1",
        "session_id": "s-1",
        "stream_interval": 4,
        "return_token_offsets": False,
        "vllm_xargs": None,
        "kv_transfer_params": None,
        "watermarking": False,
        "guided_decoding_backend": "xgrammar",
        "routed_experts_prompt_start": 0,
    }
    body = chat(**neutral) if "chat" in path else text_body(**neutral)
    if "chat" in path:
        body |= {"echo": False, "documents": [], "include_reasoning": True, "early_stopping": False}
        body |= {"best_of": 1}
    response = await client.post(path, json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_beam_search", True),
        ("logprob_token_ids", [1, 2]),
        ("watermarking", True),
        ("kv_transfer_params", {"do_remote_prefill": True}),
        ("repetition_detection", {"max_pattern_size": 4}),
        ("guided_whitespace_pattern", r"[ ]?"),
        ("structural_tag", {"type": "structural_tag"}),
    ],
)
async def test_vllm_fields_asking_for_what_is_not_here_are_refused_by_name(
    client: httpx.AsyncClient, field: str, value: object
) -> None:
    for path, body in (("/v1/chat/completions", chat()), ("/v1/completions", text_body())):
        response = await client.post(path, json={**body, field: value})
        assert_error(response, 400, field, "unsupported_parameter")


async def test_chat_only_vllm_fields_refused_when_set(client: httpx.AsyncClient) -> None:
    for field, value in (
        ("echo", True),
        ("documents", [{"title": "t", "text": "x"}]),
        ("chat_template", "{{ messages }}"),
        ("logits_processors", ["x"]),
        ("return_prompt_text", True),
        ("best_of", 2),
    ):
        response = await client.post("/v1/chat/completions", json=chat(**{field: value}))
        assert_error(response, 400, field, "unsupported_parameter")
    pattern = {"json": {"type": "object"}, "whitespace_pattern": " "}
    response = await client.post("/v1/chat/completions", json=chat(structured_outputs=pattern))
    assert_error(response, 400, "structured_outputs.whitespace_pattern", "unsupported_parameter")
    accepted = {"choice": ["yes", "no"], "disable_any_whitespace": True, "backend": "xgrammar"}
    response = await client.post("/v1/chat/completions", json=chat(structured_outputs=accepted))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] in ("yes", "no")


async def test_prompt_logprobs(client: httpx.AsyncClient, tokenizer) -> None:
    """Each prompt token's logprob, rank and the k most likely tokens there (vLLM's shape:
    null for the first token); the values are echo's, and the route's stream refuses them."""
    response = await client.post("/v1/completions", json=text_body(prompt_logprobs=2))
    assert response.status_code == 200, response.text
    body = response.json()
    (choice,) = body["choices"]
    ids = tokenizer.encode(PROMPT)
    scored = choice["prompt_logprobs"]
    assert len(scored) == len(ids) == body["usage"]["prompt_tokens"] and scored[0] is None
    for token_id, entry in zip(ids[1:], scored[1:], strict=True):
        own = entry[str(token_id)]
        assert own["decoded_token"] == tokenizer.decode([token_id])
        assert own["rank"] >= 1 and 2 <= len(entry) <= 3
        top = sorted(entry.values(), key=lambda e: e["rank"])[:2]
        assert [e["rank"] for e in top if e is not own] == [1, 2][: len(top) - (own in top)]
        assert own["logprob"] <= max(e["logprob"] for e in entry.values())
    echoed = await client.post("/v1/completions", json=text_body(echo=True, logprobs=0))
    shown = echoed.json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)]
    mine = [entry[str(t)]["logprob"] for t, entry in zip(ids[1:], scored[1:], strict=True)]
    assert shown == pytest.approx(mine, abs=1e-5)
    assert "prompt_logprobs" in choice  # and null where not asked for
    plain = await client.post("/v1/completions", json=text_body())
    assert plain.json()["choices"][0]["prompt_logprobs"] is None

    answer = await client.post("/v1/chat/completions", json=chat(prompt_logprobs=1))
    assert answer.status_code == 200, answer.text
    chat_scored = answer.json()["prompt_logprobs"]
    assert len(chat_scored) == answer.json()["usage"]["prompt_tokens"]
    assert chat_scored[0] is None and all(len(e) in (1, 2) for e in chat_scored[1:])
    for path, body in (("/v1/chat/completions", chat()), ("/v1/completions", text_body())):
        streamed = {**body, "prompt_logprobs": 1, "stream": True}
        assert_error(await client.post(path, json=streamed), 400, "prompt_logprobs")


async def test_echo_without_generation_scores_the_prompt(client: httpx.AsyncClient) -> None:
    """echo with max_tokens 0 (what evaluation harnesses send): the prompt and its logprobs
    back, nothing generated, streamed or not."""
    body = text_body(echo=True, max_tokens=0, logprobs=1)
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    usage = response.json()["usage"]
    assert choice["text"] == PROMPT and usage["completion_tokens"] == 0
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == usage["prompt_tokens"]
    assert logprobs["token_logprobs"][0] is None and "".join(logprobs["tokens"]) == PROMPT
    chunks = await events(client, "/v1/completions", body)
    texts = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    tokens = [t for c in chunks if c["choices"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert texts == PROMPT and tokens == logprobs["tokens"]
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    refused = await client.post("/v1/completions", json=text_body(max_tokens=0))
    assert_error(refused, 400, "max_tokens")
    unmet = await client.post("/v1/completions", json={**body, "min_tokens": 2})
    assert_error(unmet, 400, "min_tokens")


async def test_stop_strings_wait_for_min_tokens(client: httpx.AsyncClient) -> None:
    """A stop string in the answer's first min_tokens tokens does not end it (vLLM's rule, as
    for EOS and stop_token_ids)."""
    body = text_body(max_tokens=8, ignore_eos=True)
    (first,) = (await client.post("/v1/completions", json=body)).json()["choices"]
    stop = first["text"][:1]  # found in the first token's text
    stopped = (await client.post("/v1/completions", json={**body, "stop": [stop]})).json()
    assert stopped["usage"]["completion_tokens"] == 1, stopped
    held = await client.post("/v1/completions", json={**body, "stop": [stop], "min_tokens": 5})
    assert held.json()["usage"]["completion_tokens"] >= 6, held.text
    assert first["text"].startswith(held.json()["choices"][0]["text"])


async def test_return_token_ids(client: httpx.AsyncClient, tokenizer) -> None:
    """The prompt's and the answer's ids beside the text, as vLLM sends them: on the answer
    (the prompt's on a stream's first chunk), left out of the body where not asked for."""
    ids = tokenizer.encode(PROMPT)
    body = text_body(return_token_ids=True, max_tokens=6, ignore_eos=True)
    (choice,) = (await client.post("/v1/completions", json=body)).json()["choices"]
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == 6
    assert tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["text"]
    chunks = [c["choices"][0] for c in await events(client, "/v1/completions", body)]
    assert chunks[0]["prompt_token_ids"] == ids
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["token_ids"]] == choice["token_ids"]

    body = chat(return_token_ids=True, max_tokens=6, ignore_eos=True)
    answer = (await client.post("/v1/chat/completions", json=body)).json()
    assert len(answer["prompt_token_ids"]) == answer["usage"]["prompt_tokens"]
    token_ids = answer["choices"][0]["token_ids"]
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    assert text == answer["choices"][0]["message"]["content"]
    chunks = await events(client, "/v1/chat/completions", body)
    assert chunks[0]["prompt_token_ids"] == answer["prompt_token_ids"]
    streamed = [t for c in chunks for choice in c["choices"] for t in choice.get("token_ids", [])]
    assert streamed == token_ids
    plain = (await client.post("/v1/chat/completions", json=chat())).json()
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]


async def test_structured_output_on_completions(client: httpx.AsyncClient) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"enum": [1, 2, 3]}},  # (bounded: the JSON ends in max_tokens)
        "required": ["n"],
        "additionalProperties": False,
    }
    formats = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        "structured_outputs": {"json": schema},
        "guided_json": schema,
    }
    for field, value in formats.items():
        body = text_body(max_tokens=20, **{field: value})
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", (field, choice)
        assert json.loads(choice["text"])["n"] in (1, 2, 3)
    choice = await client.post("/v1/completions", json=text_body(guided_choice=["red", "blue"]))
    assert choice.json()["choices"][0]["text"] in ("red", "blue")
    bad = await client.post("/v1/completions", json=text_body(guided_regex="[^\\s\\S]"))
    assert_error(bad, 400, "guided_regex", "invalid_schema")


async def test_truncate_prompt_tokens(client: httpx.AsyncClient, tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    body = text_body(truncate_prompt_tokens=3, echo=True, return_token_ids=True)
    (choice,) = (await client.post("/v1/completions", json=body)).json()["choices"]
    assert choice["prompt_token_ids"] == ids[-3:]
    assert choice["text"].startswith(tokenizer.decode(ids[-3:]))
    body["truncation_side"] = "right"
    (choice,) = (await client.post("/v1/completions", json=body)).json()["choices"]
    assert choice["prompt_token_ids"] == ids[:3]
    long = text_body(prompt=PROMPT * 1000, truncate_prompt_tokens=-1, max_tokens=4)
    response = await client.post("/v1/completions", json=long)
    assert response.status_code == 200, response.text
    max_model_len = (await client.get("/v1/models")).json()["data"][0]["max_model_len"]
    assert response.json()["usage"]["prompt_tokens"] == max_model_len - 4
    cut_chat = await client.post("/v1/chat/completions", json=chat(truncate_prompt_tokens=5))
    assert cut_chat.json()["usage"]["prompt_tokens"] == 5
    image = [
        {"type": "image_url", "image_url": {"url": data_uri(make_image(64, 64))}},
        {"type": "text", "text": "What is it?"},
    ]
    response = await client.post("/v1/chat/completions", json=chat(image, truncate_prompt_tokens=5))
    assert_error(response, 400, "truncate_prompt_tokens")
    response = await client.post("/v1/completions", json=text_body(truncate_prompt_tokens=0))
    assert_error(response, 400, "truncate_prompt_tokens")
    no_room = text_body(truncate_prompt_tokens=-1, max_tokens=max_model_len)
    response = await client.post("/v1/completions", json=no_room)
    assert_error(response, 400, "max_tokens", "context_length_exceeded")
    # /tokenize counts the prompt the completion would run, cut as it would be
    tokenized = await client.post("/tokenize", json=chat(truncate_prompt_tokens=5))
    assert tokenized.json()["count"] == 5
    # an async media job is checked at submit against the prompt as it will be cut
    job = {**chat("hello " * 9000, truncate_prompt_tokens=100), "async": True}
    accepted = await client.post("/v2/media/completions", json=job)
    assert accepted.status_code == 202, accepted.text
    await client.post(accepted.json()["status_url"] + "/cancel")


async def test_mm_processor_kwargs_set_the_image_resolution(client: httpx.AsyncClient) -> None:
    """max_pixels / min_pixels (or size's longest_edge / shortest_edge) resize an image into
    that range, within the server's; unknown keys are named."""
    image = [
        {"type": "image_url", "image_url": {"url": data_uri(make_image(640, 480))}},
        {"type": "text", "text": "What is it?"},
    ]

    async def image_tokens(**extra: object) -> int:
        response = await client.post("/v1/chat/completions", json=chat(image, **extra))
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["image_tokens"]

    default = await image_tokens()
    small = await image_tokens(mm_processor_kwargs={"max_pixels": 112 * 112})
    large = await image_tokens(mm_processor_kwargs={"min_pixels": 600 * 600})
    same_small = await image_tokens(mm_processor_kwargs={"size": {"longest_edge": 112 * 112}})
    assert small < default < large and same_small == small
    # Qwen's own vLLM examples send the processor's switches on: taken (always so here)
    switched = {"do_resize": True, "max_frames": 8, "do_sample_frames": None}  # (null: absent)
    switched = await image_tokens(mm_processor_kwargs=switched)
    assert switched == default
    for kwargs, param in (
        ({"do_resize": False}, "mm_processor_kwargs.do_resize"),
        ({"do_sample_frames": False}, "mm_processor_kwargs.do_sample_frames"),
        ({"do_sample_frames": "yes"}, "mm_processor_kwargs.do_sample_frames"),
        ({"max_frames": 0}, "mm_processor_kwargs.max_frames"),
        ({"min_frames": 4}, "mm_processor_kwargs.min_frames"),
        ({"max_pixels": -4}, "mm_processor_kwargs.max_pixels"),
        ({"size": {"shortest_edge": 1.5}}, "mm_processor_kwargs.size.shortest_edge"),
        ({"size": {"height": 4}}, "mm_processor_kwargs.size"),
        ({"min_pixels": 200_000, "max_pixels": 100_000}, "mm_processor_kwargs.min_pixels"),
        ({"min_pixels": 10**400}, "mm_processor_kwargs.min_pixels"),  # (no OverflowError)
        ({"fps": 10**400}, "mm_processor_kwargs.fps"),
    ):
        response = await client.post(
            "/v1/chat/completions", json=chat(image, mm_processor_kwargs=kwargs)
        )
        assert_error(response, 400, param)
    response = await client.post(
        "/v1/chat/completions", json=chat(image, media_io_kwargs={"audio": {"x": 1}})
    )
    assert_error(response, 400, "media_io_kwargs.audio")


async def test_media_io_kwargs_num_frames_lowers_the_frames(client: httpx.AsyncClient) -> None:
    uri = "data:video/mp4;base64," + base64.b64encode(make_video(seconds=4)).decode()
    video = [
        {"type": "video_url", "video_url": {"url": uri}},
        {"type": "text", "text": "What happens?"},
    ]

    async def video_tokens(**extra: object) -> int:
        response = await client.post("/v1/chat/completions", json=chat(video, **extra))
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["video_tokens"]

    default = await video_tokens()
    fewer = await video_tokens(media_io_kwargs={"video": {"num_frames": 2}})
    slower = await video_tokens(mm_processor_kwargs={"fps": 0.5})
    assert fewer < default and slower < default
    # the processor's own names (Qwen3-VL's video processor: num_frames, max_frames) and
    # its do_sample_frames, as Qwen's vLLM example sends it
    for kwargs in ({"num_frames": 2}, {"max_frames": 2}, {"max_frames": 5, "num_frames": 2}):
        assert await video_tokens(mm_processor_kwargs=kwargs) == fewer
    qwen = {"fps": 0.5, "do_sample_frames": True}
    assert await video_tokens(mm_processor_kwargs=qwen) == slower


async def test_ping(client: httpx.AsyncClient) -> None:
    for method in ("GET", "POST"):
        response = await client.request(method, "/ping")
        assert response.status_code == 200 and response.content == b""


async def test_a_forced_tool_with_a_vllm_constraint_names_the_constraint(
    client: httpx.AsyncClient,
) -> None:
    """The forced call is the answer (the constraint left aside, as a response_format is),
    but a constraint that cannot be used is still its 400, naming it."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    forced = {"type": "function", "function": {"name": "f"}}
    body = chat(tools=tools, tool_choice=forced, structured_outputs={"choice": ["a"]})
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "f"
    body = chat(tools=tools, tool_choice=forced, structured_outputs={"regex": "[^\\s\\S]"})
    response = await client.post("/v1/chat/completions", json=body)
    assert_error(response, 400, "structured_outputs", "invalid_schema")


async def test_a_completion_prompt_past_the_context_says_prompt(client: httpx.AsyncClient):
    response = await client.post("/v1/completions", json=text_body(prompt=PROMPT * 1000))
    assert_error(response, 400, "prompt", "context_length_exceeded")
    message = response.json()["error"]["message"]
    assert "prompt" in message and "messages" not in message and "images" not in message


async def test_a_completion_request_larger_than_the_queue_is_refused(
    client: httpx.AsyncClient,
) -> None:
    """Each prompt (and choice) is a sequence in the queue: one request needing more than the
    whole queue would turn every other request away while it runs."""
    limit = client.app.state.services.engine.scheduler.config.max_queued_requests  # type: ignore[attr-defined]
    body = text_body(prompt=["p"] * (limit + 1), max_tokens=1)
    assert_error(await client.post("/v1/completions", json=body), 400, "prompt")
    body = text_body(prompt=["p"] * (limit // 2 + 1), max_tokens=1, n=2)
    assert_error(await client.post("/v1/completions", json=body), 400, "prompt")


async def test_vllm_client_odds_and_ends(client: httpx.AsyncClient) -> None:
    """From a vLLM client's trial: /v1/models has vLLM's parent and permission; a tool's
    defer_loading and thinking_token_budget -1 (no budget) are accepted; a data: URI in
    capitals is one; a picture sent as a video is refused without the demuxer's name."""
    card = (await client.get("/v1/models")).json()["data"][0]
    assert card["parent"] is None and card["permission"][0]["object"] == "model_permission"
    tool = {"type": "function", "function": {"name": "f"}, "defer_loading": False}
    response = await client.post(
        "/v1/chat/completions", json=chat(tools=[tool], thinking_token_budget=-1)
    )
    assert response.status_code == 200, response.text
    upper = "DATA:IMAGE/JPEG;BASE64," + data_uri(make_image(64, 64)).split(",", 1)[1]
    image = [{"type": "image_url", "image_url": {"url": upper}}, {"type": "text", "text": "?"}]
    response = await client.post("/v1/chat/completions", json=chat(image))
    assert response.status_code == 200, response.text
    picture = "data:video/mp4;base64," + data_uri(make_image(64, 64)).split(",", 1)[1]
    video = [{"type": "video_url", "video_url": {"url": picture}}]
    response = await client.post("/v1/chat/completions", json=chat(video))
    assert_error(response, 400, "messages[0].content[0]")
    message = response.json()["error"]["message"]
    assert "pipe" not in message and "container this server reads" in message, message


async def test_stop_reason_of_an_end_token_is_vllms(client: httpx.AsyncClient, tokenizer) -> None:
    """The tokenizer's end-of-text (<|im_end|>) ends with stop_reason null; generation_config's
    other end token (<|endoftext|>), which vLLM counts as a stop token, with its id."""
    for token, reason in (("<|im_end|>", None), ("<|endoftext|>", "id")):
        token_id = tokenizer.convert_tokens_to_ids(token)
        body = text_body(logit_bias={str(token_id): 100}, max_tokens=3)
        (choice,) = (await client.post("/v1/completions", json=body)).json()["choices"]
        assert choice["finish_reason"] == "stop", choice
        assert choice["stop_reason"] == (token_id if reason else None), token


async def test_invocations_serves_chat_and_text_completions(client: httpx.AsyncClient) -> None:
    """SageMaker-style /invocations (vLLM's): the body's `messages` or `prompt` picks the API,
    and the answer is the one that API's own route gives, streamed too."""
    for path, body in (("/v1/chat/completions", chat()), ("/v1/completions", text_body())):
        own = (await client.post(path, json=body)).json()
        response = await client.post("/invocations", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["object"] == own["object"]
        assert answer["choices"][0].keys() == own["choices"][0].keys()
        if "messages" in body:
            assert answer["choices"][0]["message"] == own["choices"][0]["message"]
        else:
            assert answer["choices"][0]["text"] == own["choices"][0]["text"]
        streamed = await events(client, "/invocations", body)
        own_stream = await events(client, path, body)
        kind = "chat.completion.chunk" if "messages" in body else "text_completion"
        assert {chunk["object"] for chunk in streamed + own_stream} == {kind}
        # (the same text; not the same chunks: a reader behind gets tokens joined)
        assert streamed_text(streamed) == streamed_text(own_stream)


def streamed_text(chunks: list[dict]) -> str:
    choices = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]
    return "".join(c.get("text") or c.get("delta", {}).get("content") or "" for c in choices)


async def test_invocations_refuses_what_no_api_reads(client: httpx.AsyncClient) -> None:
    response = await client.post("/invocations", json={"model": "tiny", "input": "hi"})
    assert_error(response, 400, param="messages", code="missing_required_parameter")
    # a chat body's own mistakes are named as its route names them
    bad = chat(temperature="hot")
    own = await client.post("/v1/chat/completions", json=bad)
    response = await client.post("/invocations", json=bad)
    assert response.status_code == own.status_code == 400
    assert response.json() == own.json()
    response = await client.post(
        "/invocations", content=b"{", headers={"content-type": "application/json"}
    )
    assert_error(response, 400, code="invalid_json")


async def test_transformers_generate_names_are_bounds(client: httpx.AsyncClient) -> None:
    """lm-eval forwards a task's generation_kwargs (transformers generate()'s names) beside
    its own max_tokens: max_new_tokens / min_new_tokens bound the answer as max_tokens /
    min_tokens do (both given: the tighter holds); num_beams 1 is the default search."""

    async def tokens(path: str, body: dict) -> int:
        response = await client.post(path, json={"model": "tiny", "ignore_eos": True, **body})
        assert response.status_code == 200, response.text
        return response.json()["usage"]["completion_tokens"]

    prompt = {"prompt": "Once upon"}
    assert await tokens("/v1/completions", {**prompt, "max_new_tokens": 4}) == 4
    both = {**prompt, "max_tokens": 9, "max_new_tokens": 3, "num_beams": 1}
    assert await tokens("/v1/completions", both) == 3
    assert await tokens("/v1/completions", {**prompt, "max_tokens": 2, "max_new_tokens": 5}) == 2
    chat_body = chat(max_completion_tokens=6, max_new_tokens=2, min_new_tokens=1)
    assert await tokens("/v1/chat/completions", chat_body) == 2
    # do_sample false: greedy, whatever temperature says (as generate() reads it)
    texts = []
    for extra in ({"temperature": 0}, {"do_sample": False, "temperature": 1.5, "seed": 1}):
        body = {"model": "tiny", **prompt, "max_tokens": 6, **extra}
        texts.append((await client.post("/v1/completions", json=body)).json()["choices"][0]["text"])
    assert texts[0] == texts[1]
    for extra, param, words in (
        ({"do_sample": "no"}, "do_sample", "must be a boolean"),
        ({"num_beams": 4}, "num_beams", "beam search"),
        ({"num_beams": True}, "num_beams", "takes only 1"),
        ({"max_new_tokens": "5"}, "max_new_tokens", "must be an integer"),
        ({"max_new_tokens": -1, "max_tokens": 10}, "max_new_tokens", "from 1"),
        ({"max_new_tokens": 10**30}, "max_new_tokens", "2**31"),
        ({"min_new_tokens": -1}, "min_new_tokens", "from 0"),
        ({"min_new_tokens": 5, "max_tokens": 2}, "min_tokens", "min_tokens (5) must not exceed"),
    ):
        response = await client.post("/v1/chat/completions", json=chat(**extra))
        error = assert_error(response, 400, param)
        assert words in error["message"], error
