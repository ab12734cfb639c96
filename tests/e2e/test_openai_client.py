"""A real `vlm-server serve --model tiny` process, called with the official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.helpers import data_uri, make_image, make_settings, server_process, start_client

pytestmark = pytest.mark.slow

MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_uri(make_image(300, 200))}},
            {"type": "text", "text": "Describe the main buildings in the image."},
        ],
    }
]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models_dir = tmp_path_factory.mktemp("e2e-models")
    log = tmp_path_factory.mktemp("e2e-log") / "server.log"
    args = [
        "--model",
        "tiny",
        "--models-dir",
        str(models_dir),
        "--served-model-name",
        "tiny",
        "--served-model-name",
        "qwen/qwen2.5-vl-72b-instruct",
        "--default-max-tokens",
        "16",
    ]
    with server_process(log, *args) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def test_chat_completion_with_image(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert response.object == "chat.completion"
    choice = response.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 8
    details = response.usage.prompt_tokens_details
    assert details.image_tokens > 0  # our field, kept by the SDK as an extra
    assert details.image_tokens + details.text_tokens == response.usage.prompt_tokens


def test_streaming_through_the_sdk_matches_non_streaming(client: openai.OpenAI) -> None:
    model = "qwen/qwen2.5-vl-72b-instruct"  # seed 004's name, served as an alias
    full = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0)
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish_reason, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish_reason = choice.finish_reason or finish_reason
    assert "".join(pieces) == full.choices[0].message.content
    assert finish_reason == full.choices[0].finish_reason
    assert usage is not None and usage.total_tokens == full.usage.total_tokens


def test_sdk_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert not_found.value.body["code"] == "model_not_found"
    bad_image = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
        }
    ]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=bad_image)
    assert bad.value.body["param"] == "messages[0].content[0]"
    assert [m.id for m in client.models.list()] == ["tiny", "qwen/qwen2.5-vl-72b-instruct"]
    # models.retrieve with a hub-style id (a slash in the path)
    assert (
        client.models.retrieve("qwen/qwen2.5-vl-72b-instruct").id == "qwen/qwen2.5-vl-72b-instruct"
    )
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("Qwen/Qwen2-VL-2B-Instruct")


@pytest.mark.anyio
async def test_greedy_output_is_the_same_across_processes(
    client: openai.OpenAI, tiny_model_dir: Path
) -> None:
    """The server process built its own tiny checkpoint; same bytes, so the same answer."""
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    remote = client.chat.completions.create(**body).choices[0].message.content
    async for local in start_client(make_settings(tiny_model_dir)):
        response = await local.post("/v1/chat/completions", json=body)
        assert response.json()["choices"][0]["message"]["content"] == remote


def test_text_completions_through_the_sdk(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model="tiny", prompt=["Once upon", "a time"], max_tokens=4, temperature=0
    )
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage is not None and completion.usage.completion_tokens <= 8
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model="tiny", prompt="Once upon", max_tokens=4, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert streamed == completion.choices[0].text


def test_logprobs_n_and_a_named_tool_through_the_sdk(client: openai.OpenAI) -> None:
    """Issue 12's surface on a real server process: n choices with logprobs, each a call of the
    named function whose arguments parse (constrained decoding)."""
    tool = {
        "type": "function",
        "function": {
            "name": "describe",
            "parameters": {
                "type": "object",
                "properties": {"mood": {"type": "string", "enum": ["calm", "busy"]}},
                "required": ["mood"],
                "additionalProperties": False,
            },
        },
    }
    response = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "describe"}},
        n=2,
        seed=9,
        logprobs=True,
        top_logprobs=2,
        max_tokens=64,
    )
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        assert choice.finish_reason == "stop"  # a named choice: OpenAI's stop
        (call,) = choice.message.tool_calls
        assert call.function.name == "describe"
        assert json.loads(call.function.arguments)["mood"] in ("calm", "busy")
        assert all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)
    assert response.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in response.choices
    )
