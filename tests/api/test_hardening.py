"""Hardening at the HTTP edge: API keys everywhere, body cap, metrics, hostile media."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from tests.api.test_errors import assert_error
from tests.helpers import data_uri, make_image, make_settings, start_client
from tests.media.test_image import png_header_only

pytestmark = pytest.mark.anyio


def chat(content: list[dict] | str, **extra: object) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


async def test_api_key_file_and_protected_routes(tiny_model_dir: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# operators\nsk-file-key\n\n")
    settings = make_settings(tiny_model_dir, api_key_file=key_file)
    async for client in start_client(settings):
        for path in ("/v1/models", "/v2/media/jobs", "/nowhere"):
            response = await client.get(path)
            assert response.status_code == 401, path
            assert response.json()["error"]["type"] == "authentication_error"
        # Open: they hold no secrets, and a browser cannot send a Bearer header to open them.
        for path in ("/health", "/version", "/docs", "/redoc", "/openapi.json", "/"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/metrics")).status_code == 200
        ok = await client.get("/v1/models", headers={"Authorization": "Bearer sk-file-key"})
        assert ok.status_code == 200
        # two keys in one header name: refused, whichever is valid (a proxy checking the first
        # and a server reading the last would disagree)
        for name in ("Authorization", "x-api-key"):
            value = "Bearer sk-file-key" if name == "Authorization" else "sk-file-key"
            other = "Bearer other" if name == "Authorization" else "other"
            twice = httpx.Headers([(name, other), (name, value)])
            response = await client.get("/v1/models", headers=twice)
            assert response.status_code == 401, name
            assert "More than one API key" in response.json()["error"]["message"]
        both = {"Authorization": "Bearer sk-file-key", "x-api-key": "other"}
        assert (await client.get("/v1/models", headers=both)).status_code == 401
        same = {"Authorization": "Bearer sk-file-key", "x-api-key": "sk-file-key"}
        assert (await client.get("/v1/models", headers=same)).status_code == 200
        # Azure OpenAI's SDK sends its key as api-key
        assert (
            await client.get("/v1/models", headers={"api-key": "sk-file-key"})
        ).status_code == 200
        assert (await client.get("/v1/models", headers={"api-key": "other"})).status_code == 401


async def test_a_keyless_loopback_server_answers_only_requests_addressed_to_this_machine(
    tiny_model_dir: Path,
) -> None:
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 called the server as its
    own origin (past CORS) and read the answers: chats ran, files were listed (a security
    trial). Its requests carry its name in Host: refused, whatever the route."""
    import socket

    settings = make_settings(tiny_model_dir, allowed_hosts=["api.internal.example"])
    async for client in start_client(settings):
        for host in ("rebind.attacker.example:8000", "attacker.example", "localhost.evil.com"):
            for path in ("/v1/files", "/health", "/"):
                response = await client.get(path, headers={"Host": host})
                error = assert_error(response, 403, None, "host_not_allowed")
                assert "--allowed-hosts" in error["message"], error
        local = ("localhost:8000", "LOCALHOST.", "app.localhost", "127.0.0.1:8000", "[::1]:8000")
        for host in (*local, "10.1.2.3", "api.internal.example", socket.gethostname()):
            assert (await client.get("/v1/models", headers={"Host": host})).status_code == 200
    # with a key the page cannot authenticate; on an address others reach, names are the point
    for options in ({"api_keys": ["sk-1"]}, {"host": "0.0.0.0"}):
        async for client in start_client(make_settings(tiny_model_dir, **options)):
            headers = {"Host": "attacker.example", "Authorization": "Bearer sk-1"}
            assert (await client.get("/v1/models", headers=headers)).status_code == 200


async def test_metrics_can_require_the_key(tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir, api_keys=["k"], metrics_require_api_key=True)
    async for client in start_client(settings):
        assert (await client.get("/metrics")).status_code == 401
        assert (
            await client.get("/metrics", headers={"Authorization": "Bearer k"})
        ).status_code == 200


async def test_metrics_can_be_one_projects_alone(tiny_model_dir: Path) -> None:
    """--metrics-project: /metrics counts every project's tokens, so only the operator's
    project reads it (Prometheus's key); a tenant's key is a 403, no key a 401."""
    keys = ["sk-tenant", "sk-prometheus ops"]
    settings = make_settings(tiny_model_dir, api_keys=keys, metrics_project="ops")
    async for client in start_client(settings):
        assert (await client.get("/metrics")).status_code == 401
        tenant = await client.get("/metrics", headers={"Authorization": "Bearer sk-tenant"})
        assert tenant.status_code == 403
        error = tenant.json()["error"]
        assert error["type"] == "permission_error" and "ops" not in error["message"]
        ops = await client.get("/metrics", headers={"Authorization": "Bearer sk-prometheus"})
        assert ops.status_code == 200 and "vlm_" in ops.text
    with pytest.raises(ValidationError, match="no API key is in that project"):
        make_settings(tiny_model_dir, api_keys=["sk-tenant"], metrics_project="ops")


async def test_oversized_bodies_get_413(tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir, max_request_body_bytes=1024 * 1024)
    big = chat([image_part("data:image/png;base64," + "A" * (2 * 1024 * 1024))])
    async for client in start_client(settings):
        response = await client.post("/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(40):
                yield b" " * 65536

        response = await client.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert (await client.get("/health")).status_code == 200


async def test_a_body_of_a_million_tiny_json_values_is_refused_before_it_is_parsed(
    client: httpx.AsyncClient,
) -> None:
    # 3 MB of `{}` would parse into ~80 MB of Python objects (290 MB into ~7.7 GB): refused by
    # the count of values, well under the size limit, however the body arrives.
    flood = b'{"model": "tiny", "messages": [' + b"{}," * 1_000_000 + b"{}]}"
    response = await client.post("/v1/chat/completions", content=flood)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "1,000,000 JSON values" in error["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for start in range(0, len(flood), 65536):
            yield flood[start : start + 65536]

    response = await client.post("/v1/chat/completions", content=chunks())
    assert response.status_code == 413
    # Just under the count is parsed as usual (and refused for what it says, not its size).
    under = {"model": "tiny", "messages": [{"role": "user", "content": "," * 999_000}]}
    response = await client.post("/v1/chat/completions", json=under)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert (await client.get("/health")).status_code == 200


async def test_80_mb_base64_body_is_refused(client: httpx.AsyncClient) -> None:
    payload = base64.b64encode(b"\0" * (60 * 1024 * 1024)).decode()  # 80 MiB of base64
    response = await client.post(
        "/v1/chat/completions", json=chat([image_part("data:image/png;base64," + payload)])
    )
    # Under the default body cap (sized for videos) but far above the per-image cap.
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "media_too_large"
    assert (await client.get("/health")).status_code == 200


async def test_a_conversations_objects_are_counted_before_they_are_read(
    client: httpx.AsyncClient,
) -> None:
    """A conversation's objects (messages or input items, parts, blocks, tool calls and
    results, at any depth): at most 20,000 in all, counted before any is validated (a million
    empty parts held the event loop 18 s; a body of over a million JSON values is now a 413
    before it is parsed), on each API."""
    parts = [{"type": "text", "text": ""}] * 300_000
    hi = {"role": "user", "content": "Hi"}
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    result = {"type": "tool_result", "tool_use_id": "t", "content": parts}
    output = {"type": "function_call_output", "call_id": "c", "output": parts}
    for url, body, param in (
        ("/v1/chat/completions", chat(parts, max_tokens=1), "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [hi] * 20_001}, "messages"),
        (
            "/v1/chat/completions",
            {
                "model": "tiny",
                "messages": [hi, {"role": "assistant", "tool_calls": [call] * 10_000}],
            },
            "messages",
        ),
        ("/v1/responses", {"model": "tiny", "input": [hi] * 20_001}, "input"),
        ("/v1/responses", {"model": "tiny", "input": [hi, output]}, "input"),
        ("/v1/messages", {"model": "tiny", "max_tokens": 1, "messages": [hi] * 20_001}, "messages"),
        (
            "/v1/messages",
            {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [result]}]},
            "messages",
        ),
    ):
        response = await client.post(url, json=body)
        assert response.status_code == 400, url
        error = response.json()["error"]
        assert error.get("param", param) == param, error  # (Anthropic's names no param)
        assert "more than 20,000 objects" in error["message"], error
    under = [{"role": "user", "content": [{"type": "text", "text": ""}] * 19_000}]
    body = {"model": "tiny", "messages": under, "max_tokens": 1}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "data,mime",
    [
        (png_header_only(40_000, 40_000), "image/png"),  # decompression bomb
        (make_image(320, 240)[:500], "image/jpeg"),  # truncated JPEG
        (b"\0\0\0\x18ftypmp42" + b"\0" * 100, "image/jpeg"),  # an MP4 header as an image
        (b"", "image/png"),  # zero bytes
    ],
)
async def test_hostile_images_get_4xx(client: httpx.AsyncClient, data: bytes, mime: str) -> None:
    uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    response = await client.post("/v1/chat/completions", json=chat([image_part(uri)]))
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert (await client.get("/health")).status_code == 200


async def test_loopback_media_url_is_refused_without_allow_list(tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir, allowed_media_domains=[])
    async for client in start_client(settings):
        for url in ("http://127.0.0.1:9/x.png", "http://169.254.169.254/", "file:///etc/passwd"):
            response = await client.post("/v1/chat/completions", json=chat([image_part(url)]))
            assert response.status_code == 400
            assert response.json()["error"]["code"] == "media_url_not_allowed"


async def test_metrics_count_requests_tokens_and_ttft(client: httpx.AsyncClient) -> None:
    content = [image_part(data_uri(make_image())), {"type": "text", "text": "Hi"}]
    body = chat(content, max_tokens=3, ignore_eos=True)  # so it ends by length, always
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    await client.post("/v1/chat/completions", json=chat("hi", n=3))  # a 400
    text = (await client.get("/metrics")).text
    assert 'vlm_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'vlm_http_requests_total{route="/v1/chat/completions",status="400"}' in text
    assert "vlm_time_to_first_token_seconds_count" in text
    assert "vlm_queue_depth 0.0" in text and "vlm_running_sequences" in text
    generated = next(
        line for line in text.splitlines() if line.startswith("vlm_generated_tokens_total")
    )
    assert float(generated.split()[-1]) >= 3
    assert 'vlm_sequences_finished_total{reason="length"}' in text
