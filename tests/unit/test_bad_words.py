"""bad_words: the token sequences a word is written with, and which token completes one."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.engine.bad_words import always_banned, banned_next, token_sequences


def test_banned_next_completes_only_after_the_rest_of_the_word() -> None:
    words = ((5,), (1, 2), (1, 2, 3))
    assert banned_next(words, []) == (5,)  # a longer word cannot end at the first token
    assert banned_next(words, [1]) == (5, 2)
    assert banned_next(words, [7, 1, 2]) == (5, 3)
    assert banned_next(words, [1, 2, 1]) == (5, 2)
    assert always_banned(words) == {5}


def test_token_sequences_with_and_without_a_leading_space(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer.convert_tokens_to_ids
    assert token_sequences(("aa",), tokenizer) == ((ids("a"), ids("a")), (ids("Ġa"), ids("a")))
    assert token_sequences((" a", "a"), tokenizer) == ((ids("a"),), (ids("Ġa"),))  # once each
    with pytest.raises(ValueError):
        token_sequences((" \n",), tokenizer)
