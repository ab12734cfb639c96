"""Video in chat (seed 003) and Animus media completions (seed 000's captions)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest

from server.exceptions import InvalidRequest
from server.media.fetch import FetchedMedia, MediaFetcher
from tests.api.test_errors import assert_error
from tests.helpers import MediaServer, make_image, make_settings, make_video, start_client

pytestmark = pytest.mark.anyio


def video_uri(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def video_body(url: str, **extra: object) -> dict:
    content = [
        {"type": "text", "text": "Describe this scene:"},
        {"type": "video_url", "video_url": {"url": url, **extra.pop("video", {})}},
    ]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def engine_of(client: httpx.AsyncClient):
    return client.app.state.services.engine  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
async def video_client(tiny_model_dir: Path):
    settings = make_settings(tiny_model_dir, caption_tokens=6, default_max_tokens=8)
    async for client in start_client(settings):
        yield client


async def test_seed_003_video_url_native(
    video_client: httpx.AsyncClient, media_server: MediaServer
) -> None:
    url = media_server.add("/aimlapi.mp4", make_video(seconds=3), "video/mp4")
    response = await video_client.post("/v1/chat/completions", json=video_body(url))
    assert response.status_code == 200, response.text
    body = response.json()
    details = body["usage"]["prompt_tokens_details"]
    assert details["video_tokens"] > 0 and details["image_tokens"] == 0
    assert details["video_tokens"] + details["text_tokens"] == body["usage"]["prompt_tokens"]
    assert body["frames"] is None  # native mode: no captions


async def test_media_in_data_uris_that_name_no_type_is_read_by_its_bytes(
    video_client: httpx.AsyncClient,
) -> None:
    """Qwen-Agent writes a local video as data:;base64,... and a browser's FileReader an
    unknown file as application/octet-stream: the bytes say what they are (vLLM reads them
    whatever the URI says); bytes that are neither are still a 400 naming the part."""
    video = base64.b64encode(make_video(seconds=2)).decode()
    image = base64.b64encode(make_image(32, 32, fmt="PNG")).decode()
    for url, kind in (
        (f"data:;base64,{video}", "video_url"),
        (f"data:application/octet-stream;base64,{image}", "image_url"),
        (f"data:;base64,{image}", "image_url"),
    ):
        content = [{"type": kind, kind: {"url": url}}, {"type": "text", "text": "what?"}]
        body = {
            "model": "tiny",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": content}],
        }
        response = await video_client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, (kind, response.text)
        details = response.json()["usage"]["prompt_tokens_details"]
        assert details["video_tokens" if kind == "video_url" else "image_tokens"] > 0
    # the Animus contract's image_url: a video, judged by its bytes
    content = [{"type": "image_url", "image_url": {"url": f"data:;base64,{video}"}}]
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    response = await video_client.post("/v2/media/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens_details"]["video_tokens"] > 0
    text = base64.b64encode(b"just some text, no image at all").decode()
    content = [{"type": "image_url", "image_url": {"url": f"data:;base64,{text}"}}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}]}
    response = await video_client.post("/v1/chat/completions", json=body)
    assert_error(response, 400, "messages[0].content[0]")


async def test_native_video_is_deterministic(video_client: httpx.AsyncClient) -> None:
    body = video_body(video_uri(make_video(seconds=2)), temperature=0, max_tokens=10)
    first = await video_client.post("/v1/chat/completions", json=body)
    second = await video_client.post("/v1/chat/completions", json=body)
    assert first.json()["choices"][0]["message"] == second.json()["choices"][0]["message"]


async def test_media_completions_caption_every_frame_in_one_engine_call(
    video_client: httpx.AsyncClient,
) -> None:
    engine = engine_of(video_client)
    body = video_body(
        video_uri(make_video(seconds=60, fps=10)),
        model="tiny",
        video={"fps": 100, "max_frames": 1000},  # a greedy client: still at most 60 frames
    )
    with mock.patch.object(engine, "add_requests", wraps=engine.add_requests) as add_requests:
        response = await video_client.post("/v2/media/completions", json=body)
    assert response.status_code == 200, response.text
    frames = response.json()["frames"]
    assert 1 < len(frames) <= 60
    add_requests.assert_called_once()  # every frame in one batched engine call
    assert len(add_requests.call_args.args[0]) == len(frames)
    times = [f["timestamp"] for f in frames]
    assert times == sorted(times) and times[0] >= 0 and times[-1] <= 60
    usage = response.json()["usage"]
    assert usage["prompt_tokens_details"]["video_tokens"] > 0
    assert usage["completion_tokens"] >= len(frames)  # the captions count too


async def test_captions_of_several_videos_say_which_video(
    video_client: httpx.AsyncClient,
) -> None:
    body = video_body(video_uri(make_video(seconds=2)), video_mode="captions")
    second = {"type": "video_url", "video_url": {"url": video_uri(make_video(seconds=3))}}
    body["messages"][0]["content"].append(second)
    response = await video_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    frames = response.json()["frames"]
    indices = [frame["video_index"] for frame in frames]
    # each video's frames in order, each from its own start (2 s and 3 s at 2 fps)
    assert indices == [0] * 4 + [1] * 6
    times = [[f["timestamp"] for f in frames if f["video_index"] == k] for k in (0, 1)]
    assert times[1][0] == times[0][0] and times[1] == sorted(times[1])


async def test_video_mode_can_be_chosen(video_client: httpx.AsyncClient) -> None:
    body = video_body(video_uri(make_video(seconds=2)), video_mode="captions")
    response = await video_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and len(response.json()["frames"]) == 4


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 1000, make_image(64, 64), make_video(seconds=3)[:2000]],
    ids=["zero-length", "zeros", "an image", "truncated"],
)
async def test_bad_videos_get_4xx(video_client: httpx.AsyncClient, data: bytes) -> None:
    response = await video_client.post("/v1/chat/completions", json=video_body(video_uri(data)))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages[0].content[1]"
    assert "Traceback" not in response.text
    assert (await video_client.get("/health")).status_code == 200


async def test_more_videos_than_allowed(video_client: httpx.AsyncClient) -> None:
    uri = video_uri(make_video(seconds=1))
    body = video_body(uri)
    more = [{"type": "video_url", "video_url": {"url": uri}}] * 4  # (5: the default allows 4)
    body["messages"][0]["content"] += more
    response = await video_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_many_videos"
    assert "(--max-videos-per-request)" in response.json()["error"]["message"]


async def test_a_video_pixel_range_upside_down_is_a_400(video_client: httpx.AsyncClient) -> None:
    """As mm_processor_kwargs answers it: min_pixels above max_pixels is refused, by name."""
    video = {"min_pixels": 100_000, "max_pixels": 1000}
    body = video_body(video_uri(make_video(seconds=1)), video=video, max_tokens=2)
    response = await video_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith("messages[0].content[1].video_url"), error
    assert "min_pixels is above max_pixels" in error["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v2/media/completions"])
async def test_max_tokens_past_the_context_with_a_video_names_max_tokens(
    video_client: httpx.AsyncClient, path: str
) -> None:
    """As without a video (and as an async job answers): 400 context_length_exceeded naming
    max_tokens, not the frame planner's "the video does not fit"."""
    body = video_body(video_uri(make_video(seconds=1)), max_tokens=10**6)
    response = await video_client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded"), error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v2/media/completions"])
async def test_a_video_with_no_room_left_is_context_length_exceeded(
    video_client: httpx.AsyncClient, path: str
) -> None:
    """max_tokens that leave the text room but not even the smallest plan of the video: a
    400 context_length_exceeded naming the video (it was invalid_media, as if the file were
    bad), in native (/v1) and captions (/v2) mode alike."""
    context = engine_of(video_client).max_seq_len
    text = video_body("")
    text["messages"][0]["content"] = text["messages"][0]["content"][:1]
    counted = await video_client.post("/tokenize", json=text)
    room = 12  # (the text's tokens and a few, short of a frame's)
    max_tokens = context - counted.json()["count"] - room
    body = video_body(video_uri(make_video(seconds=1)), max_tokens=max_tokens)
    response = await video_client.post(path, json=body)
    error = assert_error(response, 400, "messages[0].content[1]", "context_length_exceeded")
    assert "does not fit" in error["message"] or "fits" in error["message"], error


async def test_use_scenes_gives_one_caption_per_scene(video_client: httpx.AsyncClient) -> None:
    body = video_body(video_uri(make_video(seconds=10, cuts=(2.0, 5.0, 7.5))), use_scenes=True)
    response = await video_client.post("/v2/media/completions", json=body)
    assert response.status_code == 200, response.text
    assert [round(f["timestamp"]) for f in response.json()["frames"]] == [1, 4, 6, 9]


async def test_videos_are_spooled_to_disk_and_removed(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A downloaded video goes to a file in the spool (not to memory) and is removed once
    read; a local one is read in place, by its path."""
    fetched: list[tuple[Path | None, int, bool]] = []
    fetch = MediaFetcher.fetch

    async def spied(self: MediaFetcher, url: str, **kwargs: Any) -> FetchedMedia:
        media = await fetch(self, url, **kwargs)
        if kwargs["kind"] == "video":
            exists = media.path is not None and media.path.exists()
            fetched.append((media.path, len(media.data), exists))
        return media

    monkeypatch.setattr(MediaFetcher, "fetch", spied)
    local = tmp_path / "media"
    local.mkdir()
    (local / "clip.mp4").write_bytes(make_video(seconds=2))
    settings = make_settings(
        tiny_model_dir,
        data_dir=tmp_path / "data",
        allowed_local_media_path=local,
        default_max_tokens=4,
    )
    url = media_server.add("/spooled.mp4", make_video(seconds=2), "video/mp4")
    async for client in start_client(settings):
        for video_url in (url, f"file://{local}/clip.mp4"):
            response = await client.post("/v1/chat/completions", json=video_body(video_url))
            assert response.status_code == 200, response.text
        spooled = [p.name for p in (tmp_path / "data" / "spool").rglob("*") if p.is_file()]
        assert spooled == [".lock"]  # temporary files are gone (the lock: this server's dir)
        assert (local / "clip.mp4").exists()  # a local file is read in place, never removed
    (download, *_), (in_place, *_) = fetched
    assert [(size, exists) for _, size, exists in fetched] == [(0, True), (0, True)]
    assert download is not None and download.parent.parent == tmp_path / "data" / "spool"
    assert in_place == local / "clip.mp4"


async def test_bare_string_video_url_like_image_url(video_client: httpx.AsyncClient) -> None:
    body = video_body(video_uri(make_video(seconds=1.0)), max_tokens=2)
    body["messages"][0]["content"][1]["video_url"] = body["messages"][0]["content"][1]["video_url"][
        "url"
    ]
    response = await video_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens_details"]["video_tokens"] > 0


async def test_streamed_captions_answer_carries_its_frames(video_client: httpx.AsyncClient) -> None:
    """The frames (timestamps and captions) a non-streamed answer has come on the first
    chunk of a streamed one: they exist before the answer starts."""
    import json

    body = video_body(video_uri(make_video(seconds=2)), temperature=0, stream=True)
    chunks = []
    async with video_client.stream("POST", "/v2/media/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line.removeprefix("data: ")))
    full = (await video_client.post("/v2/media/completions", json={**body, "stream": False})).json()
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["frames"] == full["frames"] and len(full["frames"]) == 4
    assert all("frames" not in chunk for chunk in chunks[1:])


def jpeg_frames_url(count: int) -> str:
    """vLLM's video data URL (encode_video_url): the frames as base64 JPEGs, comma-joined."""
    frames = [base64.b64encode(make_image(112, 84, seed=i)).decode() for i in range(count)]
    return "data:video/jpeg;base64," + ",".join(frames)


async def test_dashscopes_video_part_as_frames_or_a_url(video_client: httpx.AsyncClient) -> None:
    """DashScope's {"type": "video", "video": [frame, ...]} (Qwen-Agent's video given as its
    frames): the frames read as vLLM's frames URL is (one a second), inline frames of any
    image type (PNG too, or naming no type); {"type": "video", "video": URL} is a video_url.
    A frame by URL is a 400 saying how to send it."""

    async def video_tokens(part: dict) -> int:
        content = [part, {"type": "text", "text": "what happens?"}]
        body = {
            "model": "tiny",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": content}],
        }
        response = await video_client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["video_tokens"]

    url = jpeg_frames_url(4)
    frames = [f"data:image/jpeg;base64,{frame}" for frame in url.split(",")[1:]]
    expected = await video_tokens({"type": "video_url", "video_url": {"url": url}})
    assert expected > 0
    assert await video_tokens({"type": "video", "video": frames}) == expected
    qwen_agent = [frame.replace("data:image/jpeg;", "data:;") for frame in frames]
    assert await video_tokens({"type": "video", "video": qwen_agent}) == expected
    png = "data:image/png;base64," + base64.b64encode(make_image(112, 84, fmt="PNG")).decode()
    assert await video_tokens({"type": "video", "video": [png] * 4}) == expected
    assert await video_tokens({"type": "video", "video": url}) == expected
    assert await video_tokens({"type": "video", "video": frames, "max_frames": 2}) < expected
    stray = {"type": "video", "video": frames, "video_url": "http://127.0.0.1:9/other.mp4"}
    assert await video_tokens(stray) == expected  # (the frames, not a stray key)
    gif = "data:image/gif;base64," + base64.b64encode(make_image(8, 8, fmt="GIF")).decode()
    for bad in (["https://example.com/f0.jpg"], ["data:text/plain;base64,aGk="], [3], [], [gif]):
        content = [{"type": "video", "video": bad}]
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}]}
        response = await video_client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["param"].startswith("messages[0]"), response.text


async def test_vllm_jpeg_frames_video_data_url(video_client: httpx.AsyncClient) -> None:
    native = await video_client.post(
        "/v1/chat/completions", json=video_body(jpeg_frames_url(4), max_tokens=2)
    )
    assert native.status_code == 200, native.text
    assert native.json()["usage"]["prompt_tokens_details"]["video_tokens"] > 0
    captions = await video_client.post(
        "/v1/chat/completions",
        json=video_body(jpeg_frames_url(4), max_tokens=2, video_mode="captions"),
    )
    assert captions.status_code == 200, captions.text
    # No timing in the URL: one frame a second, each frame taken once, at its own time.
    assert [f["timestamp"] for f in captions.json()["frames"]] == [0.0, 1.0, 2.0, 3.0]
    # of an odd number every frame, the last repeated, as Qwen's processor pads them (the
    # even plan left the middle one of 3 out), as many tokens as 4 frames; not past the
    # ceilings (max_frames 2: two of the three)
    for count, video, frames in ((3, {}, [0, 1, 2, 2]), (3, {"max_frames": 2}, [0, 2])):
        body = video_body(jpeg_frames_url(count), max_tokens=2, video=video)
        response = await video_client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        tokens = response.json()["usage"]["prompt_tokens_details"]["video_tokens"]
        assert tokens == len(frames) // 2 * (
            native.json()["usage"]["prompt_tokens_details"]["video_tokens"] // 2
        )
    one = await video_client.post(
        "/v1/chat/completions", json=video_body(jpeg_frames_url(1) + ",", max_tokens=2)
    )
    assert one.status_code == 200, one.text  # one frame (no comma in vLLM's form), a stray comma
    bad = base64.b64encode(b"not a jpeg").decode()
    frames = jpeg_frames_url(2).split(",")
    # a bad frame among good ones is a 400, even where the plan would not have taken it
    for broken in (",".join([*frames, bad]), ",".join([frames[0], frames[1], bad, frames[2]])):
        response = await video_client.post(
            "/v1/chat/completions", json=video_body(broken, video={"max_frames": 2})
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "messages[0].content[1]"
    # frames are counted before the URL is split: an hour of them at most
    many = "data:video/jpeg;base64," + ",".join(["AAAA"] * 3601)
    response = await video_client.post("/v1/chat/completions", json=video_body(many))
    assert response.status_code == 400, response.text
    assert "holds 3601 frames; at most 3600" in response.json()["error"]["message"]


async def test_frame_videos_decode_within_the_image_decode_memory(video_client) -> None:  # noqa: ANN001
    """A video sent as its frames is decoded in this process: under --image-decode-memory, as
    an image of a frame's size (four requests of 8K frames took 2 GB unbounded)."""
    from server.media.image import decoded_bytes

    loader = video_client.app.state.services.chat.media
    asked: list[int] = []
    real = loader.decode_memory.run

    async def run(num_bytes, fn):  # noqa: ANN001, ANN202
        asked.append(num_bytes)
        return await real(num_bytes, fn)

    with mock.patch.object(loader.decode_memory, "run", run):
        response = await video_client.post(
            "/v1/chat/completions", json=video_body(jpeg_frames_url(4), max_tokens=2)
        )
    assert response.status_code == 200, response.text
    assert asked == [decoded_bytes((112, 84))]
    assert loader.decode_memory.free == loader.decode_memory.total


async def test_captions_never_hold_special_tokens(video_client: httpx.AsyncClient) -> None:
    """The captions become prompt text: with skip_special_tokens false and the image
    placeholder forced, a caption holding "<|image_pad|>" would be read as an image with no
    pixels (a 500); captions leave special tokens out whatever the request says."""
    tokenizer = engine_of(video_client).tokenizer
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    body = video_body(
        video_uri(make_video(seconds=2)),
        max_tokens=3,
        skip_special_tokens=False,
        logit_bias={str(pad): 100},
    )
    response = await video_client.post("/v2/media/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert all("<|" not in frame["caption"] for frame in answer["frames"])
    assert (
        answer["choices"][0]["message"]["content"] == "<|image_pad|>" * 3
    )  # the answer keeps them


def test_captions_are_cut_to_what_the_frame_plan_counts(tiny_model_dir: Path) -> None:
    """A caption tokenized again can be longer than the tokens that wrote it (U+FFFD for
    bytes that were not UTF-8): cut to caption_tokens, the captions fit as planned."""
    from transformers import AutoTokenizer

    from server.pipelines.video_captions import bounded

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["\ufffd" * 40, "a short one", "word " * 50, ""]
    cut = bounded(tokenizer, texts, 10)
    assert all(len(tokenizer.encode(t, add_special_tokens=False)) <= 10 for t in cut)
    assert cut[1] == "a short one" and cut[3] == "" and cut[2].startswith("word word")
    assert bounded(tokenizer, texts, 0) == ["", "", "", ""]


async def test_captions_are_not_held_to_the_answers_format(video_client: httpx.AsyncClient) -> None:
    """response_format (logprobs, allowed tokens, ...) is asked of the answer, not of each
    frame's caption: the answer is the JSON, the captions are free text."""
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}
    body = video_body(
        video_uri(make_video(seconds=2)),
        video_mode="captions",
        max_tokens=30,
        temperature=0,
        logprobs=True,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    response = await video_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert isinstance(json.loads(answer["choices"][0]["message"]["content"]), dict)
    captions = [frame["caption"] for frame in answer["frames"]]
    assert captions and not any(caption.startswith('{"a"') for caption in captions), captions


async def test_a_strip_video_is_read_within_the_processors_aspect_ratio(
    video_client: httpx.AsyncClient,
) -> None:
    """A 2x1000 video (and its frames as vLLM's JPEG data URL) enlarged to the least frame
    size was 28x7084, past the 200:1 the processor takes: a 500 on every route. Its frames
    are cut back to 200:1."""
    import io

    from PIL import Image

    strip = Image.new("RGB", (2, 1000), (90, 20, 200))
    jpeg = io.BytesIO()
    strip.save(jpeg, "JPEG")
    frames = base64.b64encode(jpeg.getvalue()).decode()
    for url in (
        video_uri(make_video(seconds=1, width=2, height=1000)),
        f"data:video/jpeg;base64,{frames},{frames}",
    ):
        for route in ("/v1/chat/completions", "/v2/media/completions"):
            body = video_body(url, model="tiny", max_tokens=4)
            response = await video_client.post(route, json=body)
            assert response.status_code == 200, (route, response.text)
            assert response.json()["usage"]["prompt_tokens_details"]["video_tokens"] > 0
    categories = {"media_url": video_uri(make_video(seconds=1, width=1000, height=2))}
    response = await video_client.post("/v2/media/categories", json=categories)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("width", "height"), [(1280, 720), (320, 240)])
async def test_a_pixel_range_under_the_least_frame_gives_the_tokens_qwens_processor_does(
    video_client: httpx.AsyncClient, tiny_model_dir: Path, width: int, height: int
) -> None:
    """As Qwen's processor reads a video's range (what vLLM runs with mm_processor_kwargs),
    a max_pixels or min_pixels under its least frame (128 tokens) wins over it, wherever the
    request puts it: the frames were enlarged to the least again, 576 video tokens for HF's
    200 (1280x720, 4 s, max_pixels 50,000), 560 for 216 (320x240)."""
    import numpy as np
    from transformers import AutoProcessor

    videos = AutoProcessor.from_pretrained(tiny_model_dir).video_processor
    url = video_uri(make_video(seconds=4, width=width, height=height))
    frames = np.zeros((8, height, width, 3), np.uint8)  # (4 s at the server's 2 fps)
    for pixels in (
        {},
        {"max_pixels": 50_000},
        {"min_pixels": 3136, "max_pixels": 50_000},
        {"min_pixels": 3136},
        {"max_pixels": 784},
        {"max_pixels": 110_000},  # (above the least, rounded down under it: kept so)
    ):
        wanted = {
            "shortest_edge": pixels.get("min_pixels", videos.size["shortest_edge"]),
            "longest_edge": pixels.get("max_pixels", videos.size["longest_edge"]),
        }
        grid = videos(videos=[frames], size=wanted, do_sample_frames=False)["video_grid_thw"]
        expected = int(grid.prod()) // videos.merge_size**2
        beside = video_body(url, max_tokens=1)
        beside["messages"][0]["content"][1].update(pixels)
        for where, body in (
            ("video_url", video_body(url, max_tokens=1, video=pixels)),
            ("beside", beside),
            ("mm_processor_kwargs", video_body(url, max_tokens=1, mm_processor_kwargs=pixels)),
        ):
            response = await video_client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            details = usage["prompt_tokens_details"]
            assert details["video_tokens"] == expected, (pixels, where)
            assert details["video_tokens"] + details["text_tokens"] == usage["prompt_tokens"]


async def test_an_animus_client_sends_its_video_as_an_image_url_part(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer
) -> None:
    """Seed 000: a media completion's content is text and image_url parts, and its models
    "can also process videos": a video sent as an image_url part (by URL, named or not, or as
    a data: URI declaring a video) is read as a video, its frames captioned; the bytes decide,
    downloaded once, nothing left in the spool. /v1 keeps OpenAI's rule (an image_url is an
    image). A part that is neither says so."""
    video, image = make_video(seconds=2), make_image(96, 64)
    settings = make_settings(
        tiny_model_dir, data_dir=tmp_path / "data", caption_tokens=6, default_max_tokens=4
    )
    svg = media_server.add("/logo.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "x")

    def body(*urls: str) -> dict:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        content = [*parts, {"type": "text", "text": "Describe this video"}]
        return {"model": "tiny", "messages": [{"role": "user", "content": content}]}

    async for client in start_client(settings):
        for url in (
            media_server.add("/clip.mp4", video, "video/mp4"),
            media_server.add("/signed/v1", video, "application/octet-stream"),
            media_server.add("/misnamed.jpg", video, "image/jpeg"),
            video_uri(video),
        ):
            before = len(media_server.requested)
            response = await client.post("/v2/media/completions", json=body(url))
            assert response.status_code == 200, (url, response.text)
            answer = response.json()
            assert len(answer["frames"]) == 4, url  # 2 s at 2 fps, captioned
            assert answer["usage"]["prompt_tokens_details"]["video_tokens"] > 0
            assert len(media_server.requested) - before == (0 if url.startswith("data:") else 1)
        # An image among them stays an image (and by URL is downloaded once as well)
        picture = media_server.add("/signed/p1", image, "application/octet-stream")
        response = await client.post("/v2/media/completions", json=body(picture, video_uri(video)))
        assert response.status_code == 200, response.text
        details = response.json()["usage"]["prompt_tokens_details"]
        assert details["image_tokens"] > 0 and details["video_tokens"] > 0
        spooled = (settings.data_dir / "spool").rglob("*")
        assert not [p for p in spooled if p.is_file() and p.name != ".lock"]
        response = await client.post("/v1/chat/completions", json=body(video_uri(video)))
        assert response.status_code == 400 and "video_url" in response.json()["error"]["message"]
        response = await client.post("/v2/media/completions", json=body(svg))
        error = response.json()["error"]
        assert response.status_code == 400 and "it is an SVG" in error["message"], error
        assert error["param"] == "messages[0].content[0]", error
        spooled = (settings.data_dir / "spool").rglob("*")
        assert not [p for p in spooled if p.is_file() and p.name != ".lock"]


def hanging_at(url: str, fetch: Any, reached: asyncio.Event) -> Any:
    """fetch, except that the download of `url` hangs (once reached is set)."""

    async def fetch_or_hang(fetched_url: str, *args: Any) -> Any:
        if fetched_url == url:
            reached.set()
            await asyncio.Event().wait()
        return await fetch(fetched_url, *args)

    return fetch_or_hang


async def test_image_url_parts_judged_a_few_at_a_time_within_the_limits(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer
) -> None:
    """Every /v2 image_url URL may be a video, so each is downloaded at a video's size: a few
    at once (a hung one does not hold the others back), the request's bytes charged as they
    arrive (three images over the request's allowance are a 400 however they interleave) and
    its video count checked as each is judged; an error or a request cancelled while it
    judges (its client gone) leaves none of its downloads in the spool."""
    image, video = make_image(320, 240), make_video(seconds=1)
    assert len(image) > len(video)  # (two videos or two images fit the allowance, not three)
    settings = make_settings(
        tiny_model_dir,
        data_dir=tmp_path / "data",
        default_max_tokens=4,
        max_media_bytes_per_request=len(image) * 5 // 2,
        max_videos_per_request=1,
    )
    videos = [media_server.add(f"/v{i}", video, "application/octet-stream") for i in range(3)]
    images = [media_server.add(f"/i{i}", image, "application/octet-stream") for i in range(3)]

    def body(urls: list[str]) -> dict:
        content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        return {"model": "tiny", "messages": [{"role": "user", "content": content}]}

    def spooled() -> list[Path]:
        files = (settings.data_dir / "spool").rglob("*")
        return [p for p in files if p.is_file() and p.name != ".lock"]

    async for client in start_client(settings):
        response = await client.post("/v2/media/completions", json=body(videos))
        assert_error(response, 400, "messages", "too_many_videos")
        assert not spooled()
        response = await client.post("/v2/media/completions", json=body(images))
        assert_error(response, 400, None, "media_budget_exceeded")
        assert not spooled()
        response = await client.post("/v2/media/completions", json=body(images[:2]))
        assert response.status_code == 200, response.text
        media = client.app.state.services.chat.media  # type: ignore[attr-defined]
        stalled = asyncio.Event()
        media.fetch_unknown = hanging_at(videos[0], media.fetch_unknown, stalled)
        from server.api.protocol import MediaCompletionRequest

        messages = MediaCompletionRequest.model_validate(body([videos[0], *images[:2]]))
        judging = asyncio.ensure_future(media.judged(messages.to_messages()))
        await stalled.wait()
        for _ in range(200):  # (the two images, downloaded while the video hangs)
            if len(spooled()) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(spooled()) == 2
        judging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await judging
        assert not spooled()
        # a part past the limits is the 400 at once, not once a slow host's download ends
        messages = MediaCompletionRequest.model_validate(body(videos)).to_messages()
        with pytest.raises(InvalidRequest, match="2 videos in one request"):
            await asyncio.wait_for(media.judged(messages), 20)
        assert not spooled()


async def test_media_options_reach_a_video_sent_as_an_image_url_part(
    tiny_model_dir: Path, tmp_path: Path, media_server: MediaServer
) -> None:
    """vLLM's media_io_kwargs / mm_processor_kwargs video options apply to a /v2 image_url
    part its bytes make a video, as to a video_url part (they were dropped: only the pixel
    range reached it)."""
    settings = make_settings(
        tiny_model_dir, data_dir=tmp_path / "data", caption_tokens=2, default_max_tokens=2
    )
    url = media_server.add("/signed/clip", make_video(seconds=4), "application/octet-stream")
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}]}
    async for client in start_client(settings):
        counts = []
        for options in (
            {},
            {"media_io_kwargs": {"video": {"num_frames": 2}}},
            {"mm_processor_kwargs": {"fps": 0.5}},
        ):
            response = await client.post("/v2/media/completions", json={**body, **options})
            assert response.status_code == 200, response.text
            counts.append(len(response.json()["frames"]))
        assert counts == [8, 2, 2], counts
        # the part's own pixel range is its frames' (it was dropped: the default range)
        tokens, large = [], make_video(seconds=2, width=640, height=480)
        big = media_server.add("/signed/big", large, "application/octet-stream")
        for image_url in ({"url": big}, {"url": big, "max_pixels": 150_000}):
            content = [{"type": "image_url", "image_url": image_url}, {"type": "text", "text": "?"}]
            answer = await client.post(
                "/v2/media/completions",
                json={
                    **body,
                    "messages": [{"role": "user", "content": content}],
                    "video_mode": "native",
                },
            )
            assert answer.status_code == 200, answer.text
            tokens.append(answer.json()["usage"]["prompt_tokens_details"]["video_tokens"])
        assert tokens[1] < tokens[0], tokens


async def test_qwen_vl_utils_options_in_a_part(video_client: httpx.AsyncClient) -> None:
    """A part's own pixel range, as qwen-vl-utils sets one per image (inside image_url or
    beside it; two images of one request may differ; it was ignored: the auto budget),
    nframes and num_frames as max_frames; its options this server does not take are 400s naming them
    (video_start was ignored: the whole video, answered about another part of it)."""
    image = "data:image/jpeg;base64," + base64.b64encode(make_image(1280, 960)).decode()

    async def post(*parts: dict) -> httpx.Response:
        body = {"model": "tiny", "messages": [{"role": "user", "content": list(parts)}]}
        return await video_client.post("/v1/chat/completions", json=body)

    small = {"min_pixels": 3136, "max_pixels": 200704}
    counts = []
    for parts in (
        [{"type": "image_url", "image_url": {"url": image}}],
        [{"type": "image_url", "image_url": {"url": image, **small}}],
        [{"type": "image_url", "image_url": {"url": image}, **small}],
        [
            {"type": "image_url", "image_url": {"url": image, **small}},
            {"type": "image_url", "image_url": {"url": image}},
        ],
    ):
        response = await post(*parts)
        assert response.status_code == 200, response.text
        counts.append(response.json()["usage"]["prompt_tokens_details"]["image_tokens"])
    assert counts[1] == counts[2] <= 256 < counts[0], counts
    assert counts[3] == counts[0] + counts[1], counts
    for bad, param in (
        ({"url": image, "min_pixels": 9000, "max_pixels": 4000}, "min_pixels is above"),
        ({"url": image, "resized_height": 224}, "resized_height (qwen-vl-utils' option)"),
    ):
        response = await post({"type": "image_url", "image_url": bad})
        error = assert_error(response, 400)
        assert param in error["message"], error
    video = video_uri(make_video(seconds=4))
    tokens = []
    # (num_frames, vLLM's name, was ignored inside a part)
    for options in ({}, {"nframes": 4}, {"num_frames": 4}):
        response = await video_client.post(
            "/v1/chat/completions", json=video_body(video, video=options)
        )
        assert response.status_code == 200, response.text
        tokens.append(response.json()["usage"]["prompt_tokens_details"]["video_tokens"])
    assert tokens[1] * 2 == tokens[0] and tokens[2] == tokens[1], tokens
    both = video_body(video, video={"nframes": 6, "max_frames": 4})  # (the least, as a request's)
    response = await video_client.post("/v1/chat/completions", json=both)
    assert response.json()["usage"]["prompt_tokens_details"]["video_tokens"] == tokens[1]
    beside = video_body(video)
    beside["messages"][0]["content"][1]["nframes"] = 4  # (beside video_url, as qwen-vl-utils)
    response = await video_client.post("/v1/chat/completions", json=beside)
    assert response.json()["usage"]["prompt_tokens_details"]["video_tokens"] == tokens[1]
    # total_pixels (Qwen3-VL's example sends it): the frames' pixels together, inside or beside
    total = video_body(video, video={"total_pixels": 8 * 50_000})
    beside = video_body(video)
    beside["messages"][0]["content"][1]["total_pixels"] = 8 * 50_000
    for body in (total, beside):
        response = await video_client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens_details"]["video_tokens"] < tokens[0]
    for name in ("video_start", "video_end", "min_frames", "resized_width"):
        body = video_body(video, video={name: 2})
        error = assert_error(await video_client.post("/v1/chat/completions", json=body), 400)
        assert f"{name} (qwen-vl-utils' option) is not taken here" in error["message"], error
        body = video_body(video)
        body["messages"][0]["content"][1][name] = 2  # (beside it: refused too, not ignored)
        error = assert_error(await video_client.post("/v1/chat/completions", json=body), 400)
        assert f"{name} (qwen-vl-utils' option) is not taken here" in error["message"], error
