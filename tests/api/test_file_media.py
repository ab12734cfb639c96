"""Images uploaded to the Files API (purpose vision or user_data) and named by their ids: in
chat's file part, the Responses API's input_image / input_file and Anthropic's file image
source; and files sent inline (file_data) or by URL. The model reads the same image whichever
way it came (same prompt tokens, same greedy answer); what cannot be read is a 400 naming the
part."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import AsyncIterator

import anthropic
import httpx
import openai
import pytest

from server.api.services import UPLOADS_AT_ONCE
from tests.api.test_errors import assert_error
from tests.api.test_messages import anthropic_sdk
from tests.helpers import data_uri, make_image, make_settings, make_video, start_client

pytestmark = pytest.mark.anyio
IMAGE = make_image(96, 64, fmt="PNG")
SMALL = make_image(40, 40, fmt="PNG")
MAX_IMAGE_BYTES = 50_000


@pytest.fixture(scope="module")
async def client(tiny_model_dir) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    settings = make_settings(tiny_model_dir, max_image_bytes=MAX_IMAGE_BYTES)
    async for c in start_client(settings):
        yield c


@pytest.fixture
def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key="-", http_client=client, max_retries=0
    )


async def upload(sdk: openai.AsyncOpenAI, content: bytes, purpose: str = "vision") -> str:
    stored = await sdk.files.create(file=("photo.png", io.BytesIO(content)), purpose=purpose)  # type: ignore[arg-type]
    assert stored.purpose == purpose and stored.bytes == len(content)
    return stored.id


async def chat(client: httpx.AsyncClient, part: dict) -> httpx.Response:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}],
        "max_tokens": 5,
        "temperature": 0,
    }
    return await client.post("/v1/chat/completions", json=body)


async def answer(client: httpx.AsyncClient, part: dict) -> tuple[int, str]:
    response = await chat(client, part)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["usage"]["prompt_tokens"], body["choices"][0]["message"]["content"]


async def test_an_uploaded_image_is_read_as_the_same_image_sent_inline(
    client: httpx.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    inline = await answer(
        client, {"type": "image_url", "image_url": {"url": data_uri(IMAGE, "image/png")}}
    )
    small = await answer(
        client, {"type": "image_url", "image_url": {"url": data_uri(SMALL, "image/png")}}
    )
    assert inline[0] != small[0]  # (the prompt's length tells which image was read)
    file_id = await upload(sdk, IMAGE)
    encoded = base64.b64encode(IMAGE).decode()
    for part in (
        {"type": "file", "file": {"file_id": file_id}},
        {"type": "input_image", "file_id": file_id},
        {"type": "input_file", "file_id": file_id},
        {"type": "file", "file": {"file_data": data_uri(IMAGE, "image/png")}},
        {"type": "file", "file": {"file_data": encoded, "filename": "photo.png"}},
        {"type": "file", "file": {"file_data": encoded}},  # unnamed: its bytes tell
    ):
        assert await answer(client, part) == inline, part
    user_data = await upload(sdk, IMAGE, purpose="user_data")
    assert await answer(client, {"type": "input_image", "file_id": user_data}) == inline


async def test_the_responses_and_messages_apis_read_uploaded_images(
    client: httpx.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    file_id = await upload(sdk, IMAGE)
    inline = await answer(
        client, {"type": "image_url", "image_url": {"url": data_uri(IMAGE, "image/png")}}
    )
    response = await sdk.responses.create(
        model="tiny",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "file_id": file_id, "detail": "auto"},
                    {"type": "input_text", "text": "What?"},
                ],
            }
        ],
        max_output_tokens=5,
        temperature=0,
    )
    assert response.usage is not None  # (incomplete: max_output_tokens reached)
    assert response.usage.input_tokens == inline[0]
    assert response.output_text == inline[1]
    message = await client.post(
        "/v1/messages",
        json={
            "model": "tiny",
            "max_tokens": 5,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "file", "file_id": file_id}},
                        {"type": "text", "text": "What?"},
                    ],
                }
            ],
        },
    )
    assert message.status_code == 200, message.text
    body = message.json()
    assert body["usage"]["input_tokens"] + body["usage"]["cache_read_input_tokens"] == inline[0]
    assert body["content"][0]["text"] == inline[1]


async def test_files_that_cannot_be_images_are_400s_naming_the_part(
    client: httpx.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    batch_file = await upload(sdk, b'{"custom_id": "a"}\n', purpose="batch")
    text_file = await upload(sdk, b"not an image", purpose="user_data")
    too_big = await upload(sdk, make_image(400, 400, fmt="BMP"))
    assert len(make_image(400, 400, fmt="BMP")) > MAX_IMAGE_BYTES
    deleted = await upload(sdk, IMAGE)
    await sdk.files.delete(deleted)
    param = "messages[0].content[0]"
    for part, code in (
        ({"type": "input_image", "file_id": "file-nope"}, "file_not_found"),
        ({"type": "file", "file": {"file_id": deleted}}, "file_not_found"),
        ({"type": "file", "file": {"file_id": batch_file}}, "invalid_value"),
        ({"type": "input_file", "file_id": text_file}, "invalid_media"),
        ({"type": "input_image", "file_id": too_big}, "media_too_large"),
        ({"type": "file", "file": {"file_data": "JVBERi0=", "filename": "a.pdf"}}, "invalid_media"),
        (
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0="}},
            "invalid_media",
        ),
        ({"type": "input_image", "file_id": "file-x", "image_url": data_uri(IMAGE)}, None),
        ({"type": "input_image"}, None),
        ({"type": "file", "file": {}}, None),  # (param: ...content[0].file)
        ({"type": "input_file", "file_id": "file-x", "file_url": "https://x/y.png"}, None),
    ):
        where = param + (".file" if part["type"] == "file" and code is None else "")
        error = assert_error(await chat(client, part), 400, where, code)
        assert "Traceback" not in error["message"]
    # the server is fine afterwards
    await answer(client, {"type": "input_image", "file_id": await upload(sdk, IMAGE)})


async def test_uploads_take_the_media_purposes_and_list_by_purpose(
    client: httpx.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    vision = await upload(sdk, SMALL)
    listed = await sdk.files.list(purpose="vision")
    assert vision in [f.id for f in listed.data]
    assert all(f.purpose == "vision" for f in listed.data)
    assert (await sdk.files.content(vision)).content == SMALL
    response = await client.post("/v1/files", files={"file": ("x.png", SMALL)})
    assert_error(response, 400, "purpose", "missing_required_parameter")  # (OpenAI's SDK sends it)
    for purpose in ("fine-tune", "assistants", "nope"):
        response = await client.post(
            "/v1/files", files={"file": ("x.png", SMALL)}, data={"purpose": purpose}
        )
        assert_error(response, 400, "purpose", "invalid_value")
    # vision files are images (a video or a document would fail every request naming it)
    for name, content in (("clip.mp4", make_video(seconds=1)), ("a.pdf", b"%PDF-1.4 ...")):
        response = await client.post(
            "/v1/files", files={"file": (name, content)}, data={"purpose": "vision"}
        )
        assert_error(response, 400, "file", "invalid_file_format")


async def test_uploads_are_stored_a_few_at_a_time(
    client: httpx.AsyncClient, sdk: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload is read whole only while it is stored, and at most UPLOADS_AT_ONCE are (each
    may be --max-request-body-bytes): the rest wait in their spooled temp files, then land
    whole."""
    jobs = client.app.state.services.jobs  # type: ignore[attr-defined]
    store, inside, most, lock = jobs.add_file, [0], [0], threading.Lock()

    def slow_add_file(*args: object) -> object:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.3)
        with lock:
            inside[0] -= 1
        return store(*args)

    monkeypatch.setattr(jobs, "add_file", slow_add_file)
    contents = [make_image(40 + i, 40, fmt="PNG") for i in range(2 * UPLOADS_AT_ONCE + 1)]
    ids = await asyncio.gather(*(upload(sdk, content) for content in contents))
    assert most[0] == UPLOADS_AT_ONCE
    assert [(await sdk.files.content(i)).content for i in ids] == contents


async def test_a_file_parts_detail_sets_its_budget(
    client: httpx.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    big = make_image(640, 480, fmt="PNG")
    file_id = await upload(sdk, big)
    for detail in ("low", "high"):
        image = {"type": "input_image", "file_id": file_id, "detail": detail}
        as_file = {"type": "input_file", "file_id": file_id, "detail": detail}
        assert await answer(client, as_file) == await answer(client, image)
    low = await answer(client, {"type": "input_file", "file_id": file_id, "detail": "low"})
    high = await answer(client, {"type": "input_file", "file_id": file_id, "detail": "high"})
    assert low[0] < high[0]


async def test_anthropics_sdk_uploads_and_reads_files(client: httpx.AsyncClient) -> None:
    """The anthropic SDK's beta.files: an upload without purpose (user_data), its metadata,
    an image block by its id, the list, the download, the delete."""
    sdk = anthropic_sdk(client, api_key="-")
    uploaded = await sdk.beta.files.upload(file=("red.png", IMAGE, "image/png"))
    assert uploaded.type == "file" and uploaded.mime_type == "image/png"
    assert uploaded.size_bytes == len(IMAGE) and uploaded.filename == "red.png"
    assert uploaded.created_at.year >= 2024  # (a datetime, as the SDK reads it)
    metadata = await sdk.beta.files.retrieve_metadata(uploaded.id)
    assert metadata.id == uploaded.id
    more = [(await sdk.beta.files.upload(file=("b.png", SMALL, "image/png"))).id for _ in "ab"]
    listed = [f.id async for f in sdk.beta.files.list(limit=1)]  # a page at a time
    assert listed[:3] == more[::-1] + [uploaded.id] and len(listed) == len(set(listed))
    assert await (await sdk.beta.files.download(uploaded.id)).read() == IMAGE
    inline = await answer(
        client, {"type": "image_url", "image_url": {"url": data_uri(IMAGE, "image/png")}}
    )
    message = await sdk.messages.create(
        model="tiny",
        max_tokens=5,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "file", "file_id": uploaded.id}},
                    {"type": "text", "text": "What?"},
                ],
            }
        ],
        extra_body={"temperature": 0},
    )
    usage = message.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == inline[0]
    await sdk.beta.files.delete(uploaded.id)
    with pytest.raises(anthropic.NotFoundError):
        await sdk.beta.files.retrieve_metadata(uploaded.id)
