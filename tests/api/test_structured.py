"""response_format: JSON constrained while decoding, valid even from a random-weight model, and
batched together with unconstrained requests."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.helpers import data_uri, make_image

pytestmark = pytest.mark.anyio

SHORT_TEXT = {"type": "string", "pattern": '^[^\\x00-\\x1f"\\\\]{1,16}$'}
SCHEMA = {
    "type": "object",
    "properties": {
        "label": SHORT_TEXT,
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": SHORT_TEXT, "maxItems": 3},
    },
    "required": ["label", "count", "tags"],
    "additionalProperties": False,
}


def body(i: int, response_format: dict | None) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": data_uri(make_image(64, 64, seed=i))}},
        {"type": "text", "text": "Describe it as JSON."},
    ]
    extra = {"response_format": response_format} if response_format else {}
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 400,
        "temperature": 0.8,
        "seed": i,
        **extra,
    }


def check_schema(value: dict) -> None:
    assert set(value) == {"label", "count", "tags"}
    assert isinstance(value["label"], str) and 1 <= len(value["label"]) <= 16
    assert isinstance(value["count"], int) and 0 <= value["count"] <= 99
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3


async def test_json_schema_batched_with_unconstrained_requests(client: httpx.AsyncClient) -> None:
    schema_format = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    formats = [schema_format, None, {"type": "json_object"}, None] * 3
    responses = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=body(i, f)) for i, f in enumerate(formats))
    )
    for response, fmt in zip(responses, formats, strict=True):
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        if fmt is None:
            continue
        assert choice["finish_reason"] == "stop"  # the grammar let it end: complete JSON
        value = json.loads(choice["message"]["content"])
        if fmt["type"] == "json_schema":
            check_schema(value)
        else:
            assert isinstance(value, dict)  # json_object: an object, whatever its keys


async def test_min_tokens_does_not_fight_the_grammar(client) -> None:
    """The grammar ends the JSON; min_tokens must not ban the only token it then allows (the
    answer was invalid JSON, then a 500)."""
    import json as json_module

    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "JSON please"}],
        "response_format": {"type": "json_object"},
        "min_tokens": 200,
        "max_tokens": 400,
        "temperature": 0,
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        json_module.loads(choice["message"]["content"])
