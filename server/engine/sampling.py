"""Per-request sampling parameters, validated at the API edge and carried by each Sequence."""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, replace

from server.engine.structured import StructuredOutput

logger = logging.getLogger(__name__)

# Below this temperature sampling is indistinguishable from argmax; treat it as greedy.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One sampled token's logprob and the step's most likely tokens, most likely first.

    The top entries are kept as two flat arrays, not (id, logprob) tuples: a sequence keeps
    one of these per token until its answer is done, and with top_logprobs 20 the tuples took
    ~2.6 KB a token (8 choices of 7,000 tokens: ~150 MB), the arrays ~0.5 KB."""

    logprob: float
    top_ids: array[int]
    top_logprobs: array[float]
    rank: int | None = None  # the token's place in the vocabulary, 1 = most likely (prompts')

    @classmethod
    def of(
        cls, logprob: float, top: Iterable[tuple[int, float]], rank: int | None = None
    ) -> TokenLogprobs:
        """top: (token id, logprob) pairs, most likely first."""
        pairs = list(top)
        ids = array("l", [token_id for token_id, _ in pairs])
        return cls(logprob, ids, array("d", [value for _, value in pairs]), rank)

    @property
    def top(self) -> tuple[tuple[int, float], ...]:
        """(token id, logprob), most likely first."""
        return tuple(zip(self.top_ids, self.top_logprobs, strict=True))


# top_p 0 is read as this: the nucleus keeps only its first token (the likeliest).
MIN_TOP_P = 1e-9

# The sampling fields a generation_config may set, with the ranges a request may ask for
# (top_k: -1 and 0 are off, as vLLM reads them; top_p and repetition_penalty above 0).
GENERATION_CONFIG_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (MIN_TOP_P, 1.0),
    "top_k": (-1, 2**31 - 1),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (1e-9, 10.0),
}


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request's omitted sampling fields take: OpenAI's by default (temperature 1, no
    top-p/top-k/min-p, no repetition penalty), an endpoint's own (Animus: temperature 0.1), or
    the checkpoint's generation_config (`--generation-config auto`, as vLLM does)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, config: object, base: SamplingDefaults) -> SamplingDefaults:
        """`base` with the sampling fields the checkpoint's generation_config sets (the ones
        vLLM reads: temperature, top_p, top_k, min_p, repetition_penalty)."""
        # Only what the file sets (older transformers fill unset fields with their defaults).
        given = config.to_diff_dict() if hasattr(config, "to_diff_dict") else vars(config)
        values = {}
        for name, (low, high) in GENERATION_CONFIG_RANGES.items():
            value = given.get(name)
            if value is None:
                continue
            if not low <= value <= high:  # what a request could not ask for either
                logger.warning("generation_config %s=%r is out of range: not used", name, value)
                continue
            values[name] = value
        return base.overridden(values)

    def overridden(self, values: dict[str, float]) -> SamplingDefaults:
        """These defaults with some set (names and ranges of GENERATION_CONFIG_RANGES; a top_k
        of -1 is off, as 0)."""
        typed = {k: max(int(v), 0) if k == "top_k" else float(v) for k, v in values.items()}
        return replace(self, **typed)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: the server's default, bounded by the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float = 0.0  # vLLM's: drop tokens less likely than min_p x the likeliest (0: off)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS and stop tokens are suppressed until this many tokens exist
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    # OpenAI's logit_bias: (token id, bias) added to the logits, greedy rows too
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()  # vLLM's: only these may be chosen (empty: any)
    include_stop_str_in_output: bool = False  # vLLM's: the matched stop string stays in the text
    skip_special_tokens: bool = True  # vLLM's: False keeps special tokens in the text
    structured: StructuredOutput | None = None  # JSON constrained while decoding
    # None: no logprobs; k: the chosen token's logprob and the k most likely tokens' (0-20),
    # from the model's raw distribution (log_softmax of the logits before any processing)
    logprobs: int | None = None
    # vLLM's prompt_logprobs (echo with logprobs): each prompt token's raw logprob given the
    # tokens before it, and the k most likely there; such a prompt takes no prefix-cache hits
    prompt_logprobs: int | None = None
    # vLLM's bad_words: strings the answer must not contain; the engine (it has the tokenizer)
    # fills bad_word_ids with their token sequences (see bad_words.py)
    bad_words: tuple[str, ...] = ()
    bad_word_ids: tuple[tuple[int, ...], ...] = ()
    # transformers' no_repeat_ngram_size (MinerU sends it in vllm_xargs): no n tokens twice
    # in the answer (see repeated_ngrams.py); 0: off
    no_repeat_ngram_size: int = 0
    # vLLM's cache_salt: prefix-cache and vision-cache hits only between requests that send the
    # same salt (tenants that must not learn, by timing, what another one asked)
    cache_salt: str | None = None
    # vLLM's priority (not a sampling parameter, but it rides with the request to the
    # scheduler): under --scheduling-policy priority, lower values are served first
    priority: int = 0
    # vLLM's thinking_token_budget: a thinking checkpoint's reasoning is ended (its
    # think_end_token_id forced) once it has this many tokens. The chat pipeline sets
    # think_end_token_id where the answer starts in reasoning; without it no budget applies.
    thinking_token_budget: int | None = None
    think_end_token_id: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )
