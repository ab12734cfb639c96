"""Logprobs as clients read them: each sampled token's text, bytes and logprob, and the step's
most likely alternatives. The values are the model's raw distribution (see engine/sampler.py)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from server.engine.sampling import TokenLogprobs
from server.engine.sequence import Sequence
from server.exceptions import EngineStopped


@dataclass(frozen=True)
class TokenInfo:
    token: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob(TokenInfo):
    top: tuple[TokenInfo, ...]  # the most likely tokens of that step, most likely first


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for bytes (GPT-2's table, which Qwen's uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


# vLLM's prompt_logprobs entry of one prompt token: {token id: {"logprob", "rank",
# "decoded_token"}} for the token itself and the most likely tokens at its place.
PromptLogprobs = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class EchoedPrompt:
    """A prompt shown with its logprobs: the first token (nothing before it to score it by),
    then every other token with its logprob given the ones before it."""

    first: str
    scored: list[TokenLogprob]


class TokenTexts:
    """Token id -> (text, bytes), cached. A token may be part of a character: its bytes are
    exact, its text then shows U+FFFD for the incomplete part (as vLLM's does)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._describe(token_id)
        return found

    def _describe(self, token_id: int) -> tuple[str, bytes]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:  # the model's vocabulary is padded past the tokenizer's
            return "", b""
        byte_of = _byte_of_char()
        if token_id in self.tokenizer.added_tokens_decoder or not all(c in byte_of for c in piece):
            raw = piece.encode()
        else:
            raw = bytes(byte_of[c] for c in piece)
        return raw.decode("utf-8", errors="replace"), raw

    def as_token_ids(self) -> TokenTexts:
        """The same, each token shown as "token_id:{id}" (vLLM's return_tokens_as_token_ids)."""
        return TokenIdTexts(self.tokenizer)

    def info(self, token_id: int, logprob: float) -> TokenInfo:
        text, raw = self(token_id)
        return TokenInfo(text, raw, logprob)

    def logprobs(self, seq: Sequence, start: int, end: int) -> list[TokenLogprob]:
        """The sequence's output tokens [start, end) with their logprobs."""
        entries: list[TokenLogprobs] = seq.output_logprobs[start:end]
        return self._shown(seq.output_token_ids[start:end], entries)

    def prompt(self, seq: Sequence) -> EchoedPrompt:
        """The sequence's prompt tokens with their logprobs (sampling.prompt_logprobs set)."""
        _check_scored(seq)
        ids = seq.inputs.token_ids
        return EchoedPrompt(self(ids[0])[0], self._shown(ids[1:], seq.prompt_logprobs))

    def prompt_logprobs(self, seq: Sequence) -> list[PromptLogprobs | None]:
        """vLLM's `prompt_logprobs`: null for the first token (nothing before it scores it),
        then each token's entry, the token itself first."""
        _check_scored(seq)
        shown: list[PromptLogprobs | None] = [None]
        for token_id, entry in zip(seq.inputs.token_ids[1:], seq.prompt_logprobs, strict=True):
            tokens = {str(token_id): self._ranked(token_id, entry.logprob, entry.rank)}
            for rank, (top_id, logprob) in enumerate(entry.top, start=1):
                tokens.setdefault(str(top_id), self._ranked(top_id, logprob, rank))
            shown.append(tokens)
        return shown

    def _ranked(self, token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": logprob, "rank": rank, "decoded_token": self(token_id)[0]}

    def _shown(self, ids: list[int], entries: list[TokenLogprobs]) -> list[TokenLogprob]:
        """Each token with its logprob and its top entries, as texts and bytes."""
        return [
            TokenLogprob(*self(token_id), e.logprob, tuple(self.info(t, lp) for t, lp in e.top))
            for token_id, e in zip(ids, entries, strict=True)
        ]


def _check_scored(seq: Sequence) -> None:
    if len(seq.prompt_logprobs) < seq.inputs.num_prompt_tokens - 1:
        # Stopped before its prompt was scored (only the engine stopping does that to a
        # request someone still waits for): no half-scored prompt.
        raise EngineStopped("The server stopped before the prompt was scored; retry.")


class TokenIdTexts(TokenTexts):
    """Tokens as "token_id:{id}": what a client that needs exact ids asks for (a token that is
    part of a character, or special, shows no text of its own)."""

    def _describe(self, token_id: int) -> tuple[str, bytes]:
        text = f"token_id:{token_id}"
        return text, text.encode()
