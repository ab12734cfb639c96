"""The field types and base models every request body shares: strictness, text, stop
strings, token ids, bad words, logit bias, reasoning levels, metadata, priority.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from server.exceptions import InvalidRequest

logger = logging.getLogger(__name__)
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256  # a stop string's tail is held back while streaming: keep it short


class StrictModel(BaseModel):
    # No unknown fields, and no coercion: "stream": "yes" or "ignore_eos": 0 are type errors.
    model_config = ConfigDict(extra="forbid", strict=True)


class PartModel(BaseModel):
    """Inside messages and content parts unknown keys are ignored (logged at debug), as vLLM
    and SGLang do: clients put their own there (SGLang's "modalities", vLLM's "uuid"). Still
    no coercion."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = {f.alias or name for name, f in cls.model_fields.items()}
            if unknown := sorted(str(k) for k in data if k not in known):
                logger.debug("ignored unknown keys in a %s: %s", cls.__name__, ", ".join(unknown))
        return data


def _no_lone_surrogates(value: str) -> str:
    # JSON may carry "\ud83d" alone; it is not text and the tokenizer cannot encode it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text contains an invalid unicode escape (a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]
StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH), AfterValidator(_no_lone_surrogates)]


def _stop_count(value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
    return value


Stop = Annotated[StopString | list[StopString] | None, AfterValidator(_stop_count)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


def _id_digits(value: Any) -> Any:
    """A token id written as digits ("151645") as the number: evalscope's --stop-token-ids
    sends its ids so, and vLLM (lax pydantic) reads them."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        return int(value)
    return value


# stop_token_ids: a token id, or its digits.
StopTokenId = Annotated[int, BeforeValidator(_id_digits), Field(ge=0, lt=2**31)]
# vLLM's bad_words: bounded as stop strings are (each step compares the answer's tail with
# the words its last token could be completing, on the engine's thread).
MAX_BAD_WORDS = 64
MAX_BAD_WORDS_CHARS = 4096


def _bad_words_size(words: list[str] | None) -> list[str] | None:
    if words is not None and sum(len(w) for w in words) > MAX_BAD_WORDS_CHARS:
        raise ValueError(f"bad_words may hold at most {MAX_BAD_WORDS_CHARS} characters in all")
    return words


BadWords = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]],
    Field(max_length=MAX_BAD_WORDS),
    AfterValidator(_bad_words_size),
]
MAX_CACHE_SALT = 1024
# OpenAI's logit_bias: token ids (as JSON object keys, so strings) -> -100..100
LogitBias = dict[str, Annotated[float, Field(ge=-100, le=100)]]
# OpenAI's reasoning levels. No Qwen-VL checkpoint has levels: "none" turns a -Thinking
# checkpoint's reasoning off (chat_template_kwargs.enable_thinking false, unless the request
# sets that itself); the others leave it as the checkpoint does it.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


def thinking_kwargs(effort: str | None, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The chat template's variables a reasoning effort implies, beside the request's own."""
    kwargs = dict(kwargs or {})
    if effort == "none":
        kwargs.setdefault("enable_thinking", False)
    return kwargs


MAX_METADATA_PAIRS = 16
METADATA_BOUNDS = (
    "metadata holds at most 16 pairs, keys of at most 64 characters and values of at most 512."
)


def check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's bounds: 16 pairs, keys of at most 64 characters, values of 512."""
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS or any(
        len(key) > 64 or len(value) > 512 for key, value in metadata.items()
    ):
        raise InvalidRequest(METADATA_BOUNDS, param="metadata", code="invalid_value")


def _few_pairs(value: Any) -> Any:
    """Counted before the pairs are validated (two million of them took 1.9 s of the event
    loop, to be refused or ignored after)."""
    if isinstance(value, dict) and len(value) > MAX_METADATA_PAIRS:
        raise ValueError(METADATA_BOUNDS.removesuffix("."))
    return value


MetadataPairs = Annotated[dict[str, str] | None, BeforeValidator(_few_pairs)]
MetadataDict = Annotated[dict[str, str], BeforeValidator(_few_pairs)]  # (where it is required)


# vLLM's request priority: under --scheduling-policy priority, lower values are served first
Priority = Annotated[int, Field(ge=-(2**31), lt=2**31)]
