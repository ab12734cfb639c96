"""`serve --help` and the README's flag table come from one source and cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import build_parser
from server.config import Settings
from server.flag_help import HELP, default_text, flag_name, markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("name", ["flags", "vllm-flags"])
def test_readme_flag_tables_are_generated(name: str) -> None:
    from server import vllm_flags

    text = README.read_text()
    table = text.split(f"<!-- {name}:begin -->\n", 1)[1].split(f"\n<!-- {name}:end -->", 1)[0]
    expected = markdown_table() if name == "flags" else vllm_flags.markdown_table()
    assert table == expected, "run `make readme-flags` and commit README.md"


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_flag_has_a_sentence_and_a_default(name: str) -> None:
    assert HELP.get(name), f"add a help sentence for {flag_name(name)} to server/flag_help.py"
    assert default_text(name, Settings.model_fields[name])


def test_help_shows_units_and_what_zero_means(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: 20 MiB." in text  # --max-image-bytes, not 20971520
    assert "Default: 0 = the model's context length." in text  # --max-model-len
    assert "Default: 0 = measured (CUDA) or up to 4 GiB (CPU)." in text  # --kv-cache-memory
    assert "Default: 60 s." in text  # --queue-timeout
    assert "Default: 1 GiB." in text  # --encoder-cache-memory


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from server import __version__

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vlm-server {__version__}"


def test_make_tiny_model_help_describes_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["make-tiny-model", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Context length in tokens. At least 1. Default: 8192." in text
    assert "Directory to write the checkpoint to." in text
