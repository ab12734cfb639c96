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


class BadWords:
    """A request's bad words indexed for the step: the one-token words, and the longer
    spellings by their next-to-last token, so a step looks only at the spellings the answer's
    last token could be completing."""

    def __init__(self, sequences: WordIds):
        self.always = tuple(ids[0] for ids in sequences if len(ids) == 1)
        self.after: dict[int, list[tuple[int, ...]]] = {}
        for ids in sequences:
            if len(ids) > 1:
                self.after.setdefault(ids[-2], []).append(ids)

    @classmethod
    def of(cls, sequences: WordIds) -> BadWords | None:
        return cls(sequences) if sequences else None

    def banned_next(self, output: list[int]) -> tuple[int, ...]:
        """The tokens that would complete a bad word after `output` (the answer so far)."""
        if not output:
            return self.always
        banned = list(self.always)
        for ids in self.after.get(output[-1], ()):
            prefix = len(ids) - 1
            if prefix <= len(output) and tuple(output[-prefix:]) == ids[:-1]:
                banned.append(ids[-1])
        return tuple(banned)
