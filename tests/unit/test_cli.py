"""CLI: serve flags mirror Settings and VLM_* env vars; make-tiny-model writes a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cli import build_parser, main, settings_from_args


def test_serve_flags_mirror_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_API_KEYS", "env-a, env-b")
    monkeypatch.setenv("VLM_PORT", "9000")
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "/m",
            "--served-model-name",
            "a/b",
            "--served-model-name",
            "c",
            "--quantization",
            "bnb-4bit",
            "--no-quantize-vision",
            "--port",
            "8001",
        ]
    )
    settings = settings_from_args(args)
    assert settings.model == "/m"
    assert settings.served_model_names() == ["a/b", "c"]
    assert settings.quantization == "bnb-4bit" and settings.quantize_vision is False
    assert settings.port == 8001  # the flag wins over VLM_PORT
    assert settings.api_keys == ["env-a", "env-b"]  # from the env, comma-separated


def test_served_model_name_defaults_to_model() -> None:
    settings = settings_from_args(build_parser().parse_args(["serve", "--model", "Qwen/X"]))
    assert settings.served_model_names() == ["Qwen/X"]


def test_bad_flag_values_are_refused() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "gptq"])
    with pytest.raises(ValueError):
        settings_from_args(build_parser().parse_args(["serve", "--device", "tpu"]))


def test_make_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "tiny25"
    assert main(["make-tiny-model", str(out), "--family", "qwen2.5-vl", "--hidden-size", "32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["text_config"]["hidden_size"] == 32
    assert main(["make-tiny-model", str(tmp_path / "bad"), "--vision-heads", "3"]) == 2


def test_json_logs_carry_the_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from server.log import configure_logging, request_id_var

    configure_logging("info", "json")
    request_id_var.set("req-42")
    logging.getLogger("server.test").info("hello %s", "there")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line) | {"time": None} == {
        "time": None,
        "level": "INFO",
        "logger": "server.test",
        "request_id": "req-42",
        "message": "hello there",
    }
    logging.getLogger().handlers = []
