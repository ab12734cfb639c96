"""Every image example of the hosted APIs this server reproduces (the Animus vision guide and
media-completions reference, the AI/ML API vision pages, a router-style VLM guide: the "seed"
examples the README cites) against the real app and lifespan (tiny checkpoint)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server.media.image import pixel_range, visual_tokens
from tests.helpers import MediaServer, data_uri, make_image, make_settings, start_client

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module", params=["tiny_model_dir", "tiny3_model_dir"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """Every seed example against a Qwen2-VL server and a Qwen3-VL one."""
    model_dir: Path = request.getfixturevalue(request.param)
    async for c in start_client(make_settings(model_dir)):
        yield c


ANIMUS_MODEL = "animuslabs/Qwen2-VL-NSFW-Vision-1.2"
WIKIMEDIA_PATH = (
    "/wikipedia/commons/thumb/d/dd/Gfp-wisconsin-madison-the-nature-boardwalk.jpg/"
    "2560px-Gfp-wisconsin-madison-the-nature-boardwalk.jpg"
)


def image_tokens_at(client: httpx.AsyncClient, width: int, height: int) -> int:
    """Visual tokens of a width x height image at "auto" detail on this server's family (one
    token per 28 x 28 pixels on Qwen2-VL, 32 x 32 on Qwen3-VL)."""
    media = client.app.state.services.chat.media  # type: ignore[attr-defined]
    side = media.token_side
    # (the checkpoint's smallest image too: Qwen3-VL's processor enlarges a small one)
    pixels = pixel_range("auto", media.model_max_pixels, side, media.model_min_pixels, (None, None))
    return visual_tokens((width, height), pixels, side)


def image_message(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def image_part(url: str, detail: str | None = None) -> dict:
    image_url = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": image_url}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def assert_chat_completion(body: dict, model: str) -> None:
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == model
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    assert "stop_reason" in choice
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    details = usage["prompt_tokens_details"]
    assert details["image_tokens"] + details["text_tokens"] == usage["prompt_tokens"]


async def test_seed_001_base64_on_media_completions(client: httpx.AsyncClient) -> None:
    body = {
        "messages": image_message(
            text_part("What is in this image?"), image_part(data_uri(make_image()))
        ),
        "model": ANIMUS_MODEL,
        "temperature": 0.1,
    }
    response = await client.post("/v2/media/completions", json=body)
    assert response.status_code == 200, response.text
    assert_chat_completion(response.json(), ANIMUS_MODEL)
    assert response.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
    # the reference's message holds a tool_calls array (vLLM's []); /v1's is OpenAI's null
    assert response.json()["choices"][0]["message"]["tool_calls"] == []
    del body["model"], body["temperature"]
    v1 = await client.post("/v1/chat/completions", json={**body, "max_tokens": 2})
    assert v1.json()["choices"][0]["message"]["tool_calls"] is None


async def test_seed_001_image_url_on_media_completions(
    client: httpx.AsyncClient, media_server: MediaServer
) -> None:
    url = media_server.add("/image.jpg", make_image(400, 300))
    body = {
        "messages": image_message(
            image_part(url), text_part("Generate a detailed description for this image")
        ),
        "model": ANIMUS_MODEL,
        "temperature": 0.1,
    }
    response = await client.post("/v2/media/completions", json=body)
    assert response.status_code == 200, response.text
    assert_chat_completion(response.json(), ANIMUS_MODEL)


async def test_media_completions_temperature_defaults_to_0_1(client: httpx.AsyncClient) -> None:
    def body(**extra: object) -> dict:
        messages = image_message(text_part("Describe it."), image_part(data_uri(make_image())))
        return {"messages": messages, "model": ANIMUS_MODEL, "seed": 7, **extra}

    async def content(**extra: object) -> str:
        response = await client.post("/v2/media/completions", json=body(**extra))
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    default = await content()
    assert default == await content(temperature=0.1)
    assert default != await content(temperature=1.0)


async def test_seed_002_two_images_and_max_tokens(
    client: httpx.AsyncClient, media_server: MediaServer
) -> None:
    url = media_server.add(WIKIMEDIA_PATH, make_image(512, 341))
    one = {
        "model": "gpt-4o",
        "messages": image_message(text_part("What’s in this image?"), image_part(url)),
        "max_tokens": 300,
    }
    two = {
        "model": "gpt-4o",
        "messages": image_message(
            text_part("What are in these images? Is there any difference between them?"),
            image_part(url),
            image_part(url),
        ),
        "max_tokens": 300,
    }
    first = await client.post("/chat/completions", json=one)
    second = await client.post("/chat/completions", json=two)
    assert first.status_code == 200 and second.status_code == 200, second.text
    for response in (first, second):
        assert_chat_completion(response.json(), "gpt-4o")
        assert response.json()["usage"]["completion_tokens"] <= 300
    image_tokens = [
        r.json()["usage"]["prompt_tokens_details"]["image_tokens"] for r in (first, second)
    ]
    assert image_tokens[1] == 2 * image_tokens[0]


async def test_seed_002_base64_image(client: httpx.AsyncClient) -> None:
    body = {
        "model": "gpt-4o",
        "messages": image_message(
            text_part("What’s in this image?"), image_part(data_uri(make_image(300, 200)))
        ),
        "max_tokens": 300,
    }
    response = await client.post("/chat/completions", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert_chat_completion(result, "gpt-4o")
    assert result["usage"]["completion_tokens"] <= 300
    # the decoded image reached the model, at its own size
    assert result["usage"]["prompt_tokens_details"]["image_tokens"] == image_tokens_at(
        client, 300, 200
    )


async def test_seed_003_usage_details_on_v1(client: httpx.AsyncClient) -> None:
    # 640x480 -> smart_resize -> 644x476 -> (644/28) * (476/28) = 23 * 17 = 391 image tokens.
    body = {
        "model": "tiny",
        "messages": image_message(
            text_part("Describe the content of this image."),
            image_part(data_uri(make_image(640, 480))),
        ),
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert_chat_completion(result, "tiny")
    # the seed's message: reasoning_content "" on an answer without reasoning (vLLM's newer
    # reasoning field stays null)
    message = result["choices"][0]["message"]
    assert message["reasoning_content"] == "" and message["reasoning"] is None
    # 640x480 -> 644x476 on Qwen2-VL: 23 * 17 = 391 tokens (Qwen3-VL: 20 * 15 = 300)
    expected = image_tokens_at(client, 640, 480)
    assert expected in (391, 300)
    assert result["usage"]["prompt_tokens_details"]["image_tokens"] == expected
    assert result["usage"]["completion_tokens"] <= 16  # the test server's default max_tokens


async def test_seed_004_detail_low_costs_fewer_image_tokens(client: httpx.AsyncClient) -> None:
    image = data_uri(make_image(1024, 768))

    async def image_tokens(detail: str) -> int:
        body = {
            "model": "tiny",
            "messages": image_message(
                image_part(image, detail), text_part("What text content is in the image?")
            ),
            "max_tokens": 4,
        }
        response = await client.post("/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["image_tokens"]

    low, auto, high = [await image_tokens(d) for d in ("low", "auto", "high")]
    assert low <= 256 < high
    # 1024x768 -> 1036x756 at full resolution: 37 * 27 = 999 tokens, within auto's 1280
    # (Qwen3-VL: 32 * 24 = 768).
    expected = image_tokens_at(client, 1024, 768)
    assert expected in (999, 768)
    assert high == auto == expected


async def test_seed_004_multi_image_url_and_base64(
    client: httpx.AsyncClient, media_server: MediaServer
) -> None:
    url = media_server.add("/product1.png", make_image(200, 200, fmt="PNG"), "image/png")
    body = {
        "model": "tiny",
        "messages": image_message(
            image_part(url),
            image_part(data_uri(make_image(200, 200, seed=1))),
            text_part("Compare the common features of these two images."),
        ),
    }
    response = await client.post("/chat/completions", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert_chat_completion(result, "tiny")
    # both images, the fetched one and the inline one, each at its own size
    assert result["usage"]["prompt_tokens_details"]["image_tokens"] == 2 * image_tokens_at(
        client, 200, 200
    )


async def stream_chunks(client: httpx.AsyncClient, body: dict) -> list[dict]:
    chunks = []
    async with client.stream("POST", "/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                chunks.append({"done": True})
            else:
                chunks.append(json.loads(line.removeprefix("data: ")))
    return chunks


async def test_seed_004_stream_equals_non_stream(client: httpx.AsyncClient) -> None:
    body = {
        "model": "tiny",
        "messages": image_message(
            image_part(data_uri(make_image())), text_part("Describe the main buildings.")
        ),
        "max_tokens": 12,
        "temperature": 0,
    }
    full = (await client.post("/chat/completions", json=body)).json()
    chunks = await stream_chunks(
        client, {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert chunks[-1] == {"done": True}
    first = chunks[0]["choices"][0]
    assert first["delta"]["role"] == "assistant"
    assert first["finish_reason"] is None and first["logprobs"] is None  # present, as OpenAI's
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2] if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    final_choice = chunks[-3]["choices"][0]
    assert final_choice["finish_reason"] == full["choices"][0]["finish_reason"]
    assert chunks[-2]["choices"] == []
    # The streamed request repeats the first: its prompt prefix comes from the prefix cache.
    streamed_usage = chunks[-2]["usage"]
    cached = streamed_usage["prompt_tokens_details"].pop("cached_tokens")
    assert cached > full["usage"]["prompt_tokens_details"].pop("cached_tokens")
    assert streamed_usage == full["usage"]


async def test_greedy_output_is_reproducible(client: httpx.AsyncClient) -> None:
    body = {
        "model": "tiny",
        "messages": image_message(image_part(data_uri(make_image())), text_part("Hello")),
        "max_tokens": 16,
        "temperature": 0,
    }
    contents = set()
    for _ in range(3):
        response = await client.post("/v1/chat/completions", json=body)
        contents.add(response.json()["choices"][0]["message"]["content"])
    assert len(contents) == 1


async def test_text_only_system_and_multi_turn(client: httpx.AsyncClient) -> None:
    body = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [text_part("And now?")]},
        ],
        "max_completion_tokens": 5,
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens_details"]["image_tokens"] == 0
    assert usage["completion_tokens"] <= 5


async def test_models_and_health(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [ANIMUS_MODEL, "gpt-4o", "tiny"]
    assert (await client.get("/health")).json()["status"] == "ok"
