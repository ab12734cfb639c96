"""Token ids -> text deltas for one sequence, with stop strings.

Two rules make streamed text equal the final text: never emit a partial UTF-8 character (the
tokenizer decodes it as U+FFFD until the rest arrives), and hold back the last few characters
that could still turn out to be the start of a stop string.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        self.num_emitted_chars = 0
        self.stop_hit: str | None = None

    def add_token(self, token_id: int) -> str | None:
        """Append one generated token; returns the stop string if the text now contains one."""
        self.token_ids.append(token_id)
        # Decoding the whole output keeps byte-level BPE merges right across token boundaries.
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith(REPLACEMENT_CHAR):
            return None  # wait for the rest of the character
        self.text = text
        return self._truncate_at_stop()

    def _truncate_at_stop(self) -> str | None:
        hits = [(self.text.find(s), s) for s in self.stop if s in self.text]
        if not hits:
            return None
        index, self.stop_hit = min(hits)
        self.text = self.text[:index]
        return self.stop_hit

    def flush(self) -> str:
        """At the end, whatever is left, even an incomplete character (shown as U+FFFD)."""
        if self.token_ids and self.stop_hit is None:
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return self._emit(len(self.text))

    def delta(self) -> str:
        """New text that is safe to show now."""
        return self._emit(len(self.text) - self.holdback)

    def _emit(self, limit: int) -> str:
        if limit <= self.num_emitted_chars:
            return ""
        out = self.text[self.num_emitted_chars : limit]
        self.num_emitted_chars = limit
        return out
