"""Tiny checkpoints: built offline, byte-identical across runs, loaded like hub checkpoints."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from server.engine.tiny import (
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN2_VL_SPECIAL_TOKENS,
    TinySpec,
    make_tiny_checkpoint,
    mrope_section,
)
from tests.helpers import make_image


def digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_same_bytes_on_every_run(tmp_path: Path, family: str) -> None:
    first = make_tiny_checkpoint(tmp_path / "a", TinySpec(family=family))
    second = make_tiny_checkpoint(tmp_path / "b", TinySpec(family=family))
    assert digest(first) == digest(second)
    size = sum(p.stat().st_size for p in first.iterdir())
    assert size < 2 * 1024 * 1024
    # readable by another user (a container's server user, built by root): not mkdtemp's 0700
    assert first.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in first.iterdir())


def test_a_directory_holding_something_else_is_never_wiped(tmp_path: Path) -> None:
    """make-tiny-model replaces only a tiny checkpoint (or an empty directory): a typo that
    names a downloaded model's directory must not delete it."""
    from server.cli import main

    real = tmp_path / "Qwen2-VL-7B-Instruct"
    real.mkdir()
    (real / "model-00001-of-00004.safetensors").write_bytes(b"weights")
    assert main(["make-tiny-model", str(real)]) == 2
    assert [p.name for p in real.iterdir()] == ["model-00001-of-00004.safetensors"]
    mine = make_tiny_checkpoint(tmp_path / "mine")  # its own directory: rebuilt in place
    assert main(["make-tiny-model", str(mine), "--num-layers", "1"]) == 0
    assert json.loads((mine / "config.json").read_text())["text_config"]["num_hidden_layers"] == 1
    (mine / "notes.txt").write_text("mine")  # ...unless something else was put there since
    assert main(["make-tiny-model", str(mine)]) == 2
    assert (mine / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    assert main(["make-tiny-model", str(tmp_path / "file")]) == 2
    assert main(["make-tiny-model", str(real), "--force"]) == 0  # asked for: replaced
    assert (real / "config.json").is_file() and not (
        real / "model-00001-of-00004.safetensors"
    ).exists()


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny25_model_dir"])
def test_loads_like_a_hub_checkpoint(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    assert {p.name for p in path.iterdir()} >= {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True)
    tokenizer = processor.tokenizer
    config = model.config

    # Special tokens in Qwen's order, at consecutive ids that the config agrees with.
    ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    # ... outside vocab_size and listed as special, as in Qwen's tokenizers (a benchmark's
    # random prompts, drawn below vocab_size, held <|image_pad|>)
    assert ids[0] == tokenizer.vocab_size
    assert set(QWEN2_VL_SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.text_config.vocab_size >= len(tokenizer)
    assert config.text_config.vocab_size % 64 == 0
    assert set(model.generation_config.eos_token_id) == {
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }
    assert processor.chat_template == QWEN2_VL_CHAT_TEMPLATE
    # Special tokens are never split and text round-trips through the byte-level BPE.
    text = "<|im_start|>user\nWhat's in this image? ünïcödé 🙂<|im_end|>"
    encoded = tokenizer(text)["input_ids"]
    assert encoded[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(encoded) == text

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )

    inputs = processor(
        text=[prompt], images=[Image.open(io.BytesIO(make_image(112, 56)))], return_tensors="pt"
    )
    assert (inputs["input_ids"] == config.image_token_id).sum() == 8  # (112/28) * (56/28)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3


def test_mrope_section_sums_to_half_the_head_dim() -> None:
    for head_dim in (16, 32, 64, 128):
        section = mrope_section(head_dim)
        assert sum(section) == head_dim // 2
    assert mrope_section(128) == [16, 24, 24]  # Qwen2-VL's own split


def test_bench_sized_checkpoint(tmp_path: Path) -> None:
    spec = TinySpec(hidden_size=128, num_layers=3, num_heads=4, vision_embed_dim=64, vision_heads=4)
    path = make_tiny_checkpoint(tmp_path / "bench", spec)
    config = json.loads((path / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 128
    assert config["vision_config"]["hidden_size"] == 128  # merger output = text width


@pytest.mark.parametrize(
    "sizes,message",
    [
        ({"num_layers": 0}, "--num-layers must be at least 1 (got 0)"),
        ({"max_position_embeddings": -1}, "--max-position-embeddings must be at least 1"),
        ({"bpe_vocab_size": 0}, "--bpe-vocab-size must be at least 256"),
        ({"hidden_size": -4}, "--hidden-size must be at least 2 (got -4)"),
        ({"num_heads": 3}, "--hidden-size / --num-heads must be an even whole number (64 / 3"),
        ({"num_kv_heads": 3}, "--num-heads must be a multiple of --num-kv-heads"),
        ({"vision_embed_dim": 30, "vision_heads": 3}, "--vision-embed-dim / --vision-heads"),
        # experts 15 wide: built, then every request a 500 (torch's grouped matmul refused it)
        (
            {"family": "qwen3-vl-moe", "intermediate_size": 40},
            "--hidden-size and the experts' width (3/8 of --intermediate-size) to be multiples "
            "of 8 (64 and 15 here)",
        ),
    ],
)
def test_a_size_no_checkpoint_can_have_is_refused_naming_its_flag(
    tmp_path: Path, sizes: dict[str, int], message: str
) -> None:
    """Refused before anything is written (0 layers had made a checkpoint serve crashed on;
    a context of -1 one it served as "context -1 tokens")."""
    with pytest.raises(ValueError) as info:
        make_tiny_checkpoint(tmp_path / "bad", TinySpec(**sizes))
    assert message in str(info.value)
    assert not (tmp_path / "bad").exists()


def test_invalid_spec_is_refused(tmp_path: Path) -> None:
    # square experts (2 x 24 = 48): their hub layout could not be told apart when loading
    square = TinySpec(family="qwen3-vl-moe", hidden_size=48, num_heads=4, intermediate_size=64)
    with pytest.raises(ValueError, match="experts"):
        make_tiny_checkpoint(tmp_path / "square", square)
