"""RequestLimits: what the engine can tell of a request before it is queued: whether its text
can fit the context at all (before tokenizing it), the answer's room (max_tokens), a prompt
truncated as vLLM's truncate_prompt_tokens cuts it, and sampling parameters only the model and
the scheduling policy can check (token ids, bad words, priority)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from server.engine import bad_words
from server.engine.inputs import ModelInputs, Truncation
from server.engine.sampling import SamplingParams
from server.exceptions import AnswerTooLong, InvalidRequest, PromptTooLong

# A character becomes at most 3 under NFC (U+1D160) and a character at most 4 UTF-8 bytes.
MAX_BYTES_PER_NORMALIZED_CHAR = 12
# UTF-8 bytes NFC leaves at least of those it is given: 2 of 7 (U+1FBE U+0308 U+0301, 7 bytes,
# compose to U+0390, 2: the least ratio over every composition; Hangul's jamo keep a third).
NFC_LEAST_BYTES = (2, 7)


def _at_least_normalized_bytes(text: str, normalizer: Any) -> int:
    """A lower bound on _normalized_bytes, cheap (no normalizing: NFC over a 30 MB prompt held
    the event loop 1.2 s, tokenizers keeping the GIL): exact for no normalizer or ASCII text
    under NFC (which leaves it as it is), 2/7 of its bytes for other text under NFC, 0
    for a normalizer not known here."""
    if normalizer is not None and type(normalizer).__name__ != "NFC":
        return 0
    size = len(text.encode("utf-8", "surrogatepass"))
    if normalizer is None or text.isascii():
        return size
    kept, given = NFC_LEAST_BYTES
    return size * kept // given


def _normalized_bytes(text: str, normalizer: Any) -> int:
    normalized = text if normalizer is None else normalizer.normalize_str(text)
    return len(normalized.encode("utf-8", "surrogatepass"))


# Room left for the answer when a request gives no max_tokens and the server no default: the
# frames a video gets and truncate_prompt_tokens -1 plan with it (the answer may go on).
PLANNED_ANSWER_TOKENS = 1024
# The least a chat turn takes besides its text: Qwen's templates open and close each message
# with a special token (<|im_start|>role ... <|im_end|>).
TOKENS_PER_TURN = 2
# A prompt that is only counted (/tokenize, input_tokens, count_tokens) or that
# truncate_prompt_tokens cuts may be longer than the context, but it is tokenized whole all
# the same: its text is bounded at this many contexts (a 100 MB prompt to /tokenize took five
# minutes and 16 GB of memory).
CONTEXTS_TOKENIZED = 8


class RequestLimits:
    def __init__(
        self,
        tokenizer: Any,
        max_seq_len: int,
        default_max_tokens: int,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        policy: str,
    ):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.default_max_tokens = default_max_tokens  # 0: the rest of the context
        # The answer's room a request without max_tokens is planned with (its videos' frames,
        # a prompt truncated to fit): the default, or with none a usual answer's length.
        self.planned_answer_tokens = default_max_tokens or min(
            PLANNED_ANSWER_TOKENS, max_seq_len // 4
        )
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.policy = policy  # the scheduling policy (priority needs "priority")

    @functools.cached_property
    def _longest_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for: a byte-level BPE entry's spelling has a
        character a byte; an added token (<|im_start|>) is its own text."""
        vocab, added = self.tokenizer.get_vocab(), self.tokenizer.get_added_vocab()  # type: ignore[attr-defined]
        return max((len(k.encode()) if k in added else len(k) for k in vocab), default=1)

    def check_prompt_text(
        self, text: str, param: str, turns: int = 0, *, whole: bool = True
    ) -> None:
        """Text that cannot fit the context is refused before it is tokenized (a 20 MB prompt
        took minutes and gigabytes to tokenize, then was refused): the tokens of text, once
        the tokenizer has normalized it (NFC for Qwen), are at least its UTF-8 bytes over the
        most one token stands for; each of a chat's turns (messages) adds its own start and
        end tokens (<|im_start|>, <|im_end|>) to those. whole false: a prompt only counted,
        or one to cut, which may be CONTEXTS_TOKENIZED contexts long."""
        room = self.max_seq_len * (1 if whole else CONTEXTS_TOKENIZED)
        markers = max(turns * TOKENS_PER_TURN - 1, 0)  # (a continued last turn has no end)
        if markers > room:  # (300,000 empty messages: no text, but no room)
            raise InvalidRequest(
                f"The prompt has {turns} messages: more than {self._contexts(whole)} can hold "
                f"({TOKENS_PER_TURN} tokens each at least).",
                param=param,
                code="context_length_exceeded",
            )
        limit = (room - markers) * self._longest_token_bytes
        if len(text) * MAX_BYTES_PER_NORMALIZED_CHAR <= limit:  # (every prompt of a usual size)
            return
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # (a slow tokenizer: its normalization is unknown, no bound)
            return
        if _at_least_normalized_bytes(text, backend.normalizer) > limit or (
            _normalized_bytes(text, backend.normalizer) > limit
        ):
            raise InvalidRequest(
                f"The prompt's text (the tools' definitions too) is {len(text)} characters long: "
                f"more than {self._contexts(whole)} can hold, whatever the tokens.",
                param=param,
                code="context_length_exceeded",
            )

    def _contexts(self, whole: bool) -> str:
        context = f"this model's {self.max_seq_len}-token context"
        if whole:
            return context
        # (a prompt only counted, or cut, is tokenized whole)
        return f"{CONTEXTS_TOKENIZED} times {context} (the most a prompt to count or cut may be)"

    def truncated(
        self, inputs: ModelInputs, truncation: Truncation | None, sampling: SamplingParams
    ) -> ModelInputs:
        """The prompt as vLLM's truncate_prompt_tokens cuts it."""
        if truncation is None:
            return inputs
        return truncation.apply(inputs, self.kept_prompt_tokens(truncation, sampling))

    def kept_prompt_tokens(self, truncation: Truncation, sampling: SamplingParams) -> int:
        """How many prompt tokens the truncation keeps (room left for max_tokens, or for the
        default a request without one gets)."""
        max_tokens = sampling.max_tokens or self.planned_answer_tokens
        return truncation.kept(self.max_seq_len, max_tokens)

    def with_bad_word_ids(self, sampling: SamplingParams) -> SamplingParams:
        """`sampling` with its bad words' token sequences (a 400 for a word with no tokens)."""
        if not sampling.bad_words or sampling.bad_word_ids:
            return sampling
        try:
            ids = bad_words.token_sequences(sampling.bad_words, self.tokenizer)
        except ValueError as exc:
            raise InvalidRequest(
                f"bad_words must hold words, not only whitespace ({exc}).",
                param="bad_words",
                code="invalid_value",
            ) from exc
        return replace(sampling, bad_word_ids=ids)

    def check_sampling(self, sampling: SamplingParams) -> None:
        """What only the engine can tell about a request's sampling parameters: a priority
        its policy looks at, token ids within the vocabulary, allowed ids that leave a token
        to generate, bad words that can be written down in tokens."""
        sampling = self.with_bad_word_ids(sampling)
        if sampling.priority and (policy := self.policy) != "priority":
            serves = "first come, first served" if policy == "fcfs" else "API keys in turn"
            raise InvalidRequest(
                "priority needs the server started with --scheduling-policy priority (this "
                f"one serves {serves}).",
                param="priority",
                code="invalid_value",
            )
        vocab = self.vocab_size
        ids = {
            "stop_token_ids": sampling.stop_token_ids,
            "logit_bias": [token for token, _ in sampling.logit_bias],
            "allowed_token_ids": sampling.allowed_token_ids,
        }
        for param, tokens in ids.items():
            if any(t >= vocab for t in tokens):
                raise InvalidRequest(
                    f"{param} must hold token ids below the vocabulary size ({vocab}).",
                    param=param,
                    code="invalid_value",
                )
        for param, given in (
            ("allowed_token_ids", sampling.allowed_token_ids),
            ("bad_words", sampling.bad_words),
            ("vllm_xargs.no_repeat_ngram_size", sampling.no_repeat_ngram_size),
        ):
            # The grammar decides which tokens may come; with a list of allowed tokens, or
            # banned ones, that can leave none (a failed request deep into its answer).
            if given and sampling.structured is not None:
                raise InvalidRequest(
                    f"{param} cannot be combined with a structured-output constraint "
                    "(response_format, guided_* / structured_outputs, a forced tool call).",
                    param=param,
                    code="invalid_value",
                )
        allowed = set(sampling.allowed_token_ids)
        banned = set(bad_words.BadWords(sampling.bad_word_ids).always)
        if sampling.min_tokens:  # before min_tokens the enders are banned
            banned |= self.eos_token_ids | set(sampling.stop_token_ids)
        if allowed and allowed <= banned:
            raise InvalidRequest(
                "allowed_token_ids leaves no token to generate: each one is a one-token bad "
                "word, or ends the text (EOS or stop_token_ids), which min_tokens forbids.",
                param="allowed_token_ids",
                code="invalid_value",
            )

    def max_tokens_for(self, num_prompt: int, sampling: SamplingParams) -> int:
        """The completion budget of a prompt this long; a 400 when prompt and max_tokens cannot
        fit the context."""
        room = self.max_seq_len - num_prompt
        if room <= 0:
            raise PromptTooLong(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, "
                f"your messages resulted in {num_prompt} tokens. Please reduce the length of the "
                "messages (the tools' definitions count too) or the size of the images.",
                num_prompt,
                self.max_seq_len,
                built=True,
            )
        if sampling.max_tokens is None:
            # (the server's default gives way to a min_tokens above it: asked for)
            default = max(self.default_max_tokens, sampling.min_tokens)
            if sampling.min_tokens > room:
                raise InvalidRequest(
                    f"min_tokens ({sampling.min_tokens}) is more than the {room} tokens this "
                    f"model's {self.max_seq_len}-token context leaves after the prompt's "
                    f"{num_prompt}.",
                    param="min_tokens",
                    code="context_length_exceeded",
                )
            return min(default, room) if self.default_max_tokens else room
        if sampling.max_tokens > room:
            raise AnswerTooLong(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, "
                f"you requested {num_prompt + sampling.max_tokens} tokens ({num_prompt} in the "
                f"messages, {sampling.max_tokens} in the completion). Please reduce the length "
                "of the messages or completion.",
                num_prompt,
                sampling.max_tokens,
                self.max_seq_len,
            )
        return sampling.max_tokens
