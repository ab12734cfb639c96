"""bad_words: the token sequences a word is written with, and which token completes one."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.engine.bad_words import BadWords, token_sequences


def test_banned_next_completes_only_after_the_rest_of_the_word() -> None:
    words = BadWords(((5,), (1, 2), (1, 2, 3), (4, 4, 2, 3), (9, 9, 9)))
    assert words.banned_next([]) == (5,)  # a longer word cannot end at the first token
    assert words.banned_next([1]) == (5, 2)
    assert words.banned_next([7, 1, 2]) == (5, 3)
    assert words.banned_next([4, 2]) == (5,)  # (4, 4, 2, 3) needs both 4s
    assert words.banned_next([4, 4, 2]) == (5, 3)
    assert words.banned_next([1, 2, 1]) == (5, 2)
    assert words.banned_next([9]) == (5,) and words.banned_next([8, 9, 9]) == (5, 9)
    assert words.always == (5,)


def test_token_sequences_with_and_without_a_leading_space(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer.convert_tokens_to_ids
    assert token_sequences(("aa",), tokenizer) == ((ids("a"), ids("a")), (ids("Ġa"), ids("a")))
    assert token_sequences((" a", "a"), tokenizer) == ((ids("a"),), (ids("Ġa"),))  # once each
    with pytest.raises(ValueError):
        token_sequences((" \n",), tokenizer)
