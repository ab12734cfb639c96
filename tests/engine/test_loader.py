"""The loader: model resolution, device/dtype choice, refusals with clear messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from server.config import Settings
from server.engine.loader import (
    load_model,
    resolve_attention,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from server.engine.tiny import LAYOUT, MARKER, TinySpec, make_tiny_checkpoint
from server.exceptions import ModelLoadError


def engine_config(model: str, models_dir: Path, **overrides: object):
    return Settings(model=model, models_dir=models_dir, **overrides).engine_config()


@pytest.mark.parametrize(
    "fixture,family", [("tiny_model_dir", "qwen2-vl"), ("tiny25_model_dir", "qwen2.5-vl")]
)
def test_loads_both_families(fixture: str, family: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    # dtype auto, whatever the run's --dtype (the GPU check runs float32)
    loaded = load_model(engine_config(str(path), path.parent, dtype="auto"))
    assert loaded.family == family
    if loaded.device.type == "cpu":
        assert loaded.dtype == torch.float32  # auto on CPU
    else:
        assert loaded.dtype == torch.bfloat16  # auto on CUDA
    assert loaded.context_length == 8192
    assert loaded.image_token_id == loaded.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert loaded.model.config._attn_implementation == "sdpa"
    assert not loaded.model.training


def test_model_name_found_under_models_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models_dir / "acme" / "Qwen2-VL-Tiny")
    path = resolve_model_path("acme/Qwen2-VL-Tiny", models_dir)
    assert path == models_dir / "acme" / "Qwen2-VL-Tiny"


def test_tiny_is_built_once_under_models_dir(tmp_path: Path) -> None:
    path = resolve_model_path("tiny", tmp_path)
    assert path == tmp_path / "tiny-qwen2-vl" and (path / "model.safetensors").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("tiny", tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_tiny_checkpoint_an_older_builder_wrote_is_built_again(tmp_path: Path) -> None:
    """A models/tiny-* from before the builder's last change (its marker has no or an older
    layout) is rebuilt from its own spec when served by name; a current one is left alone."""
    path = make_tiny_checkpoint(tmp_path / "tiny", TinySpec(num_layers=3))
    marker = json.loads((path / MARKER).read_text())
    (path / MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "layout"}))
    assert resolve_model_path("tiny", tmp_path) == path
    rebuilt = json.loads((path / MARKER).read_text())
    assert rebuilt["layout"] == LAYOUT and rebuilt["spec"]["num_layers"] == 3
    mtime = (path / MARKER).stat().st_mtime_ns
    assert resolve_model_path("tiny", tmp_path) == path
    assert (path / MARKER).stat().st_mtime_ns == mtime


def test_a_tiny_name_with_a_checkpoint_of_its_own_serves_that_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`make-tiny-model models/tiny`, then `--model tiny --models-dir models`: the checkpoint the
    operator built is served, not a second one built beside it."""
    shutil.copytree(tiny_model_dir, tmp_path / "tiny")
    assert resolve_model_path("tiny", tmp_path) == tmp_path / "tiny"
    assert not (tmp_path / "tiny-qwen2-vl").exists()


def test_missing_hub_model_offline_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path("Qwen/Qwen2-VL-2B-Instruct", tmp_path / "models")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message
    assert "hf download Qwen/Qwen2-VL-2B-Instruct" in message


def test_quantization_refused_without_cuda(tiny_model_dir: Path) -> None:
    config = engine_config(
        str(tiny_model_dir), tiny_model_dir.parent, quantization="bnb-4bit", device="cpu"
    )
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        load_model(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_cuda_requested_without_gpu(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        load_model(engine_config(str(tiny_model_dir), tiny_model_dir.parent, device="cuda"))


def test_refuses_non_qwen_checkpoints(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = shutil.copytree(tiny_model_dir, tmp_path / "llama")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="'llama' checkpoint"):
        load_model(engine_config(str(other), tmp_path))


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"num_hidden_layers": 0, "layer_types": []}, "the text model's num_hidden_layers is 0"),
        ({"max_position_embeddings": 0}, "the text model's max_position_embeddings is 0"),
        ({"num_hidden_layers": 3}, "could not load the checkpoint in .*layer_types"),
        # weights of another size (a config.json from another checkpoint), heads of 0
        ({"hidden_size": 32}, "weights' shapes do not match config.json"),
        ({"num_attention_heads": 0}, "could not load the checkpoint in .*ZeroDivisionError"),
    ],
)
def test_refuses_a_text_model_it_cannot_serve_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    """A config edited to 0 layers crashed the engine's start with an IndexError traceback;
    one transformers' own checks refuse, or whose weights do not match, was a traceback too.
    Each is one line."""
    edited = shutil.copytree(tiny_model_dir, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    config["text_config"].update(edit)
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(engine_config(str(edited), tmp_path))
    assert "\n" not in str(info.value) and len(str(info.value)) < 1000


def test_refuses_checkpoints_without_safetensors(tiny_model_dir: Path, tmp_path: Path) -> None:
    pickled = shutil.copytree(tiny_model_dir, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(engine_config(str(pickled), tmp_path))


def test_dtype_and_attention_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cuda) == torch.float16
    assert resolve_attention("auto", cpu) == "sdpa"
    assert resolve_attention("sdpa", cuda) == "sdpa"
    # flash-attention asked for: one line before loading where it cannot run, not an
    # ImportError deep in transformers
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="needs the flash-attn package"):
        resolve_attention("flash_attention_2", cuda)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: name == "flash_attn")
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        resolve_attention("flash_attention_2", cpu, torch.float32)
    assert resolve_attention("flash_attention_2", cuda) == {
        "": "sdpa",
        "text_config": "sdpa",
        "vision_config": "flash_attention_2",
    }
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_a_damaged_checkpoint_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An interrupted download (weights cut short) or a broken config.json: the reason and
    the file, not a traceback from the library that read it."""
    cut = shutil.copytree(tiny_model_dir, tmp_path / "cut")
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[:7])
    with pytest.raises(ModelLoadError, match="damaged or incomplete"):
        load_model(engine_config(str(cut), tmp_path))
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / "config.json").write_text('{"model_type": ')
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_model(engine_config(str(broken), tmp_path))


@pytest.mark.parametrize(
    "requested,expected", [("auto", "cuda:0"), ("cuda", "cuda:0"), ("cuda:1", "cuda:1")]
)
def test_cuda_devices_carry_an_index(
    requested: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine thread binds its device with torch.cuda.set_device, which refuses "cuda"
    without an index (the engine died at start with --device auto on every GPU)."""
    from torch.cuda._utils import _get_device_index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    device = resolve_device(requested)
    assert str(device) == expected
    assert _get_device_index(device) == device.index  # what set_device calls: no ValueError


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loads_on_cuda_in_bfloat16(tiny_model_dir: Path) -> None:
    config = engine_config(str(tiny_model_dir), tiny_model_dir.parent, device="cuda", dtype="auto")
    loaded = load_model(config)
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bnb_4bit_keeps_the_vision_tower_unquantized(tiny_model_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    config = engine_config(
        str(tiny_model_dir), tiny_model_dir.parent, device="cuda", quantization="bnb-4bit"
    )
    model = load_model(config).model
    linears = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    text = [t for name, t in linears.items() if "language_model" in name]
    vision = [t for name, t in linears.items() if "visual" in name]
    assert text and all(issubclass(t, bnb.nn.Linear4bit) for t in text)
    assert vision and not any(issubclass(t, bnb.nn.Linear4bit) for t in vision)


def test_triton_attention_without_cuda_is_refused_before_loading(
    tiny_model_dir, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """An operator with a real checkpoint should not wait for its load to learn that."""
    import transformers

    def loads(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded first")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", loads)
    settings = Settings(model=str(tiny_model_dir), device="cpu", attention_backend="triton")
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        load_model(settings.engine_config())
