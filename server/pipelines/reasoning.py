"""Reasoning text of thinking checkpoints (Qwen3-VL-*-Thinking) -> `reasoning_content`.

Their chat template ends the prompt with "<think>\\n", so the answer starts inside the
reasoning: everything before "</think>" is reasoning, what follows is the answer (`content`),
as vLLM's Qwen3 reasoning parser splits it. An answer cut off before "</think>" (max_tokens)
is all reasoning. A "<think>" the model writes again at the start is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.engine.inputs import THINK_CLOSE, THINK_OPEN


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, content) of a whole answer."""
    reasoning, closed, content = text.partition(THINK_CLOSE)
    reasoning = reasoning.removeprefix(THINK_OPEN).strip("\n")
    return reasoning, content.lstrip("\n") if closed else ""


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of `text` where the tokenizer has it as one token (Qwen3's "</think>"), else
    None."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def count_reasoning_tokens(output_token_ids: list[int], close_id: int) -> int:
    """The answer's tokens before its first "</think>" (all of them if it never came)."""
    try:
        return output_token_ids.index(close_id)
    except ValueError:
        return len(output_token_ids)


def answer_start(output_token_ids: list[int], close_id: int) -> int:
    """Where the answer proper starts: past the first "</think>" (the end, if none came)."""
    return min(count_reasoning_tokens(output_token_ids, close_id) + 1, len(output_token_ids))


@dataclass
class Reasoning:
    """A streamed piece of reasoning (a plain str piece is content)."""

    text: str


class ReasoningStream:
    """Splits streamed text at "</think>"; a tag split across deltas is held back."""

    def __init__(self) -> None:
        self.in_reasoning = True
        self.started = False  # some reasoning was sent (leading newlines are dropped)
        self.answer_started = False
        self.held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of one delta."""
        if not self.in_reasoning:
            return "", self._content(text)
        text = self.held + text
        self.held = ""
        reasoning, closed, content = text.partition(THINK_CLOSE)
        if closed:
            self.in_reasoning = False
            return self._reasoning(reasoning.rstrip("\n")), self._content(content)
        keep = partial_suffix(reasoning, THINK_CLOSE) or partial_suffix(reasoning, THINK_OPEN)
        self.held = reasoning[len(reasoning) - keep :]
        return self._reasoning(reasoning[: len(reasoning) - keep]), ""

    def finish(self) -> str:
        """Reasoning still held back when the answer ends."""
        held, self.held = self.held, ""
        return self._reasoning(held) if self.in_reasoning else ""

    def _reasoning(self, text: str) -> str:
        if not self.started:
            text = text.removeprefix(THINK_OPEN).lstrip("\n")
            self.started = bool(text)
        return text

    def _content(self, text: str) -> str:
        if not self.answer_started:
            text = text.lstrip("\n")
            self.answer_started = bool(text)
        return text


def partial_suffix(text: str, tag: str) -> int:
    """How many trailing characters of text could be the start of tag."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
