"""Token ids -> text deltas for one sequence, with stop strings, in linear time.

Byte-level BPE tokens are not characters: a character may span tokens and a token's text may
depend on its neighbours. Like vLLM, we decode a short window of recent tokens twice (with and
without the newest) and take the difference, so each step costs O(window), not O(output).

Two rules make streamed text equal the final text: never emit a partial UTF-8 character (the
window decodes to U+FFFD until the rest arrives), and hold back the last characters that could
still turn out to be the start of a stop string.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# Tokens decoded before the new ones, so merges and spacing at the boundary come out right.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        stop: tuple[str, ...] = (),
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        # vLLM's; an ending token (EOS, a stop token id) reaches here only when its text is
        # wanted (include_stop_str_in_output)
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(s for s in stop if s)
        self.include_stop = include_stop  # vLLM's include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        self.num_emitted_chars = 0
        self.stop_hit: str | None = None
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # tokens before this are already in self.text

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one generated token; returns the stop string if the text now contains one.
        `check_stop` false (the answer is still short of min_tokens): its text is not searched,
        but a stop string that begins in it and ends in a later token's is found then (vLLM's
        rule)."""
        self.token_ids.append(token_id)
        window = self.token_ids[self._prefix_offset :]
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(window)
        if full.endswith(REPLACEMENT_CHAR) or len(full) <= len(prefix):
            return None  # an incomplete character (or nothing visible yet): wait
        new_start = len(self.text)
        self.text += full[len(prefix) :]
        self._read_offset = len(self.token_ids)
        self._prefix_offset = max(0, self._read_offset - CONTEXT_TOKENS)
        return self._truncate_at_stop(new_start) if check_stop else None

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _truncate_at_stop(self, new_start: int) -> str | None:
        """The earliest stop string that ends in the text from new_start on (each searched
        from where it could begin: text before min_tokens was not searched at all)."""
        hits = [
            (i, s)
            for s in self.stop
            if (i := self.text.find(s, max(0, new_start - len(s) + 1))) >= 0
        ]
        if not hits:
            return None
        index, self.stop_hit = min(hits)
        self.text = self.text[: index + (len(self.stop_hit) if self.include_stop else 0)]
        return self.stop_hit

    def flush(self) -> str:
        """At the end, whatever is left, even an incomplete character (shown as U+FFFD)."""
        if self.stop_hit is None and self._read_offset < len(self.token_ids):
            prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
            full = self._decode(self.token_ids[self._prefix_offset :])
            self.text += full[len(prefix) :]
            self._read_offset = len(self.token_ids)
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
