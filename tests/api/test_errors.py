"""Bad inputs: each gets a 4xx in OpenAI's error envelope, and the server keeps serving."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import socket
from pathlib import Path

import httpx
import openai
import pytest

from server.engine.request_limits import CONTEXTS_TOKENIZED
from server.exceptions import InvalidRequest
from server.pipelines.loopback import post_scope
from tests.helpers import MediaServer, data_uri, make_image, make_settings, start_client
from tests.media.test_image import png_header_only

pytestmark = pytest.mark.anyio


def user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "What is this?"}


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/image.jpg"


def assert_error(response: httpx.Response, status: int, param: str | None = None, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


BAD_BODIES = {
    "invalid base64": (
        {"model": "tiny", "messages": user(TEXT, image("data:image/png;base64,@@not base64@@"))},
        "messages[0].content[1]",
        "invalid_media",
    ),
    "non-image data URI": (
        {"model": "tiny", "messages": user(image("data:text/plain;base64,aGVsbG8="))},
        "messages[0].content[0]",
        "invalid_media",
    ),
    "image data URI with non-image bytes": (
        {"model": "tiny", "messages": user(image("data:image/png;base64,aGVsbG8gd29ybGQ="))},
        "messages[0].content[0]",
        "invalid_media",
    ),
    "unsupported URL scheme": (
        {"model": "tiny", "messages": user(image("ftp://example.com/a.png"))},
        "messages[0].content[0]",
        "media_url_not_allowed",
    ),
    "unknown part type": (
        {"model": "tiny", "messages": user({"type": "hologram", "hologram": {}})},
        "messages[0].content[0]",
        "invalid_value",
    ),
    "a media placeholder spelled across two text parts": (
        {
            "model": "tiny",
            "messages": user(
                {"type": "text", "text": "<|image_"}, {"type": "text", "text": "pad|>"}
            ),
        },
        "messages",
        "invalid_value",
    ),
    "a lone surrogate escaped inside a tool call's arguments": (
        {
            "model": "tiny",
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": "\\ud800"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
            ],
        },
        "messages[1].tool_calls[0].function.arguments",
        "invalid_value",
    ),
    "part without a type": (  # (a lone image_url, video_url, DashScope's items are typed)
        {"model": "tiny", "messages": user({"text": "Hi", "audio": "x"})},
        "messages[0].content[0]",
        "invalid_value",
    ),
    "video part with a URL that is not one": (
        {"model": "tiny", "messages": user({"type": "video_url", "video_url": {"url": "x"}})},
        "messages[0].content[0]",
        "media_url_not_allowed",
    ),
    "non-video data URI in a video part": (
        {
            "model": "tiny",
            "messages": user(
                {"type": "video_url", "video_url": {"url": "data:image/png;base64,aGk="}}
            ),
        },
        "messages[0].content[0]",
        "invalid_media",
    ),
    "image in an assistant message": (
        {
            "model": "tiny",
            "messages": [
                {"role": "assistant", "content": [image(data_uri(make_image()))]},
                {"role": "user", "content": "hi"},
            ],
        },
        "messages[0].content[0]",
        "unsupported_content",
    ),
    "empty messages": ({"model": "tiny", "messages": []}, "messages", "invalid_value"),
    "missing messages": ({"model": "tiny"}, "messages", "missing_required_parameter"),
    "messages of the wrong type": ({"model": "tiny", "messages": "hi"}, "messages", None),
    "max_tokens of the wrong type": (
        {"model": "tiny", "messages": user(TEXT), "max_tokens": "many"},
        "max_tokens",
        "invalid_value",
    ),
    "temperature out of range": (
        {"model": "tiny", "messages": user(TEXT), "temperature": 5},
        "temperature",
        "invalid_value",
    ),
    "unknown role": (
        {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]},
        "messages[0].role",
        "invalid_value",
    ),
    "unknown field": (
        {"model": "tiny", "messages": user(TEXT), "frobnicate": True},
        "frobnicate",
        "unknown_parameter",
    ),
    "n above --max-n": (
        {"model": "tiny", "messages": user(TEXT), "n": 9},
        "n",
        "invalid_value",
    ),
    "a tool without its function": (
        {"model": "tiny", "messages": user(TEXT), "tools": [{"type": "function"}]},
        "tools[0].function",
        "missing_required_parameter",
    ),
    "top_logprobs without logprobs": (
        {"model": "tiny", "messages": user(TEXT), "top_logprobs": 2},
        "top_logprobs",
        "invalid_value",
    ),
    "logit_bias with a key that is not a token id": (
        {"model": "tiny", "messages": user(TEXT), "logit_bias": {"five": 1.0}},
        "logit_bias",
        "invalid_value",
    ),
    "response_format json_schema without a schema": (
        {"model": "tiny", "messages": user(TEXT), "response_format": {"type": "json_schema"}},
        "response_format.json_schema",
        "invalid_value",
    ),
    "response_format with a schema that cannot compile": (
        {
            "model": "tiny",
            "messages": user(TEXT),
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "no-such-type"}},
            },
        },
        "response_format",
        "invalid_schema",
    ),
    "stream_options without stream": (
        {"model": "tiny", "messages": user(TEXT), "stream_options": {"include_usage": True}},
        "stream_options",
        None,
    ),
    "seed as a float": (
        {"model": "tiny", "messages": user(TEXT), "seed": 1.5},
        "seed",
        "invalid_value",
    ),
    "ignore_eos as a number": (
        {"model": "tiny", "messages": user(TEXT), "ignore_eos": 0},
        "ignore_eos",
        "invalid_value",
    ),
    "user message without content": (
        {"model": "tiny", "messages": [{"role": "user"}]},
        "messages[0]",
        "invalid_value",
    ),
    "empty content array": (
        {"model": "tiny", "messages": [{"role": "user", "content": []}]},
        "messages[0]",
        "invalid_value",
    ),
    "tool message answering no call": (
        {
            "model": "tiny",
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "tool", "content": "42"},
            ],
        },
        "messages[1].role",
        "invalid_value",
    ),
    "lone surrogate in text": (
        {"model": "tiny", "messages": [{"role": "user", "content": "\ud83d"}]},
        "messages[0].content",
        "invalid_value",
    ),
    "stop string too long": (
        {"model": "tiny", "messages": user(TEXT), "stop": "x" * 1000},
        "stop",
        "invalid_value",
    ),
    "stream as a string": (
        {"model": "tiny", "messages": user(TEXT), "stream": "yes"},
        "stream",
        "invalid_value",
    ),
    "negative stop token id": (
        {"model": "tiny", "messages": user(TEXT), "stop_token_ids": [-1]},
        "stop_token_ids[0]",
        "invalid_value",
    ),
    "malformed URL": (
        {"model": "tiny", "messages": user(image("http://[::1"))},
        "messages[0].content[0]",
        "media_fetch_failed",
    ),
    "decompression bomb": (
        {
            "model": "tiny",
            "messages": user(image(data_uri(png_header_only(60_000, 60_000), "image/png"))),
        },
        "messages[0].content[0]",
        "image_too_large",
    ),
    "max_tokens beyond the context": (
        {"model": "tiny", "messages": user(TEXT), "max_tokens": 10_000_000},
        "max_tokens",
        "context_length_exceeded",
    ),
}


@pytest.mark.parametrize("name", BAD_BODIES)
async def test_bad_body_gets_400(client: httpx.AsyncClient, name: str) -> None:
    body, param, code = BAD_BODIES[name]
    # json.dumps escapes non-ASCII, so a lone surrogate travels as the JSON text "\ud83d".
    response = await client.post(
        "/v1/chat/completions",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
    )
    error = assert_error(response, 400, param, code)
    assert "discriminator" not in error["message"]  # pydantic's words, not the client's
    assert (await client.get("/health")).status_code == 200


LONE = "\ud83d"  # json.dumps writes it as the escape a client sends
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
LONE_SURROGATES = {
    "tokenize prompt": ("/tokenize", {"model": "tiny", "prompt": LONE}, "prompt"),
    "tool description": (
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": user(TEXT),
            "tools": [{**TOOL, "function": {**TOOL["function"], "description": LONE}}],
        },
        "tools[0].function.description",
    ),
    "tool call arguments": (
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": "' + LONE + '"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c", "content": "ok"},
            ],
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    "responses metadata": (
        "/v1/responses",
        {"model": "tiny", "input": "x", "metadata": {"k": LONE}},
        "metadata.k",
    ),
    "metadata key": (
        "/v1/responses",
        {"model": "tiny", "input": "x", "user": "u", "metadata": {LONE: "v"}},
        "metadata",
    ),
    "conversation metadata": ("/v1/conversations", {"metadata": {"k": LONE}}, "metadata.k"),
    "batch metadata": (
        "/v1/batches",
        {
            "input_file_id": "file-x",
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"k": LONE},
        },
        "metadata.k",
    ),
    "messages tool description": (
        "/v1/messages",
        {
            "model": "tiny",
            "max_tokens": 3,
            "messages": user(TEXT),
            "tools": [{"name": "f", "description": LONE, "input_schema": {"type": "object"}}],
        },
        "tools[0].description",
    ),
}


async def test_a_large_body_is_parsed_off_the_event_loop(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """json.loads held the event loop (every stream, /health) 2 s for a 171 MB body: a body
    over 1 MiB is parsed on a worker thread; a bad one is the same 400 as before."""
    import threading

    from server.api import body as body_module

    threads: list[str] = []
    real = body_module.json.loads

    def loads(text: bytes, **options: object) -> object:
        threads.append(threading.current_thread().name)
        return real(text, **options)

    monkeypatch.setattr(body_module.json, "loads", loads)
    big = {"model": "tiny", "max_tokens": 1, "messages": user(TEXT), "user": "x" * (1 << 20)}
    small = {"model": "tiny", "max_tokens": 1, "messages": user(TEXT)}
    for body in (big, small):
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
    loop_thread = threading.current_thread().name
    assert threads[0] != loop_thread and threads[1] == loop_thread
    broken = b'{"model": "tiny", "messages": [' + b" " * (1 << 20)
    response = await client.post(
        "/v1/chat/completions", content=broken, headers={"content-type": "application/json"}
    )
    assert_error(response, 400)
    # the lone-surrogate check too: its regex read a 300 MB body holding one escaped emoji
    # for 6 s on the event loop
    checked: list[str] = []
    real_check = body_module._escapes_surrogate

    def escapes(body: bytes) -> bool:
        checked.append(threading.current_thread().name)
        return real_check(body)

    monkeypatch.setattr(body_module, "_escapes_surrogate", escapes)
    for padding in (1 << 20, 0):
        raw = b'{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": '
        raw += rb'"\ud83d\ude00"}], "user": "' + b"x" * padding + b'"}'
        response = await client.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 200, response.text
    assert checked[0] != loop_thread and checked[1] == loop_thread


@pytest.mark.parametrize("name", LONE_SURROGATES)
async def test_a_lone_surrogate_anywhere_is_a_400(client: httpx.AsyncClient, name: str) -> None:
    """Not text (a JavaScript client cut a string inside an emoji): a 400 naming the field,
    wherever it is, never a 500 from whatever could not encode it."""
    path, body, param = LONE_SURROGATES[name]
    headers = {"content-type": "application/json"}
    response = await client.post(path, content=json.dumps(body), headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f"at {param}:" in error["message"] and "lone surrogate" in error["message"], error
    if path == "/v1/messages":
        assert response.json()["type"] == "error"  # Anthropic's envelope names no param
    else:
        assert error["param"] == param
    # an emoji sent as its two escapes is text
    paired = json.dumps(body).replace(json.dumps(LONE)[1:-1], json.dumps("\U0001f600")[1:-1])
    response = await client.post(path, content=paired, headers=headers)
    assert "lone surrogate" not in response.text


async def test_a_route_without_a_body_does_not_read_one(client: httpx.AsyncClient) -> None:
    """A cancel takes no body: a broken one, a lone surrogate in one, is not read (the
    surrogate check only looks at bodies the route reads)."""
    for sent in (b'{"a": "\\ud83d', json.dumps({"a": LONE}).encode()):
        response = await client.post("/v1/responses/resp_nope/cancel", content=sent)
        assert response.status_code == 404, response.text
        response = await client.post("/v1/batches/batch_nope/cancel", content=sent)
        assert response.status_code == 404, response.text


async def test_a_trailing_slash_is_served_not_redirected(client: httpx.AsyncClient) -> None:
    """A base URL ending in a slash: the route answers (no 307 to send the POST again)."""
    body = {"model": "tiny", "messages": user(TEXT), "max_tokens": 2}
    response = await client.post("/v1/chat/completions/", json=body)
    assert response.status_code == 200, response.text
    assert (await client.get("/v1/models/")).json()["object"] == "list"
    assert (await client.get("/health//")).status_code == 200
    assert_error(await client.get("/v1/nowhere/"), 404)


async def test_the_openai_sdk_with_the_server_itself_as_base_url(
    client: httpx.AsyncClient,
) -> None:
    """The README's seed-002 client (base_url the server, not .../v1) is served on every
    OpenAI resource, as the hosted APIs serve both: its models.list() and completions were
    404s while its chat worked. Endpoints with no model here (embeddings) say so."""
    sdk = openai.AsyncOpenAI(
        base_url="http://testserver", api_key="-", http_client=client, max_retries=0
    )
    assert [m.id for m in (await sdk.models.list()).data]
    assert (await sdk.models.retrieve("tiny")).id == "tiny"
    chat = await sdk.chat.completions.create(model="tiny", messages=user(TEXT), max_tokens=2)
    assert chat.choices[0].message.role == "assistant"
    completion = await sdk.completions.create(model="tiny", prompt="Hi", max_tokens=2)
    assert completion.choices[0].text is not None
    response = await sdk.responses.create(model="tiny", input="Hi", max_output_tokens=2)
    assert (await sdk.responses.retrieve(response.id)).id == response.id
    assert (await client.get("/files")).json()["object"] == "list"
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.embeddings.create(model="tiny", input="Hi")
    assert "no embeddings endpoint" in missing.value.body["message"]  # type: ignore[index]
    assert (await client.get("/health")).status_code == 200  # (the server's own, unchanged)


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions", json={"model": "nope/nope", "messages": user(TEXT)}
    )
    error = assert_error(response, 404, "model", "model_not_found")
    assert "nope/nope" in error["message"]


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert_error(response, 400, None, "invalid_json")
    # NaN and Infinity are not JSON (Python's json.loads reads them; a NaN temperature was
    # refused as a temperature out of range)
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        content = b'{"model": "tiny", "temperature": ' + constant + b', "messages": []}'
        for path in ("/v1/chat/completions", "/v1/messages"):
            response = await client.post(
                path, content=content, headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, response.text
            assert "temperature" not in response.text and "JSON" in response.text, response.text


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',  # not UTF-8
        '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}'.encode("utf-16"),
        '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}'.encode("utf-32-le"),
        b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "tiny", "seed": ' + b"9" * 5000 + b"}",  # past Python's digit limit
    ],
)
async def test_a_body_json_cannot_read_is_invalid_json(
    client: httpx.AsyncClient, content: bytes
) -> None:
    """(json.loads fails on these with other errors than a syntax error: FastAPI's generic
    "error parsing the body" was a 400 without a code.)"""
    for path in ("/v1/chat/completions", "/v1/responses"):
        headers = {"content-type": "application/json"}
        error = assert_error(await client.post(path, content=content, headers=headers), 400)
        assert error["code"] == "invalid_json" and "UTF-8" in error["message"]
    response = await client.post("/v1/messages", content=content, headers=headers)
    assert response.status_code == 400 and response.json()["type"] == "error"


async def test_a_compressed_body_says_to_send_it_uncompressed(client: httpx.AsyncClient) -> None:
    body = gzip.compress(json.dumps({"model": "tiny", "messages": user(TEXT)}).encode())
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    response = await client.post("/v1/chat/completions", content=body, headers=headers)
    error = assert_error(response, 400, None, "invalid_json")
    assert "Content-Encoding gzip" in error["message"]


async def test_unreachable_url(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "messages": user(TEXT, image(closed_port_url()))}
    response = await client.post("/v1/chat/completions", json=body)
    error = assert_error(response, 400, "messages[0].content[1]", "media_fetch_failed")
    assert "messages[0].content[1]" in error["message"]


async def test_of_several_bad_images_the_first_is_named(
    client: httpx.AsyncClient, media_server: MediaServer
) -> None:
    """Images are fetched together, but the error names the first bad one in the request, not
    whichever failed soonest; except that an inline image that cannot be read is named before
    any URL is fetched (its 400 need not wait for a slow host)."""
    missing = media_server.url("/missing.jpg")
    broken = "data:image/png;base64,!!"
    also_broken = "data:image/png;base64,@@"
    body = {"model": "tiny", "messages": user(TEXT, image(also_broken), image(broken))}
    for _ in range(3):
        response = await client.post("/v1/chat/completions", json=body)
        assert_error(response, 400, "messages[0].content[1]")
    fetched = len(media_server.requested)
    body = {"model": "tiny", "messages": user(TEXT, image(missing), image(broken))}
    for _ in range(3):
        response = await client.post("/v1/chat/completions", json=body)
        assert_error(response, 400, "messages[0].content[2]")
    assert len(media_server.requested) == fetched  # (nothing fetched beside the broken one)


async def test_url_answering_404(client: httpx.AsyncClient, media_server: MediaServer) -> None:
    body = {"model": "tiny", "messages": user(image(media_server.url("/missing.jpg")))}
    response = await client.post("/chat/completions", json=body)
    error = assert_error(response, 400, "messages[0].content[0]", "media_fetch_failed")
    assert "404" in error["message"]


async def test_url_with_non_image_bytes(client: httpx.AsyncClient, media_server: MediaServer):
    url = media_server.add("/fake.jpg", b"<html>not an image</html>", "text/html")
    response = await client.post(
        "/chat/completions", json={"model": "tiny", "messages": user(image(url))}
    )
    assert_error(response, 400, "messages[0].content[0]", "invalid_media")


async def test_truncated_jpeg(client: httpx.AsyncClient) -> None:
    truncated = make_image(320, 240)[:300]
    body = {"model": "tiny", "messages": user(image(data_uri(truncated)))}
    response = await client.post("/chat/completions", json=body)
    assert_error(response, 400, "messages[0].content[0]", "invalid_media")


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing-here"), 404)
    wrong = await client.get("/v1/completions")
    error = assert_error(wrong, 405, code="method_not_allowed")
    assert error["message"] == "Invalid method for URL (GET /v1/completions); it takes POST."
    assert wrong.headers["allow"] == "POST"


async def test_a_missing_required_field_is_named_as_openai_names_it(
    client: httpx.AsyncClient,
) -> None:
    for path, body, param in [
        ("/v1/chat/completions", {"model": "tiny"}, "messages"),
        ("/v1/completions", {"model": "tiny"}, "prompt"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"content": "hi"}]},
            "messages[0].role",
        ),
        ("/v2/media/categories", {"model": "tiny"}, "media_url"),
        # (required by the Animus reference here; categories may leave it out)
        ("/v2/media/completions", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ]:
        response = await client.post(path, json=body)
        error = assert_error(response, 400, param, "missing_required_parameter")
        assert error["message"] == f"Missing required parameter: '{param}'."


async def test_stream_request_errors_before_streaming(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "stream": True, "messages": user(image("data:image/png;base64,!!"))}
    response = await client.post("/v1/chat/completions", json=body)
    assert_error(response, 400, "messages[0].content[0]")


async def test_api_keys(tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir, api_keys=["sk-one", "sk-two"])
    body = {"model": "tiny", "messages": user(TEXT), "max_tokens": 2}
    async for client in start_client(settings):
        assert_error(await client.post("/v1/chat/completions", json=body), 401)
        assert_error(await client.get("/v1/models"), 401)
        wrong = {"Authorization": "Bearer sk-three"}
        assert_error(await client.post("/v1/chat/completions", json=body, headers=wrong), 401)
        ok = await client.post(
            "/v2/media/completions", json=body, headers={"Authorization": "Bearer sk-two"}
        )
        assert ok.status_code == 200
        assert (await client.get("/health")).status_code == 200


async def test_too_many_images(tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir, max_images_per_request=2)
    small = image(data_uri(make_image(56, 56)))
    async for client in start_client(settings):
        response = await client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": user(small, small, small)}
        )
        assert_error(response, 400, "messages", "too_many_images")


async def test_image_over_byte_cap(tiny_model_dir: Path, media_server: MediaServer) -> None:
    big = make_image(800, 800, fmt="PNG")
    url = media_server.add("/big.png", big, "image/png")
    settings = make_settings(tiny_model_dir, max_image_bytes=len(big) // 2)
    async for client in start_client(settings):
        for part in (image(url), image(data_uri(big, "image/png"))):
            response = await client.post(
                "/v1/chat/completions", json={"model": "tiny", "messages": user(part)}
            )
            assert_error(response, 400, "messages[0].content[0]", "media_too_large")


async def test_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    """A client's trace id as it sent it (UUIDs, base64, paths); one with a space or past 256
    characters is replaced by the server's own."""
    for given in ("abc-123", "tenant/abc:123", "Zm9vYmFy+/==", "x" * 256):
        response = await client.get("/health", headers={"X-Request-ID": given})
        assert response.headers["x-request-id"] == given
    for refused in ("abc def", "x" * 257, ""):
        response = await client.get("/health", headers={"X-Request-ID": refused})
        assert len(response.headers["x-request-id"]) == 32
    assert len((await client.get("/health")).headers["x-request-id"]) == 32


async def test_any_integer_seed_is_folded_into_64_bits(client: httpx.AsyncClient) -> None:
    async def content(seed: int) -> str:
        body = {"model": "tiny", "messages": user(TEXT), "seed": seed, "max_tokens": 8}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    assert await content(2**70 + 5) == await content(5)
    assert await content(-1) == await content(2**64 - 1)


async def test_media_budget_per_request(tiny_model_dir: Path) -> None:
    png = make_image(300, 300, fmt="PNG")
    settings = make_settings(tiny_model_dir, max_media_bytes_per_request=int(len(png) * 2.5))
    part = image(data_uri(png, "image/png"))
    async for client in start_client(settings):
        ok = await client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": user(part, part)}
        )
        assert ok.status_code == 200
        response = await client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": user(part, part, part)}
        )
        assert_error(response, 400, None, "media_budget_exceeded")


async def test_unknown_keys_inside_messages_and_parts_are_ignored(client) -> None:
    """SGLang clients put "modalities" on image parts, vLLM's "uuid" sits in image_url; both
    are ignored as those servers do. Unknown top-level fields stay a 400 naming the field."""
    image = {
        "type": "image_url",
        "image_url": {"url": data_uri(make_image()), "uuid": "img-1"},
        "modalities": "multi-images",
    }
    message = {"role": "user", "content": [image, {"type": "text", "text": "Hi"}], "x": 1}
    body = {"model": "tiny", "messages": [message], "max_tokens": 2}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    response = await client.post("/v1/chat/completions", json={**body, "surprise": 1})
    assert_error(response, 400, "surprise", "unknown_parameter")


async def test_param_paths_inside_parts_name_the_field_once(client) -> None:
    image = {"type": "image_url", "image_url": {"url": data_uri(make_image()), "detail": "ultra"}}
    body = {"model": "tiny", "messages": [{"role": "user", "content": [image]}]}
    response = await client.post("/v1/chat/completions", json=body)
    assert_error(response, 400, "messages[0].content[0].image_url.detail", "invalid_value")


async def test_a_value_of_no_accepted_type_names_every_accepted_one(client) -> None:
    """content as one part object (not in a list): "a valid string" alone hid the list."""
    part = {"type": "text", "text": "x"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": part}]}
    error = assert_error(await client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages[0].content", error
    assert "a valid string or a valid list" in error["message"], error
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tool_choice": 5}
    error = assert_error(await client.post("/v1/chat/completions", json=body), 400)
    assert "'none', 'auto' or 'required' or an object" in error["message"], error
    assert "Choice" not in error["message"]  # (no class names)


async def test_unsupported_message_fields_are_refused_by_name(client) -> None:
    call = {"name": "f", "arguments": "{}"}
    message = {"role": "assistant", "content": None, "function_call": call}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}, message]}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and "function_call" in response.json()["error"]["message"]


async def test_bad_json_schema_error_has_no_library_internals(client) -> None:
    schema = {"name": "x", "schema": {"type": "object", "properties": "not-an-object"}}
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_schema", "json_schema": schema},
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert ".cc:" not in message and "/project" not in message and not message.startswith("[")


async def test_models_retrieve_with_a_slash_in_the_id(client) -> None:
    response = await client.get("/v1/models/animuslabs/Qwen2-VL-NSFW-Vision-1.2")
    assert response.status_code == 200, response.text
    card = response.json()
    assert card["id"] == "animuslabs/Qwen2-VL-NSFW-Vision-1.2" and card["object"] == "model"
    assert_error(await client.get("/v1/models/Qwen/nope"), 404, "model", "model_not_found")


async def test_an_unknown_route_is_a_404_in_the_paths_envelope(client: httpx.AsyncClient) -> None:
    """OpenAI's type for it is invalid_request_error (as for every 404 here); under the
    Messages API's paths, Anthropic's not_found_error."""
    error = assert_error(await client.post("/v1/nope", json={}), 404)
    assert error["type"] == "invalid_request_error" and "POST /v1/nope" in error["message"]
    response = await client.post("/v1/messages/nope", json={})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(("budget_gib", "alone"), [(1e-6, True), (1.0, False)])
async def test_images_past_the_decode_memory_are_decoded_one_at_a_time(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, budget_gib: float, alone: bool
) -> None:
    """--image-decode-memory smaller than one image: each is decoded alone (never two at
    once, across requests), none refused; with room, they are decoded together."""
    import threading
    import time

    from server.pipelines import media_loader

    now, most, lock = [0], [0], threading.Lock()

    def counted(*args: object, **kwargs: object) -> object:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            time.sleep(0.05)  # (long enough for others to start, were they allowed)
            return load_image(*args, **kwargs)
        finally:
            with lock:
                now[0] -= 1

    load_image = media_loader.load_image
    monkeypatch.setattr(media_loader, "load_image", counted)
    settings = make_settings(tiny_model_dir, image_decode_memory=budget_gib)
    parts = [image(data_uri(make_image(64, 64, seed=i))) for i in range(3)]
    body = {"model": "tiny", "messages": user(*parts), "max_tokens": 2}
    async for client in start_client(settings):
        responses = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(3))
        )
        assert [r.status_code for r in responses] == [200] * 3
        loader = client.app.state.services.chat.media  # type: ignore[attr-defined]
        assert loader.decode_memory.free == loader.decode_memory.total
    assert (most[0] == 1) is alone, most


def test_the_least_normalized_size_is_a_bound_found_without_normalizing() -> None:
    """A prompt far past the context is refused on a bound of what NFC leaves (normalizing
    30 MB held the event loop 1.2 s): exact for ASCII, a third of the bytes otherwise (never
    more than NFC leaves: Hangul jamo composed, marks composed), nothing for a normalizer
    not known here."""
    from tokenizers import normalizers

    from server.engine.request_limits import _at_least_normalized_bytes, _normalized_bytes

    nfc = normalizers.NFC()
    for text in (
        "plain ascii " * 50,
        "\u1100\u1161\u11a8" * 40,  # jamo -> one syllable each: a third of the bytes
        "u\u0308\u0301" * 40,
        "\u2126 \u00c5 e\u0301 \U0001d160 \u0958",
        "\u1fbe\u0308\u0301" * 40,  # 7 bytes -> 2: the least ratio NFC has
    ):
        least = _at_least_normalized_bytes(text, nfc)
        assert least <= _normalized_bytes(text, nfc), text
    ascii_text = "x" * 1000
    assert _at_least_normalized_bytes(ascii_text, nfc) == _normalized_bytes(ascii_text, nfc)
    assert _at_least_normalized_bytes(ascii_text, None) == 1000
    assert _at_least_normalized_bytes(ascii_text, normalizers.Lowercase()) == 0


async def test_text_that_cannot_fit_is_refused_before_it_is_tokenized(
    tiny_model_dir: Path,
) -> None:
    """More characters than the context's tokens could hold at the vocabulary's longest token:
    a 400 context_length_exceeded without tokenizing (megabytes took minutes); with
    truncate_prompt_tokens the prompt is cut as asked."""
    settings = make_settings(tiny_model_dir, max_model_len=256)
    async for client in start_client(settings):
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        limit = engine.max_seq_len * engine.limits._longest_token_bytes  # bytes of normalized text
        text = "word " * (limit // 5 + 1)
        body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 2}
        error = assert_error(
            await client.post("/v1/chat/completions", json=body),
            400,
            "messages",
            "context_length_exceeded",
        )
        assert "characters long" in error["message"]
        completion = {"model": "tiny", "prompt": text, "max_tokens": 2}
        response = await client.post("/v1/completions", json=completion)
        assert_error(response, 400, "prompt", "context_length_exceeded")
        cut = await client.post(
            "/v1/completions", json={**completion, "truncate_prompt_tokens": 100}
        )
        assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 100
        # just under the bound: tokenized, and refused by its tokens as before
        # the tokenizer's normalization first: 3 characters that NFC makes one of 2 bytes
        composed = "u\u0308\u0301"
        engine.limits.check_prompt_text(composed * (limit // 3 + 1), "messages")  # 2/3 of the bound
        with pytest.raises(InvalidRequest):
            engine.limits.check_prompt_text(composed * (limit // 2 + 1), "messages")
        body["messages"] = [{"role": "user", "content": "x" * (limit - 50)}]
        error = assert_error(await client.post("/v1/chat/completions", json=body), 400)
        assert error["code"] == "context_length_exceeded" and "characters" not in error["message"]
        # as the template gets them: the tools' definitions, the calls' arguments, and the
        # start and end tokens of every message (300,000 empty ones took half a minute)
        words = "word " * (limit // 5 + 1)
        function = {"name": "f", "description": words, "parameters": {"type": "object"}}
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        call_with_words = {**call, "function": {"name": "f", "arguments": json.dumps({"a": words})}}
        hi = {"role": "user", "content": "Hi"}
        answered = {"role": "tool", "tool_call_id": "c1", "content": "ok"}
        for extra in (
            {"tools": [{"type": "function", "function": function}]},
            {"messages": [hi, {"role": "assistant", "tool_calls": [call_with_words]}, answered]},
            {"messages": [{"role": "user", "content": ""}] * (engine.max_seq_len // 2 + 1)},
        ):
            sent = {**body, "messages": [hi], **extra}
            response = await client.post("/v1/chat/completions", json=sent)
            error = assert_error(response, 400, "messages", "context_length_exceeded")
            assert "characters long" in error["message"] or "messages:" in error["message"]


async def test_prompts_only_counted_or_cut_are_bounded_too(tiny_model_dir: Path) -> None:
    """/tokenize, the count routes and truncate_prompt_tokens take a prompt longer than the
    context (it is counted, or cut), but it is tokenized whole: past CONTEXTS_TOKENIZED
    contexts' worth, a 400 before tokenizing (100 MB took five minutes and 16 GB)."""
    settings = make_settings(tiny_model_dir, max_model_len=256)
    async for client in start_client(settings):
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        limit = engine.max_seq_len * engine.limits._longest_token_bytes  # one context's bytes
        longer = "word " * (limit // 5 + 1)  # more than one context, less than eight
        too_long = "word " * (CONTEXTS_TOKENIZED * limit // 5 + 1)
        chat = {"model": "tiny", "messages": [{"role": "user", "content": longer}]}
        counted = await client.post("/tokenize", json={"model": "tiny", "prompt": longer})
        assert counted.status_code == 200 and counted.json()["count"] > engine.max_seq_len
        assert (await client.post("/tokenize", json=chat)).status_code == 200
        responses = {"model": "tiny", "input": longer}
        assert (await client.post("/v1/responses/input_tokens", json=responses)).status_code == 200
        for path, body, param in (
            ("/tokenize", {"model": "tiny", "prompt": too_long}, "prompt"),
            ("/tokenize", {**chat, "messages": [{"role": "user", "content": too_long}]}, None),
            ("/v1/responses/input_tokens", {"model": "tiny", "input": too_long}, None),
            (
                "/v1/completions",
                {"model": "tiny", "prompt": too_long, "truncate_prompt_tokens": 9},
                "prompt",
            ),
            (
                "/v1/chat/completions",
                {
                    **chat,
                    "messages": [{"role": "user", "content": too_long}],
                    "truncate_prompt_tokens": 9,
                },
                "messages",
            ),
        ):
            response = await client.post(path, json=body)
            error = assert_error(response, 400, code="context_length_exceeded")
            assert "8 times" in error["message"], (path, error)
            assert param is None or error["param"] == param, (path, error)
        cut = {"model": "tiny", "prompt": longer, "truncate_prompt_tokens": 9, "max_tokens": 1}
        response = await client.post("/v1/completions", json=cut)
        assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == 9


async def test_images_that_cannot_fit_are_refused_before_they_are_decoded(
    tiny_model_dir: Path,
) -> None:
    """The images' tokens, from their headers, past the context: a 400 context_length_exceeded
    before decoding (these PNGs are headers only: decoding them would be the image's 400)."""
    settings = make_settings(tiny_model_dir, max_model_len=256)
    big = {"type": "image_url", "image_url": {"url": "", "detail": "high"}}
    async for client in start_client(settings):
        parts = []
        for _ in range(2):
            url = "data:image/png;base64," + base64.b64encode(png_header_only(700, 700)).decode()
            parts.append({**big, "image_url": {**big["image_url"], "url": url}})
        body = {"model": "tiny", "messages": user(*parts), "max_tokens": 2}
        error = assert_error(
            await client.post("/v1/chat/completions", json=body),
            400,
            "messages[0].content[0]",  # (too big by itself: named)
            "context_length_exceeded",
        )
        assert "alone is 625 tokens" in error["message"], error
        # several that fit one by one, not together
        small = "data:image/png;base64," + base64.b64encode(png_header_only(300, 300)).decode()
        three = [{**big, "image_url": {**big["image_url"], "url": small}}] * 3
        error = assert_error(
            await client.post("/v1/chat/completions", json={**body, "messages": user(*three)}),
            400,
            "messages",
            "context_length_exceeded",
        )
        assert "images alone are 363 tokens" in error["message"], error
        # one that fits is decoded (and this one is refused for what it is)
        body["messages"] = user(
            {
                "type": "image_url",
                "image_url": {"url": parts[0]["image_url"]["url"], "detail": "low"},
            }
        )
        error = assert_error(await client.post("/v1/chat/completions", json=body), 400)
        assert error["param"] == "messages[0].content[0]", error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/files"])
async def test_a_client_gone_while_it_sends_its_body_is_no_400(
    client: httpx.AsyncClient, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A body cut off by the client hanging up is the client's leaving (499 in the log and the
    metrics), not a malformed body (it was logged as 400 invalid_json, uploads too)."""
    caplog.set_level("INFO", logger="server.access")
    multipart = path == "/v1/files"
    content_type = b"multipart/form-data; boundary=xyz" if multipart else b"application/json"
    headers = [
        (b"host", b"testserver"),
        (b"content-type", content_type),
        (b"content-length", b"1000000"),
    ]
    scope = post_scope(path, headers)
    part = b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nvision\r\n'
    messages = [
        {
            "type": "http.request",
            "body": part if multipart else b'{"model": "ti',
            "more_body": True,
        },
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict:
        return messages.pop(0) if len(messages) > 1 else messages[0]

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await client.app(scope, receive, send)  # type: ignore[attr-defined]
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 499
    lines = [r.getMessage() for r in caplog.records if path in r.getMessage()]
    assert lines and all("400" not in line and "invalid_json" not in line for line in lines)


async def test_a_prompt_past_the_tokenizers_own_bound_logs_no_warning(
    client: httpx.AsyncClient,
) -> None:
    """The 400 says the prompt is too long; transformers' tokenizer, whose bound is the
    checkpoint's, added "Token indices sequence length is longer than ... will result in
    indexing errors" to the server's log for a prompt never run."""
    warned: list[str] = []  # (transformers' loggers do not reach the root's, caplog's)
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(handler)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 20_000}]}
    try:
        response = await client.post("/v1/chat/completions", json=body)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    error = assert_error(response, 400, "messages", "context_length_exceeded")
    assert "characters long" not in error["message"]  # (tokenized: counted by its tokens)
    assert not [text for text in warned if "sequence length" in text], warned
