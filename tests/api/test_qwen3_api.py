"""Every endpoint on a Qwen3-VL checkpoint, dense and mixture-of-experts, as on Qwen2-VL (the
seed examples run on both in test_seeds.py): images with detail, native and captioned video,
streaming, JSON schemas, media completions, categories, async jobs; and a thinking
checkpoint's reasoning_content."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from server.engine.tiny import TinySpec, make_tiny_checkpoint
from tests.api.test_jobs_api import wait_done
from tests.helpers import data_uri, make_image, make_settings, make_video, start_client

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module", params=["tiny3_model_dir", "tiny3moe_model_dir"])
async def qwen3(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    model_dir: Path = request.getfixturevalue(request.param)
    settings = make_settings(model_dir, caption_tokens=6, default_max_tokens=8)
    async for client in start_client(settings):
        yield client


def video_uri(seconds: float = 4) -> str:
    return "data:video/mp4;base64," + base64.b64encode(make_video(seconds=seconds)).decode()


def chat(*parts: dict, **extra: object) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": list(parts)}], **extra}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(detail: str = "auto", seed: int = 0) -> dict:
    url = data_uri(make_image(320, 240, seed=seed))
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


def video(url: str, **options: object) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **options}}


async def test_images_with_detail(qwen3: httpx.AsyncClient) -> None:
    body = chat(text("Compare"), image("low"), image("high", seed=1), max_tokens=5)
    response = await qwen3.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    # 320x240 in 32-pixel tokens: 10 * 8 = 80 each (low's 256-token cap does not bite)
    assert usage["prompt_tokens_details"]["image_tokens"] == 160


@pytest.mark.parametrize(
    ("size", "pixels"),
    [
        ((640, 480), {"max_pixels": 65536}),  # under the checkpoint's minimum of 65,536
        ((640, 480), {"min_pixels": 65536, "max_pixels": 65536}),
        ((640, 480), {"max_pixels": 16384}),
        ((100, 100), {"min_pixels": 4096, "max_pixels": 16384}),  # a minimum of its own
        ((100, 100), {"min_pixels": 4096}),
        ((300, 200), {"min_pixels": 200_000}),
    ],
)
async def test_an_images_pixel_range_gives_the_tokens_qwens_processor_does(
    qwen3: httpx.AsyncClient, tiny3_model_dir: Path, size: tuple[int, int], pixels: dict
) -> None:
    """The request's range as Qwen's processor reads one (max_pixels never passed, a
    min_pixels under the checkpoint's taken): the image was enlarged again to 65,536 pixels
    after the server had sized it, past the request's max_pixels."""
    from PIL import Image
    from transformers import AutoProcessor

    picture = make_image(*size)
    processor = AutoProcessor.from_pretrained(tiny3_model_dir).image_processor
    least, most = processor.size["shortest_edge"], processor.size["longest_edge"]
    wanted = {
        "shortest_edge": pixels.get("min_pixels", least),
        "longest_edge": pixels.get("max_pixels", most),
    }
    grid = processor(images=[Image.open(io.BytesIO(picture))], size=wanted)["image_grid_thw"]
    expected = int(grid.prod()) // processor.merge_size**2
    part = {"type": "image_url", "image_url": {"url": data_uri(picture), **pixels}}
    response = await qwen3.post("/v1/chat/completions", json=chat(part, max_tokens=1))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens_details"]["image_tokens"] == expected


async def test_native_video_counts_video_tokens(qwen3: httpx.AsyncClient) -> None:
    body = chat(video(video_uri()), text("What happens?"), max_tokens=5)
    response = await qwen3.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    details = response.json()["usage"]["prompt_tokens_details"]
    assert details["video_tokens"] > 0 and details["image_tokens"] == 0
    assert (
        details["video_tokens"] + details["text_tokens"]
        == response.json()["usage"]["prompt_tokens"]
    )


async def test_jpeg_frames_are_timed_in_the_prompt_as_the_same_frames_of_a_file(
    qwen3: httpx.AsyncClient,
) -> None:
    """vLLM's frames-as-JPEGs video, at its one frame a second: each temporal patch is written
    at its frames' own times, as Qwen3-VL's processor writes those of a file's frames (frames
    0 and 1: "<0.5 seconds>"); the middles of the planner's spans were half a second late."""
    frames = [base64.b64encode(make_image(64, 64, seed=i)).decode() for i in range(6)]
    url = "data:video/jpeg;base64," + ",".join(frames)
    body = chat(video(url), text("What happens?"))
    response = await qwen3.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    tokenizer = qwen3.app.state.services.loaded.tokenizer  # type: ignore[attr-defined]
    prompt = tokenizer.decode(response.json()["tokens"])
    assert re.findall(r"<([0-9.]+) seconds>", prompt) == ["0.5", "2.5", "4.5"]


async def test_a_frame_lists_rate_times_its_frames(qwen3: httpx.AsyncClient) -> None:
    """DashScope's list of frames is read as qwen-vl-utils reads one: taken at its `fps`, 2 a
    second unless it says (frame i at i/fps seconds, every frame kept: 8 frames at 4 a second
    are not halved by the server's 2 fps ceiling); vLLM's frames URL says its rate as
    `;fps=N` (without it, one a second). The prompt's times were one a second whatever fps."""
    frames = [base64.b64encode(make_image(64, 64, seed=i)).decode() for i in range(8)]
    listed = [f"data:image/jpeg;base64,{frame}" for frame in frames]
    tokenizer = qwen3.app.state.services.loaded.tokenizer  # type: ignore[attr-defined]

    async def times(part: dict) -> list[str]:
        response = await qwen3.post("/tokenize", json=chat(part, text("What happens?")))
        assert response.status_code == 200, response.text
        return re.findall(r"<([0-9.]+) seconds>", tokenizer.decode(response.json()["tokens"]))

    at_two = ["0.2", "1.2", "2.2", "3.2"]  # (frames 0 and 1: 0.25 s, written to one decimal)
    assert await times({"type": "video", "video": listed}) == at_two
    assert await times({"type": "video", "video": listed, "fps": 2}) == at_two
    assert await times({"type": "video", "video": listed, "fps": 4}) == ["0.1", "0.6", "1.1", "1.6"]
    assert await times({"type": "video", "video": listed, "fps": 0.5}) == [
        "1.0",
        "5.0",
        "9.0",
        "13.0",
    ]
    url = "data:video/jpeg;fps=2;base64," + ",".join(frames)
    assert await times(video(url)) == at_two
    plain = "data:video/jpeg;base64," + ",".join(frames)
    assert await times(video(plain)) == ["0.5", "2.5", "4.5", "6.5"]
    four = ["0.1", "0.6", "1.1", "1.6"]
    assert (
        await times({"type": "video", "video": listed, "sample_fps": 4}) == four
    )  # (qwen-vl-utils')
    assert await times(video(url.replace("fps=2", "FPS=4"))) == four
    both = {"type": "video", "video": listed, "fps": 2, "sample_fps": 2}
    for bad in (0, -1, "2", True, 1000, 1e-320, 0.001):
        body = chat({"type": "video", "video": listed, "fps": bad}, text("?"))
        response = await qwen3.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, (bad, response.text)
    response = await qwen3.post("/v1/chat/completions", json=chat(both, text("?")))
    assert response.status_code == 400 and "not both" in response.text
    for rate in ("0", "1e-320", "x"):
        sent = video(url.replace("fps=2", f"fps={rate}"))
        response = await qwen3.post("/tokenize", json=chat(sent, text("?")))
        assert response.status_code == 400 and "fps" in response.json()["error"]["message"]


async def test_captioned_video_on_media_completions(qwen3: httpx.AsyncClient) -> None:
    body = chat(video(video_uri(6)), text("Summarise."), max_tokens=5)
    response = await qwen3.post("/v2/media/completions", json=body)
    assert response.status_code == 200, response.text
    frames = response.json()["frames"]
    assert frames and all(f["caption"] is not None for f in frames)


async def test_streaming_and_json_schema(qwen3: httpx.AsyncClient) -> None:
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["cat", "dog"]}},
        "required": ["label"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    body = chat(image(), text("Which?"), max_tokens=40, response_format=response_format)
    response = await qwen3.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = json.loads(response.json()["choices"][0]["message"]["content"])
    assert answer["label"] in ("cat", "dog")
    async with qwen3.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True}
    ) as stream:
        lines = [line async for line in stream.aiter_lines() if line.startswith("data: {")]
    content = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in lines
    )
    assert json.loads(content)["label"] in ("cat", "dog")


async def test_categories_sync_and_async(qwen3: httpx.AsyncClient) -> None:
    body = {"media_url": video_uri(6), "metadata": ["tags"], "use_scenes": False}
    response = await qwen3.post("/v2/media/categories", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["media_type"] == "video" and response.json()["frames"]
    job = (await qwen3.post("/v2/media/categories", json={**body, "async": True})).json()
    done = await wait_done(qwen3, job["status_url"])
    assert done["status"] == "completed" and done["progress"] == 1


@pytest.fixture(scope="module")
async def thinking(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp("models") / "thinking", TinySpec(family="qwen3-vl-thinking")
    )
    async for client in start_client(make_settings(path, default_max_tokens=12)):
        yield client


async def streamed_deltas(client: httpx.AsyncClient, body: dict) -> list[dict]:
    """The choice's deltas of the chat completion `body` streamed."""
    async with client.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True}
    ) as stream:
        return [
            json.loads(line[6:])["choices"][0]["delta"]
            async for line in stream.aiter_lines()
            if line.startswith("data: {") and '"delta"' in line
        ]


async def test_a_thinking_checkpoint_answers_with_reasoning_content(
    thinking: httpx.AsyncClient,
) -> None:
    """A random-weight model never writes "</think>": its whole answer is reasoning, as vLLM's
    Qwen3 parser reads a thought cut off by max_tokens."""
    body = chat(image(), text("Think first."), max_tokens=12, temperature=0, ignore_eos=True)
    response = await thinking.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["reasoning_content"] and message["content"] == ""
    # current vLLM's name, with the same text (clients read one or the other)
    assert message["reasoning"] == message["reasoning_content"]
    deltas = await streamed_deltas(thinking, body)
    streamed = "".join(d.get("reasoning_content") or "" for d in deltas)
    assert streamed == message["reasoning_content"]
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert not "".join(d.get("content") or "" for d in deltas)


async def test_usage_counts_the_reasoning_tokens(
    thinking: httpx.AsyncClient, tiny3_model_dir
) -> None:
    """OpenAI's usage.completion_tokens_details.reasoning_tokens: the tokens before
    "</think>" (all of them when it never came), and 0 where the answer did not start in
    reasoning (the details are always there: clients read them without a check)."""
    close = AutoTokenizer.from_pretrained(tiny3_model_dir).convert_tokens_to_ids("</think>")
    body = chat(text("Think."), max_tokens=5, temperature=0, ignore_eos=True)
    cases = [
        ({}, 5),  # the random model never closes its thought
        ({"logit_bias": {str(close): 100}}, 0),  # closed at once
        ({"chat_template_kwargs": {"enable_thinking": False}}, 0),
    ]
    for extra, reasoning in cases:
        response = await thinking.post("/v1/chat/completions", json={**body, **extra})
        assert response.status_code == 200, response.text
        details = response.json()["usage"]["completion_tokens_details"]
        assert details["reasoning_tokens"] == reasoning and details["text_tokens"] == 5
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with thinking.stream("POST", "/v1/chat/completions", json=stream) as response:
        lines = [line async for line in response.aiter_lines() if line.startswith("data: {")]
    usage = json.loads(lines[-1][6:])["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 5
    # the OpenAPI document keeps Usage a typed object (clients generate their models from it)
    schemas = (await thinking.get("/openapi.json")).json()["components"]["schemas"]
    assert {"completion_tokens", "completion_tokens_details"} <= set(schemas["Usage"]["properties"])


async def test_a_prefill_inside_think_goes_on_reasoning(thinking: httpx.AsyncClient) -> None:
    """An assistant prefill (continue_final_message) that opens "<think>": the answer goes
    on reasoning, split at its "</think>" as vLLM's parsers split it, and a thinking budget
    ends it (it was all content, the budget ignored)."""
    messages = [
        {"role": "user", "content": "Think."},
        {"role": "assistant", "content": "<think>\nLet me"},
    ]
    body = {
        "model": "tiny",
        "messages": messages,
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "thinking_token_budget": 3,
    }
    response = await thinking.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3
    message = answer["choices"][0]["message"]
    assert message["reasoning_content"] is not None and "</think>" not in message["content"]


async def test_a_thinking_budget_ends_the_reasoning(thinking: httpx.AsyncClient) -> None:
    """vLLM's thinking_token_budget (Anthropic's budget_tokens): after that many reasoning
    tokens "</think>" is forced and the answer goes on as content, sampled or greedy,
    streamed or not; a budget the reasoning does not reach changes nothing."""
    body = chat(text("Think."), max_tokens=8, temperature=0, ignore_eos=True)
    unbounded = (await thinking.post("/v1/chat/completions", json=body)).json()
    assert unbounded["usage"]["completion_tokens_details"]["reasoning_tokens"] == 8
    for budget, sampling in [(3, {}), (0, {}), (5, {"temperature": 1, "top_p": 0.9, "seed": 7})]:
        bounded = {**body, **sampling, "thinking_token_budget": budget}
        response = await thinking.post("/v1/chat/completions", json=bounded)
        assert response.status_code == 200, response.text
        usage, message = response.json()["usage"], response.json()["choices"][0]["message"]
        assert usage["completion_tokens_details"]["reasoning_tokens"] == budget
        assert usage["completion_tokens"] == 8 and message["content"]
        if not sampling:  # the reasoning is what it was, up to the budget
            before = unbounded["choices"][0]["message"]["reasoning_content"]
            assert before.startswith(message["reasoning_content"] or "")
        deltas = await streamed_deltas(thinking, bounded)
        assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    reached = await thinking.post("/v1/chat/completions", json={**body, "thinking_token_budget": 8})
    assert reached.json()["choices"][0]["message"] == unbounded["choices"][0]["message"]
    unlimited = {**body, "thinking_token_budget": -1}  # vLLM's "no budget"
    assert (await thinking.post("/v1/chat/completions", json=unlimited)).json()["choices"][0][
        "message"
    ] == unbounded["choices"][0]["message"]
    refused = await thinking.post(
        "/v1/chat/completions", json={**body, "thinking_token_budget": -2}
    )
    assert (
        refused.status_code == 400 and refused.json()["error"]["param"] == "thinking_token_budget"
    )
    anthropic = {
        "model": "tiny",
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Think."}],
        "thinking": {"type": "enabled", "budget_tokens": 2},
    }
    message = (await thinking.post("/v1/messages", json=anthropic)).json()
    assert [b["type"] for b in message["content"]] == ["thinking", "text"]
    assert message["usage"]["output_tokens"] == 8


async def test_enable_thinking_false_closes_the_reasoning(thinking: httpx.AsyncClient) -> None:
    """chat_template_kwargs.enable_thinking=false (vLLM clients send it for Qwen3) answers at
    once, the way Qwen3's hybrid templates render it: "</think>" is in the prompt, and the
    whole answer is content."""
    body = chat(text("Quick."), max_tokens=6, temperature=0, ignore_eos=True)
    thinks = await thinking.post("/v1/chat/completions", json=body)
    off = {**body, "chat_template_kwargs": {"enable_thinking": False, "unknown_key": 1}}
    answers = await thinking.post("/v1/chat/completions", json=off)
    assert thinks.status_code == answers.status_code == 200, answers.text
    assert thinks.json()["choices"][0]["message"]["reasoning"]
    message = answers.json()["choices"][0]["message"]
    assert message["reasoning"] is None and message["reasoning_content"] == ""
    assert message["content"]
    usage = thinks.json()["usage"], answers.json()["usage"]
    assert usage[1]["prompt_tokens"] > usage[0]["prompt_tokens"]  # the closing "</think>"


async def test_reasoning_effort_none_turns_the_reasoning_off(thinking: httpx.AsyncClient) -> None:
    """OpenAI's reasoning_effort "none" (chat) and reasoning.effort "none" (Responses) answer
    without reasoning, as enable_thinking=false does; the other levels leave the checkpoint
    reasoning; chat_template_kwargs.enable_thinking, when sent, is what counts; a level OpenAI
    does not have is a 400 naming the field."""
    body = chat(text("Quick."), max_tokens=6, temperature=0, ignore_eos=True)

    async def reasoning(**extra: object) -> str | None:
        response = await thinking.post("/v1/chat/completions", json={**body, **extra})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["reasoning_content"]

    assert await reasoning(reasoning_effort="none") == ""
    assert await reasoning(reasoning_effort="low")
    kwargs = {"enable_thinking": True}
    assert await reasoning(reasoning_effort="none", chat_template_kwargs=kwargs)
    bad = await thinking.post("/v1/chat/completions", json={**body, "reasoning_effort": "max"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort"

    question = {"model": "tiny", "input": "Quick.", "max_output_tokens": 6, "temperature": 0}
    off = {**question, "reasoning": {"effort": "none", "summary": "auto"}}
    response = (await thinking.post("/v1/responses", json=off)).json()
    assert [item["type"] for item in response["output"]] == ["message"]
    assert response["reasoning"] == {"effort": "none", "summary": "auto"}
    response = (await thinking.post("/v1/responses", json=question)).json()
    assert response["output"][0]["type"] == "reasoning"
    assert response["reasoning"] == {"effort": None, "summary": None}
    bad = await thinking.post("/v1/responses", json={**question, "reasoning": {"effort": "x"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning.effort"


async def test_a_thinking_checkpoint_reasons_then_answers_under_the_grammar(
    thinking: httpx.AsyncClient,
) -> None:
    """As vLLM's reasoning models and OpenAI's: the reasoning comes first, unconstrained, and
    the grammar shapes what follows its "</think>" (the random model never writes one: its
    thinking budget ends the reasoning here). Reasoning that takes every token leaves no
    answer; enable_thinking false answers at once; frame captions and categories answer at
    once (their prompts close the reasoning)."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "enum": ["x", "y"]}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    body = chat(image(), text("JSON please"), max_tokens=40, response_format=response_format)
    budgeted = {**body, "temperature": 0, "thinking_token_budget": 4}
    response = await thinking.post("/v1/chat/completions", json=budgeted)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert json.loads(message["content"]) is not None and message["reasoning_content"]
    assert response.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4
    deltas = await streamed_deltas(thinking, budgeted)
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    unended = (await thinking.post("/v1/chat/completions", json=body)).json()["choices"][0]
    assert unended["finish_reason"] == "length" and unended["message"]["reasoning_content"]
    assert not unended["message"]["content"]
    at_once = {**body, "chat_template_kwargs": {"enable_thinking": False}}
    message = (await thinking.post("/v1/chat/completions", json=at_once)).json()["choices"][0][
        "message"
    ]
    assert json.loads(message["content"]) is not None and message["reasoning_content"] == ""
    categories = {"media_url": data_uri(make_image(320, 240)), "metadata": ["tags"]}
    response = await thinking.post("/v2/media/categories", json=categories)
    assert response.status_code == 200, response.text


async def test_a_named_tool_call(qwen3: httpx.AsyncClient) -> None:
    """Tools on Qwen3-VL (its template renders them itself): the arguments parse against the
    schema."""
    await check_named_tool_call(qwen3)


async def test_a_named_tool_call_on_a_thinking_checkpoint(thinking: httpx.AsyncClient) -> None:
    """The call follows the reasoning (ended by its budget: the random model never ends it)."""
    message = await check_named_tool_call(thinking, thinking_token_budget=3)
    assert message["reasoning_content"]


async def test_a_thinking_answer_does_not_end_before_its_forced_call(
    thinking: httpx.AsyncClient, tiny3_model_dir: Path
) -> None:
    """Its end tokens, however likely, are not taken while the reasoning runs: a forced call
    (or schema) applies after it, and an answer that ended inside it was "completed" with no
    call (17 of 20 Responses of the random-weight checkpoint)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny3_model_dir)
    enders = {str(tokenizer.convert_tokens_to_ids(t)): 100 for t in ("<|im_end|>", "<|endoftext|>")}
    message = await check_named_tool_call(thinking, thinking_token_budget=3, logit_bias=enders)
    assert message["reasoning_content"]


async def test_stop_strings_do_not_cut_a_forced_call(qwen3: httpx.AsyncClient) -> None:
    """A forced answer is the call: a stop string (smolagents sends "Observation:" with
    tool_choice required) cut its JSON, part of the required list's wrapper left as content."""
    from tests.api.test_tools import WEATHER, check_weather

    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        body = chat(
            text("Weather in Oslo?"),
            max_tokens=200,
            tools=[WEATHER],
            tool_choice=choice,
            parallel_tool_calls=False,
            temperature=0,
            stop=["name", "{", '"', "e"],
        )
        response = await qwen3.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        choice_ = response.json()["choices"][0]
        # (a named call's is "stop", as OpenAI's)
        assert choice_["finish_reason"] in ("tool_calls", "stop"), choice_
        assert not isinstance(choice_["stop_reason"], str) and not choice_["message"]["content"]
        check_weather(choice_["message"]["tool_calls"][0]["function"]["arguments"])


async def check_named_tool_call(client: httpx.AsyncClient, **extra: Any) -> dict:
    from tests.api.test_tools import NAMED, WEATHER, check_weather

    # greedy: a random-weight model's sampled text can hold surrogates, which xgrammar takes
    # as one character of a string and the detokenizer as three U+FFFD (schema lengths break)
    body = chat(
        text("Weather in Oslo?"), max_tokens=60, tools=[WEATHER], tool_choice=NAMED, temperature=0
    )
    response = await client.post("/v1/chat/completions", json={**body, **extra})
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    check_weather(call["function"]["arguments"])
    return message


async def test_responses_api_reasoning_items(thinking: httpx.AsyncClient) -> None:
    """/v1/responses on a thinking checkpoint: the reasoning as a reasoning item before the
    message (streamed as reasoning_text deltas), its tokens in output_tokens_details."""
    question = [{"role": "user", "content": "Think."}]
    chat_body = {"model": "tiny", "messages": question, "max_tokens": 6, "temperature": 0}
    message = (await thinking.post("/v1/chat/completions", json=chat_body)).json()
    reasoning = message["choices"][0]["message"]["reasoning_content"]
    body = {"model": "tiny", "input": question, "max_output_tokens": 6, "temperature": 0}
    response = (await thinking.post("/v1/responses", json=body)).json()
    kinds = [item["type"] for item in response["output"]]
    assert reasoning, "the tiny thinking model reasons first"  # what this test is about
    assert kinds == ["reasoning"]  # cut off while reasoning: no message, as OpenAI answers
    assert response["output"][0]["content"] == [{"type": "reasoning_text", "text": reasoning}]
    reasoning_tokens = message["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert response["usage"]["output_tokens_details"] == {"reasoning_tokens": reasoning_tokens}
    async with thinking.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
        events = [
            json.loads(line[6:]) async for line in stream.aiter_lines() if line.startswith("data:")
        ]
    thought = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert thought == reasoning
    assert [item["type"] for item in events[-1]["response"]["output"]] == kinds


async def test_responses_reasoning_summary_and_encrypted_content(
    thinking: httpx.AsyncClient,
) -> None:
    """reasoning.summary asked for: the reasoning item's summary is the reasoning itself, and
    it streams as summary events too (the Vercel AI SDK reads only those); include
    ["reasoning.encrypted_content"]: the item carries it, and an item sent back with only it
    (store false) puts the reasoning in the prompt as its content would; another provider's
    is left out."""
    question = [{"role": "user", "content": "Think."}]
    body = {"model": "tiny", "input": question, "max_output_tokens": 6, "temperature": 0}
    plain = (await thinking.post("/v1/responses", json=body)).json()["output"][0]
    assert plain["summary"] == [] and "encrypted_content" not in plain
    reasoning = plain["content"][0]["text"]
    assert reasoning
    body |= {"reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"]}
    item = (await thinking.post("/v1/responses", json=body)).json()["output"][0]
    assert item["summary"] == [{"type": "summary_text", "text": reasoning}]
    assert item["content"] == plain["content"] and item["encrypted_content"]
    async with thinking.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
        events = [
            json.loads(line[6:]) async for line in stream.aiter_lines() if line.startswith("data:")
        ]
    kinds = [e["type"].removeprefix("response.") for e in events]
    first = kinds.index("reasoning_summary_part.added")
    assert kinds[first - 1] == "output_item.added"
    last = kinds.index("output_item.done")
    assert kinds[last - 3 : last] == [
        "reasoning_text.done",
        "reasoning_summary_text.done",
        "reasoning_summary_part.done",
    ]
    summary = [e for e in events if e["type"] == "response.reasoning_summary_text.delta"]
    assert "".join(e["delta"] for e in summary) == reasoning
    assert {(e["summary_index"], e["output_index"], e["item_id"]) for e in summary} == {
        (0, 0, events[last]["item"]["id"])
    }
    done = events[last]["item"]
    assert {k: v for k, v in done.items() if k != "id"} == {
        k: v for k, v in item.items() if k != "id"
    }
    assert events[last - 1]["part"] == {"type": "summary_text", "text": reasoning}

    async def counted(reasoning_item: dict | None) -> int:
        call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
        output = {"type": "function_call_output", "call_id": "c1", "output": "res"}
        items = [question[0], *([reasoning_item] if reasoning_item else []), call, output]
        tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
        count = {"model": "tiny", "input": items, "tools": tools}
        response = await thinking.post("/v1/responses/input_tokens", json=count)
        assert response.status_code == 200, response.text
        return response.json()["input_tokens"]

    sealed = {"type": "reasoning", "id": "rs_1", "summary": []}
    with_content = await counted(sealed | {"content": item["content"]})
    assert await counted(sealed | {"encrypted_content": item["encrypted_content"]}) == with_content
    assert await counted(sealed | {"summary": item["summary"]}) == with_content
    assert await counted(sealed | {"encrypted_content": "gAAAAABo-other"}) == await counted(None)
    assert with_content > await counted(None)


async def test_the_messages_api_sends_thinking_blocks(thinking: httpx.AsyncClient) -> None:
    """Anthropic's Messages API: the reasoning is a thinking block (streamed as thinking
    deltas, then an empty signature); display "omitted" sends the block without its text;
    thinking disabled, or not asked for (Anthropic's default), closes the reasoning in the
    prompt (Qwen3's enable_thinking)."""
    body = {
        "model": "tiny",
        "max_tokens": 6,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Think."}],
        "thinking": {"type": "enabled"},
    }
    response = await thinking.post("/v1/messages", json=body)
    assert response.status_code == 200, response.text
    (block,) = response.json()["content"]  # the random model never closes its thought
    assert block["type"] == "thinking" and block["thinking"] and block["signature"] == ""
    async with thinking.stream("POST", "/v1/messages", json={**body, "stream": True}) as stream:
        events = [
            json.loads(line[6:]) async for line in stream.aiter_lines() if line[:6] == "data: "
        ]
    (start,) = [e for e in events if e["type"] == "content_block_start"]
    assert start["content_block"]["type"] == "thinking"
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert {d["type"] for d in deltas[:-1]} == {"thinking_delta"}
    assert deltas[-1] == {"type": "signature_delta", "signature": ""}  # last, as Anthropic's
    assert "".join(d["thinking"] for d in deltas[:-1]) == block["thinking"]
    omitted = {**body, "thinking": {"type": "enabled", "display": "omitted"}}
    response = await thinking.post("/v1/messages", json=omitted)
    assert [b["thinking"] for b in response.json()["content"]] == [""]
    for off in ({"thinking": {"type": "disabled"}}, {"thinking": None}):
        # (no thinking: Anthropic's default, off; the SDK's `content[0].text` reads the answer)
        response = await thinking.post("/v1/messages", json={**body, **off})
        assert [b["type"] for b in response.json()["content"]] == ["text"]
    del body["thinking"]
    response = await thinking.post("/v1/messages", json=body)
    assert [b["type"] for b in response.json()["content"]] == ["text"]


async def test_other_servers_reasoning_switches_are_read(thinking: httpx.AsyncClient) -> None:
    """What other servers' clients send for a thinking checkpoint: DashScope's enable_thinking
    and thinking_budget (Qwen Code, Qwen-Agent), OpenRouter's reasoning object, the thinking
    object of Anthropic-style OpenAI endpoints, Ollama's think: each read as vLLM's field for
    it (which, sent too, wins); a bad value is a 400 naming it."""
    body = chat(text("Think."), max_tokens=8, temperature=0, ignore_eos=True)

    async def answer(**extra: object) -> dict:
        response = await thinking.post("/v1/chat/completions", json={**body, **extra})
        assert response.status_code == 200, (extra, response.text)
        return response.json()

    def reasoning(answer: dict) -> tuple[str, int]:
        message, usage = answer["choices"][0]["message"], answer["usage"]
        return message["reasoning_content"], usage["completion_tokens_details"]["reasoning_tokens"]

    thinks = reasoning(await answer())
    assert thinks[0]
    for off in (
        {"enable_thinking": False},
        {"reasoning": {"enabled": False}},
        {"thinking": {"type": "disabled"}},
        {"think": False},
    ):
        assert reasoning(await answer(**off)) == ("", 0), off
    kwargs = {"enable_thinking": True}
    assert reasoning(await answer(enable_thinking=False, chat_template_kwargs=kwargs)) == thinks
    assert reasoning(await answer(think="high", chat_template_kwargs=kwargs)) == thinks
    assert reasoning(await answer(thinking={"type": "adaptive", "display": "omitted"})) == thinks
    # vLLM's own fields win: reasoning_effort "none" too
    for on in ({"enable_thinking": True}, {"think": True}, {"reasoning": {"enabled": True}}):
        assert reasoning(await answer(reasoning_effort="none", **on)) == ("", 0), on
    # a null is no switch (and a null vLLM field is no say either)
    nulls = {"enable_thinking": None, "thinking_budget": None, "incremental_output": None}
    assert reasoning(await answer(**nulls, think=None)) == thinks
    assert reasoning(await answer(enable_thinking=False, reasoning_effort=None)) == ("", 0)
    assert reasoning(await answer(reasoning={"effort": "high", "summary": "auto"})) == thinks
    for budget in (
        {"thinking_budget": 3},
        {"reasoning": {"max_tokens": 3}},
        {"thinking": {"type": "enabled", "budget_tokens": 3}},
    ):
        assert reasoning(await answer(**budget))[1] == 3, budget
    assert reasoning(await answer(thinking_budget=3, thinking_token_budget=5))[1] == 5
    # Cherry Studio's budget inside the template's variables; "auto" levels are no switch;
    # llama.cpp's reasoning_format values (Dify's setting) are how reasoning comes here
    assert reasoning(await answer(chat_template_kwargs={"thinking_budget": 3}))[1] == 3
    assert reasoning(await answer(reasoning_effort="auto", thinking={"type": "auto"})) == thinks
    for shown in ("auto", "deepseek", "deepseek-legacy", "parsed"):
        assert reasoning(await answer(reasoning_format=shown)) == thinks, shown
    for raw in ("none", "raw"):
        response = await thinking.post(
            "/v1/chat/completions", json={**body, "reasoning_format": raw}
        )
        assert response.status_code == 400 and "reasoning_format" in response.text
    quiet = await answer(reasoning={"exclude": True, "max_tokens": 3}, include_reasoning=None)
    quiet = quiet["choices"][0]["message"]
    assert quiet["reasoning"] is None and quiet["reasoning_content"] == "" and quiet["content"]
    assert (await answer(incremental_output=True))["choices"][0]["message"]["reasoning"]
    for bad, param in (
        ({"enable_thinking": "yes"}, "enable_thinking"),
        ({"thinking_budget": -1}, "thinking_budget"),
        ({"reasoning": {"effort": "max"}}, "reasoning.effort"),
        ({"reasoning": {"effort": "low", "verbose": True}}, "reasoning.verbose"),
        ({"reasoning": "high"}, "reasoning"),
        ({"thinking": {"type": "on"}}, "thinking.type"),
        ({"thinking": {"type": ["enabled"]}}, "thinking.type"),
        ({"thinking": {"type": "enabled", "budget_tokens": 0}}, "thinking.budget_tokens"),
        ({"reasoning": {"effort": {}}}, "reasoning.effort"),
        ({"think": "max"}, "think"),
        ({"incremental_output": False}, "incremental_output"),
    ):
        response = await thinking.post("/v1/chat/completions", json={**body, **bad})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["param"] == param, (bad, response.text)


async def test_include_reasoning_false_leaves_the_reasoning_out(
    thinking: httpx.AsyncClient,
) -> None:
    """vLLM's include_reasoning: false: the answer is the content alone, streamed or not (the
    reasoning is still generated and counted)."""
    body = chat(
        text("Think."), max_tokens=8, temperature=0, ignore_eos=True, thinking_token_budget=3
    )
    full = (await thinking.post("/v1/chat/completions", json=body)).json()
    assert full["choices"][0]["message"]["reasoning"]
    quiet = {**body, "include_reasoning": False}
    response = (await thinking.post("/v1/chat/completions", json=quiet)).json()
    message = response["choices"][0]["message"]
    assert message["reasoning"] is None and message["reasoning_content"] == ""
    assert message["content"] == full["choices"][0]["message"]["content"]
    assert response["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3
    deltas = await streamed_deltas(thinking, quiet)
    assert not any(d.get("reasoning") or d.get("reasoning_content") for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    # its logprobs and token ids leave the reasoning (and "</think>") out too: the answer's 4
    scored = {**quiet, "logprobs": True, "return_token_ids": True}
    whole = (await thinking.post("/v1/chat/completions", json=scored)).json()["choices"][0]
    tokens = [entry["token"] for entry in whole["logprobs"]["content"]]
    assert len(tokens) == 4 and "</think>" not in tokens and len(whole["token_ids"]) == 4
    async with thinking.stream(
        "POST", "/v1/chat/completions", json={**scored, "stream": True}
    ) as stream:
        lines = [line async for line in stream.aiter_lines() if line.startswith("data: {")]
    streamed = [
        entry["token"]
        for line in lines
        for choice in json.loads(line[6:])["choices"]
        for entry in (choice.get("logprobs") or {}).get("content") or ()
    ]
    assert streamed == tokens


async def test_a_prompt_cut_on_the_right_does_not_start_in_reasoning(
    thinking: httpx.AsyncClient,
) -> None:
    """truncate_prompt_tokens with truncation_side right cuts off the generation prompt (and
    its "<think>"): the answer is read as content, not reasoning."""
    body = chat(text("hi there"), max_tokens=4, temperature=0, ignore_eos=True)
    body |= {"truncate_prompt_tokens": 5, "truncation_side": "right"}
    response = await thinking.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["reasoning"] is None and message["content"]
    assert response.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


async def test_the_responses_api_takes_a_thinking_budget(thinking: httpx.AsyncClient) -> None:
    """thinking_token_budget (vLLM's extension, as chat's) bounds the reasoning before a
    text.format's JSON (the random model never ends its reasoning by itself)."""
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}
    body = {
        "model": "tiny",
        "input": "JSON please",
        "max_output_tokens": 40,
        "temperature": 0,
        "thinking_token_budget": 3,
        "text": {"format": {"type": "json_schema", "name": "s", "schema": schema}},
    }
    response = await thinking.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    output = response.json()["output"]
    assert [item["type"] for item in output] == ["reasoning", "message"]
    assert json.loads(output[1]["content"][0]["text"])["a"] in ("x", "y")
    assert response.json()["usage"]["output_tokens_details"]["reasoning_tokens"] == 3


async def test_a_tool_loops_reasoning_stays_in_the_prompt(thinking: httpx.AsyncClient) -> None:
    """Qwen3's thinking template keeps an assistant turn's reasoning after the last user query
    (a tool-call loop's steps) and drops it before: the reasoning each API sends back (chat's
    reasoning_content, a Responses reasoning item, an Anthropic thinking block) goes to it."""

    async def prompt_of(body: dict) -> str:
        ids = (await thinking.post("/tokenize", json={"model": "tiny", **body})).json()["tokens"]
        response = await thinking.post("/detokenize", json={"model": "tiny", "tokens": ids})
        return response.json()["prompt"]

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = [
        {"role": "user", "content": "q0"},
        {"role": "assistant", "content": "a0", "reasoning_content": "EARLIER"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "", "reasoning_content": "STEP", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "res"},
    ]
    text = await prompt_of({"messages": messages, "tools": [tool]})
    assert "<think>\nSTEP\n</think>\n\n<tool_call>" in text and "EARLIER" not in text
    # the Responses API's reasoning item, and Anthropic's thinking block, the same way
    items = [
        {"role": "user", "content": "q1"},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "STEP"}],
        },
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "res"},
    ]
    body = {"model": "tiny", "input": items, "max_output_tokens": 1, "temperature": 0}
    body["tools"] = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    with_reasoning = (await thinking.post("/v1/responses/input_tokens", json=body)).json()
    without = {**body, "input": [items[0], *items[2:]]}
    assert (
        with_reasoning["input_tokens"]
        > (await thinking.post("/v1/responses/input_tokens", json=without)).json()["input_tokens"]
    )
    anthropic = {
        "model": "tiny",
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "q1"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "STEP", "signature": ""},
                    {"type": "tool_use", "id": "c1", "name": "f", "input": {"x": 1}},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "res"}],
            },
        ],
    }
    counted = (await thinking.post("/v1/messages/count_tokens", json=anthropic)).json()
    anthropic["messages"][1]["content"] = anthropic["messages"][1]["content"][1:]
    bare = (await thinking.post("/v1/messages/count_tokens", json=anthropic)).json()
    assert counted["input_tokens"] > bare["input_tokens"]


async def test_context_managements_thinking_edit_clears_older_turns_thinking(
    thinking: httpx.AsyncClient,
) -> None:
    """The context-management beta's clear_thinking_20251015 (Claude Code sends it on every
    request): keep "all" is the prompt as sent, keep N drops the thinking of all but the last
    N assistant turns; a tool-result clearing edit is refused by name (not done here)."""

    def step(k: int) -> list[dict]:
        call = {"type": "tool_use", "id": f"c{k}", "name": "f", "input": {"x": k}}
        result = {"type": "tool_result", "tool_use_id": f"c{k}", "content": "res"}
        thought = {"type": "thinking", "thinking": f"STEP {k} " * 5, "signature": ""}
        return [
            {"role": "assistant", "content": [thought, call]},
            {"role": "user", "content": [result]},
        ]

    body = {
        "model": "tiny",
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "q"}, *step(1), *step(2)],
        "thinking": {"type": "adaptive"},
    }

    async def counted(edits: list[dict] | None) -> int:
        sent = body if edits is None else {**body, "context_management": {"edits": edits}}
        response = await thinking.post("/v1/messages/count_tokens", json=sent)
        assert response.status_code == 200, response.text
        return response.json()["input_tokens"]

    def keep(value: object) -> list[dict]:
        return [{"type": "clear_thinking_20251015", "keep": value}]

    sent = await counted(None)
    assert await counted(keep("all")) == sent
    one = await counted([{"type": "clear_thinking_20251015"}])  # (Anthropic's default: 1)
    assert await counted(keep({"type": "thinking_turns", "value": 1})) == one
    assert sent > one
    assert await counted(keep({"type": "thinking_turns", "value": 2})) == sent
    # Claude Code's request, as it sends it
    claude_code = {**body, "max_tokens": 3, "context_management": {"edits": keep("all")}}
    response = await thinking.post(
        "/v1/messages?beta=true",
        json=claude_code,
        headers={"anthropic-beta": "context-management-2025-06-27"},
    )
    assert response.status_code == 200, response.text
    for edits, param in (
        ([{"type": "clear_tool_uses_20250919"}], "context_management.edits[0].type"),
        (keep({"type": "thinking_turns", "value": 0}), "context_management.edits[0]"),
        (keep("some"), "context_management.edits[0]"),
        ([{"type": "clear_thinking_20251015", "extra": 1}], "context_management.edits[0]"),
        ([{}], "context_management.edits[0].type"),
    ):
        response = await thinking.post(
            "/v1/messages", json={**claude_code, "context_management": {"edits": edits}}
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and param in error["message"], error


async def test_a_tools_screenshot_is_prompted_as_the_checkpoints_template_writes_it(
    thinking: httpx.AsyncClient, tiny3_model_dir: Path
) -> None:
    """A tool message's image sits inside its <tool_response>, parallel results in one user
    turn, as Qwen3-VL's own template writes them (vLLM serves that prompt): a screenshot loop's
    steps are not new queries, so their reasoning stays in the prompt."""
    tokenizer = AutoTokenizer.from_pretrained(tiny3_model_dir)
    template = Path("server/engine/templates/qwen3_vl_thinking.jinja").read_text()
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    calls = [
        {"id": f"c{k}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        for k in (1, 2)
    ]
    image = {"type": "image_url", "image_url": {"url": data_uri(make_image(64, 64))}}
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "", "reasoning_content": "STEP", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "a"}, image]},
        {"role": "tool", "tool_call_id": "c2", "content": [image, {"type": "text", "text": "b"}]},
    ]
    body = {"model": "tiny", "messages": messages, "tools": [tool]}
    ids = (await thinking.post("/tokenize", json=body)).json()["tokens"]
    ours = (await thinking.post("/detokenize", json={"tokens": ids})).json()["prompt"]
    ours = re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", ours)  # (the template writes one)
    as_hf = [
        {**m, "content": [{"type": "image"} if "image_url" in p else p for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]
    theirs = tokenizer.apply_chat_template(
        as_hf, tools=[tool], chat_template=template, add_generation_prompt=True, tokenize=False
    )
    assert ours == theirs
    assert "<think>\nSTEP\n</think>" in ours
    assert "<tool_response>\na<|vision_start|>" in ours


async def test_tools_are_prompted_as_the_checkpoints_template_writes_them(
    qwen3: httpx.AsyncClient, request: pytest.FixtureRequest
) -> None:
    """No system message: Qwen3-VL's template opens with the tools' block (it has no default
    system prompt, where Qwen2-VL's has one); with one, the block follows it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        request.getfixturevalue(request.node.callspec.params["qwen3"])
    )
    tool = {
        "type": "function",
        "function": {"name": "f", "description": "d", "parameters": {"type": "object"}},
    }
    for messages in (
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    ):
        body = {"model": "tiny", "messages": messages, "tools": [tool]}
        ours = tokenizer.decode((await qwen3.post("/tokenize", json=body)).json()["tokens"])
        theirs = tokenizer.apply_chat_template(
            messages, tools=[tool], add_generation_prompt=True, tokenize=False
        )
        assert ours == theirs


async def test_a_raw_prompt_in_reasoning_waits_for_its_end_before_the_grammar(
    thinking: httpx.AsyncClient,
) -> None:
    """/v1/completions: a prompt that ends inside "<think>" answers with reasoning first, the
    grammar after "</think>" (vLLM's reasoning parser); one with its reasoning closed, or none,
    is shaped from the first token."""
    close = (await thinking.post("/tokenize", json={"prompt": "</think>"})).json()["tokens"][-1]
    head = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    body = {"model": "tiny", "max_tokens": 12, "temperature": 0, "guided_choice": ["yes", "no"]}
    body["logit_bias"] = {str(close): -100}  # (the random model never ends its reasoning here)
    waiting = (
        await thinking.post("/v1/completions", json={**body, "prompt": head + "<think>\n"})
    ).json()
    assert waiting["choices"][0]["finish_reason"] == "length"  # still reasoning, unconstrained
    assert waiting["choices"][0]["text"] not in ("yes", "no")
    for prompt in (head + "<think>\n\n</think>\n\n", head):
        shaped = (await thinking.post("/v1/completions", json={**body, "prompt": prompt})).json()
        assert shaped["choices"][0]["text"] in ("yes", "no"), prompt


async def test_the_responses_text_logprobs_are_the_texts_own(thinking: httpx.AsyncClient) -> None:
    """output_text.logprobs cover the message's text, not the reasoning before it (nor its
    "</think>"), streamed or not."""
    body = {
        "model": "tiny",
        "input": "Think.",
        "max_output_tokens": 8,
        "temperature": 0,
        "thinking_token_budget": 3,
        "include": ["message.output_text.logprobs"],
    }
    response = (await thinking.post("/v1/responses", json=body)).json()
    usage = response["usage"]
    message = next(item for item in response["output"] if item["type"] == "message")
    tokens = [entry["token"] for entry in message["content"][0]["logprobs"]]
    answer_tokens = usage["output_tokens"] - usage["output_tokens_details"]["reasoning_tokens"] - 1
    assert len(tokens) == answer_tokens and "</think>" not in tokens
    async with thinking.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
        events = [
            json.loads(line[6:]) async for line in stream.aiter_lines() if line[:6] == "data: "
        ]
    (done,) = [e for e in events if e["type"] == "response.output_text.done"]
    assert [entry["token"] for entry in done["logprobs"]] == tokens
