"""Incremental detokenization: no broken UTF-8, stop strings never leak into the output."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def run(
    tokenizer, text: str, stop: tuple[str, ...] = (), include_stop: bool = False
) -> tuple[list[str], str, str | None]:
    detok = IncrementalDetokenizer(tokenizer, stop, include_stop)
    deltas, hit = [], None
    for token_id in tokenizer(text)["input_ids"]:
        hit = detok.add_token(token_id)
        if hit:
            break
        deltas.append(detok.delta())
    deltas.append(detok.flush())
    return deltas, "".join(deltas), hit


def test_multibyte_characters_are_never_split(tokenizer) -> None:
    text = "héllo 🙂 wörld 日本"
    # The tiny BPE has no merges for these: each one is several byte-level tokens.
    assert len(tokenizer(text)["input_ids"]) > len(text)
    deltas, joined, _ = run(tokenizer, text)
    assert joined == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_truncates_and_is_not_streamed(tokenizer) -> None:
    deltas, joined, hit = run(tokenizer, "The cat sat. STOP here and more", stop=("STOP",))
    assert hit == "STOP"
    assert joined == "The cat sat. "
    assert "S" not in "".join(deltas)


def test_include_stop_str_in_output_keeps_the_stop_string_only(tokenizer) -> None:
    _, joined, hit = run(tokenizer, "The cat sat. STOP here and more", ("STOP",), include_stop=True)
    assert hit == "STOP" and joined == "The cat sat. STOP"


def test_earliest_stop_string_wins(tokenizer) -> None:
    _, joined, hit = run(tokenizer, "one two three four", stop=("four", "two"))
    assert hit == "two" and joined == "one "


def test_no_stop_emits_everything(tokenizer) -> None:
    _, joined, hit = run(tokenizer, "a plain sentence", stop=("zzz",))
    assert hit is None and joined == "a plain sentence"


@pytest.mark.parametrize(
    "text",
    [
        "Plain English, with punctuation; and numbers 12345.",
        "Mixed 🙂 emoji 👩‍👩‍👧 and accents: déjà vu, naïve, Zürich — «quotes».",
        "中文和日本語のテキスト、한국어도。",
        "  leading spaces\n\nnew lines\ttabs  ",
    ],
)
def test_streamed_text_equals_the_full_decode(tokenizer, text: str) -> None:
    deltas, joined, _ = run(tokenizer, text * 5)
    assert joined == tokenizer.decode(tokenizer(text * 5)["input_ids"])
    assert all("\ufffd" not in d for d in deltas)


def test_long_outputs_cost_linear_time(tokenizer) -> None:
    """Each step decodes a short window, never the whole output."""
    calls: list[int] = []

    class CountingTokenizer:
        def decode(self, ids, **kwargs):
            calls.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    detok = IncrementalDetokenizer(CountingTokenizer())
    for token_id in tokenizer("word " * 2000)["input_ids"]:
        detok.add_token(token_id)
    assert max(calls) <= 16


def test_stop_strings_wait_for_min_tokens(tokenizer) -> None:
    """Text of the tokens before min_tokens is not searched (vLLM's rule), but a stop string
    that begins there and ends in a later token is found."""
    ids = [tokenizer.encode(c)[0] for c in "abcab"]  # one token a character (tiny BPE)
    early = IncrementalDetokenizer(tokenizer, ("b",))
    assert [early.add_token(i, check_stop=n >= 3) for n, i in enumerate(ids)][-1] == "b"
    assert early.flush() == "abca"
    # a short stop beside a long one: the long one's hold-back is no reason to look back
    mixed = IncrementalDetokenizer(tokenizer, ("b", "xyzzy"))
    assert [mixed.add_token(i, check_stop=n >= 3) for n, i in enumerate(ids)][-1] == "b"
    assert mixed.flush() == "abca"
    across = IncrementalDetokenizer(tokenizer, ("ca",))
    hits = [across.add_token(i, check_stop=n >= 3) for n, i in enumerate(ids[:4])]
    assert hits == [None, None, None, "ca"] and across.flush() == "ab"
