"""vLLM's /tokenize and /detokenize: the ids and count of a text prompt or of chat messages
(their images and videos counted as a chat completion counts them), and ids back to text."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from transformers import AutoTokenizer

from server.api.routes.health import model_card
from tests.api.test_errors import assert_error
from tests.api.test_video_api import video_uri
from tests.helpers import data_uri, make_image, make_video

pytestmark = pytest.mark.anyio


async def post(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    response = await client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def test_text_prompt_round_trip(client: httpx.AsyncClient) -> None:
    tokens = await post(client, "/tokenize", {"model": "tiny", "prompt": "Hello there, cat"})
    assert tokens["count"] == len(tokens["tokens"]) > 1 and tokens["token_strs"] is None
    assert tokens["max_model_len"] == client.app.state.services.engine.max_seq_len  # type: ignore[attr-defined]
    text = await post(client, "/detokenize", {"model": "tiny", "tokens": tokens["tokens"]})
    assert text == {"prompt": "Hello there, cat"}
    named = await post(client, "/tokenize", {"prompt": "Hello", "return_token_strs": True})
    assert named["token_strs"] == ["H", "e", "ll", "o"]  # the tiny tokenizer's pieces
    completion = {"model": "tiny", "prompt": "Hello there, cat", "max_tokens": 1}
    usage = (await post(client, "/v1/completions", completion))["usage"]
    assert usage["prompt_tokens"] == tokens["count"]
    # A benchmark on this machine (vllm bench serve) counts tokens with the tokenizer of the
    # model card's root: an absolute directory, whatever the server's working directory.
    root = (await client.get("/v1/models/tiny")).json()["root"]
    tokenizer = AutoTokenizer.from_pretrained(root)
    assert Path(root).is_absolute() and tokenizer("Hello there, cat").input_ids == tokens["tokens"]


async def test_tokenizer_info_is_what_lm_evals_remote_tokenizer_reads(
    client: httpx.AsyncClient,
) -> None:
    """GET /tokenizer_info (vLLM's): lm-eval's remote tokenizer reads the special tokens and
    the chat template from it and tokenizes through /tokenize, as it sends it (no model)."""
    response = await client.get("/tokenizer_info")
    assert response.status_code == 200, response.text
    info = response.json()
    services = client.app.state.services  # type: ignore[attr-defined]
    assert info["eos_token"] == services.engine.tokenizer.eos_token == "<|im_end|>"
    assert info["model_max_length"] == services.engine.max_seq_len
    assert info["chat_template"] == services.chat.input_builder.processor.chat_template
    assert info["tokenizer_class"] and {"bos_token", "pad_token", "unk_token"} <= set(info)
    eos = await post(
        client, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}
    )
    assert eos["tokens"] == [services.engine.tokenizer.eos_token_id]


@pytest.mark.parametrize("media", ["none", "image", "video"])
async def test_chat_count_is_the_completions_prompt_tokens(
    client: httpx.AsyncClient, media: str
) -> None:
    content: list[dict] = [{"type": "text", "text": "What is in this?"}]
    if media == "image":
        url = data_uri(make_image(160, 120))
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    elif media == "video":
        url = video_uri(make_video(seconds=2, fps=4))
        content.insert(0, {"type": "video_url", "video_url": {"url": url}})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    tokens = await post(client, "/tokenize", {"model": "tiny", "messages": messages})
    chat = {"model": "tiny", "messages": messages, "max_tokens": 1}
    usage = (await post(client, "/v1/chat/completions", chat))["usage"]
    assert tokens["count"] == usage["prompt_tokens"] == len(tokens["tokens"])
    details = usage["prompt_tokens_details"]
    media_tokens = details.get("image_tokens", 0) + details.get("video_tokens", 0)
    assert (media_tokens > 0) == (media != "none")
    text = (await post(client, "/detokenize", {"tokens": tokens["tokens"]}))["prompt"]
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")


async def test_chat_template_options_and_tools_change_the_prompt(
    client: httpx.AsyncClient,
) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    plain = await post(client, "/tokenize", {"messages": messages})
    prefill = await post(
        client, "/tokenize", {"messages": messages, "continue_final_message": True}
    )
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    tools = await post(client, "/tokenize", {"messages": messages, "tools": [tool]})
    decode = [
        (await post(client, "/detokenize", {"tokens": r["tokens"]}))["prompt"]
        for r in (plain, prefill, tools)
    ]
    assert decode[0].endswith("Hel<|im_end|>\n<|im_start|>assistant\n")
    assert decode[1].endswith("Hel")
    assert '"name": "f"' in decode[2] and tools["count"] > plain["count"]


async def test_a_chat_body_counts_as_the_chat_route_renders_it(client: httpx.AsyncClient) -> None:
    """The body a client is about to send, whole: tool_choice "none" leaves the tools out of
    the prompt, fields that only shape the answer change nothing."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "Hi"}]
    plain = await post(client, "/tokenize", {"messages": messages})
    extras = {"max_tokens": 3, "temperature": 0.2, "stream": True, "n": 2, "video_mode": "captions"}
    assert await post(client, "/tokenize", {"messages": messages, **extras}) == plain
    listed = await post(client, "/tokenize", {"messages": messages, "tools": [tool]})
    none = {"messages": messages, "tools": [tool], "tool_choice": "none", "model": "tiny"}
    assert (await post(client, "/tokenize", none))["count"] == plain["count"] < listed["count"]
    chat = {**none, "max_tokens": 1}
    usage = (await post(client, "/v1/chat/completions", chat))["usage"]
    assert usage["prompt_tokens"] == plain["count"]


@pytest.mark.parametrize("path", ["/tokenize", "/v1/chat/completions", "/v2/media/completions"])
async def test_a_media_placeholder_written_as_text_is_a_400(
    client: httpx.AsyncClient, path: str
) -> None:
    """ "<|image_pad|>" in a message's text would be read as an image with no pixels (the
    processor raised: a 500); an async job is refused before it is accepted."""
    messages = [{"role": "user", "content": "What is <|image_pad|>?"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 2}
    if path.startswith("/v2"):
        body["async"] = True
    assert_error(await client.post(path, json=body), 400, "messages")


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "x"}]}]}, 400, None),
        ("/tokenize", {"prompt": "x", "messages_typo": []}, 400, "messages_typo"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "bogus": 1}, 400, "bogus"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
        ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"tokens": [99999999]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
        ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
    ],
)
async def test_bad_bodies_are_openai_errors(
    client: httpx.AsyncClient, path: str, body: dict, status: int, param: str | None
) -> None:
    assert_error(await client.post(path, json=body), status, param)


async def test_an_unreachable_image_is_a_400_naming_it(client: httpx.AsyncClient) -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    response = await client.post(
        "/tokenize", json={"messages": [{"role": "user", "content": [part]}]}
    )
    assert_error(response, 400, "messages[0].content[0]")


def test_the_model_cards_root_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--model tiny (or a folder under a relative --models-dir) is served from a relative
    path: the card names it from /, so a tool running elsewhere on this machine finds it."""
    monkeypatch.chdir(tmp_path)
    loaded = SimpleNamespace(path=Path("models/tiny-qwen2-vl"))
    services = SimpleNamespace(loaded=loaded, started_at=0, engine=SimpleNamespace(max_seq_len=8))
    card = model_card(services, "tiny")  # type: ignore[arg-type]
    assert card.root == str(tmp_path.resolve() / "models" / "tiny-qwen2-vl")
