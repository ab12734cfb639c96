"""Bad words (vLLM's `bad_words`): strings the answer must not contain, banned token by token.

A word becomes the token sequences it is written with: as the text's first word and after a
space (byte-level BPE tokenizers spell the two differently). While the answer ends with all
but the last token of a sequence, that last token is banned for the next step, so the word is
never completed (a one-token word is banned at every step). Only the answer's own tokens count,
not the prompt's, as in vLLM. Host work on lists the host already has: no device transfer.
"""

from __future__ import annotations

from typing import Protocol

WordIds = tuple[tuple[int, ...], ...]


class Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def token_sequences(words: tuple[str, ...], tokenizer: Encoder) -> WordIds:
    """Each word's token sequences: without and with a leading space (vLLM's rule: the spaced
    one only when it starts with another token and has as many tokens). A word that is only
    whitespace has no tokens: ValueError."""
    sequences: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not bare:
            raise ValueError(f"bad word {word!r} has no tokens")
        sequences.append(bare)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced[0] != bare[0] and len(spaced) == len(bare):
            sequences.append(spaced)
    return tuple(dict.fromkeys(sequences))  # in order, without repeats


def banned_next(sequences: WordIds, output: list[int]) -> tuple[int, ...]:
    """The tokens that would complete a bad word after `output` (the answer so far)."""
    banned = []
    for ids in sequences:
        prefix = len(ids) - 1
        if prefix > len(output):
            continue
        if prefix == 0 or tuple(output[-prefix:]) == ids[:-1]:
            banned.append(ids[-1])
    return tuple(banned)


def always_banned(sequences: WordIds) -> set[int]:
    """Tokens banned at every step: the one-token words."""
    return {ids[0] for ids in sequences if len(ids) == 1}
