"""No repeated n-grams (transformers' `no_repeat_ngram_size`, which MinerU's client sends in
vLLM's `vllm_xargs` to stop a page's text looping): the answer never holds the same n tokens
twice. While the answer ends with n-1 tokens it has held before, the tokens that followed them
then are banned for the next step. Only the answer's own tokens count, not the prompt's (as
MinerU's vLLM logits processor reads them).

Indexed as the answer grows, so a step costs O(n) whatever the answer's length: each n-1
tokens seen (keyed by their hash: a 100-gram's tuple per token was ~850 bytes; two of them
sharing a 64-bit hash would ban a token wrongly, a chance too small to pay for keeping the
tuples) -> the token that came after them, or the tokens, where more than one did (most
prefixes of a long n are seen once: a set each was ~200 bytes a token). Host work on lists
the host already has: no device transfer.
"""

from __future__ import annotations


class RepeatedNgrams:
    """One answer's n-grams so far (n >= 1; n = 1 bans every token already in the answer)."""

    def __init__(self, size: int):
        self.size = size
        self.followers: dict[int, int | set[int]] = {}
        self.indexed = 0  # the answer's tokens whose n-gram (ending there) is indexed

    @classmethod
    def of(cls, size: int) -> RepeatedNgrams | None:
        return cls(size) if size > 0 else None

    def banned_next(self, output: list[int]) -> tuple[int, ...]:
        """The tokens that would repeat an n-gram after `output` (the answer so far)."""
        prefix = self.size - 1
        for end in range(max(self.indexed, prefix), len(output)):
            self._add(hash(tuple(output[end - prefix : end])), output[end])
        self.indexed = len(output)
        if len(output) < prefix:
            return ()
        followers = self.followers.get(hash(tuple(output[len(output) - prefix :])))
        if followers is None:
            return ()
        return (followers,) if isinstance(followers, int) else tuple(followers)

    def _add(self, key: int, token: int) -> None:
        seen = self.followers.get(key)
        if seen is None:
            self.followers[key] = token
        elif isinstance(seen, int):
            if seen != token:
                self.followers[key] = {seen, token}
        else:
            seen.add(token)
