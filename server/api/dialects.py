"""Other servers' request dialects, read as this server's (vLLM's) fields: llama.cpp's and
Ollama's options, transformers generate()'s names, DashScope's, OpenRouter's, Ollama's and
Anthropic-style reasoning switches.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import AliasChoices

from server.api.fields import ReasoningEffort
from server.exceptions import InvalidRequest

logger = logging.getLogger(__name__)

# llama.cpp's and Ollama's options, which front-ends made for them send to every OpenAI
# connection (Open WebUI's advanced parameters: a user who set one had every chat refused).
# repeat_penalty is repetition_penalty by its llama.cpp name (the same multiplicative
# penalty: REPETITION_PENALTY_NAMES); the others ask for what this server does not do, or
# sizes itself, and change nothing (logged), as vLLM takes any unknown field. Other unknown
# fields are still 400s.
REPETITION_PENALTY_NAMES = AliasChoices("repetition_penalty", "repeat_penalty")
LLAMA_CPP_IGNORED = frozenset(
    {
        "mirostat",
        "mirostat_eta",
        "mirostat_tau",
        "tfs_z",
        "typical_p",
        "repeat_last_n",
        "penalize_newline",
        "num_ctx",
        "num_predict",
        "num_keep",
        "num_batch",
        "num_gpu",
        "num_thread",
        "use_mmap",
        "use_mlock",
        "keep_alive",
        "think",
        "format",
    }
)


def llama_cpp_options(data: Any) -> Any:
    """A request body without llama.cpp's and Ollama's options that change nothing here
    (LLAMA_CPP_IGNORED: logged)."""
    if not isinstance(data, dict) or not (ignored := sorted(data.keys() & LLAMA_CPP_IGNORED)):
        return data
    logger.info("llama.cpp/Ollama options with no effect here: %s", ", ".join(ignored))
    return {key: value for key, value in data.items() if key not in LLAMA_CPP_IGNORED}


GENERATE_OPTIONS = frozenset(
    {"max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "no_repeat_ngram_size"}
)


def generate_options(data: Any) -> Any:
    """transformers generate()'s names, which evaluation harnesses forward (lm-eval sends a
    task's generation_kwargs beside its own max_tokens): max_new_tokens / min_new_tokens are
    bounds as max_tokens / min_tokens are (beside them, the tighter holds); do_sample false
    is greedy decoding (temperature 0, whatever temperature says, as generate() reads it);
    num_beams 1 is the default search (more: beam search, not done here, a 400);
    no_repeat_ngram_size is read as vllm_xargs' (which wins when both are sent)."""
    if not isinstance(data, dict) or not data.keys() & GENERATE_OPTIONS:
        return data
    data = dict(data)
    beams = data.pop("num_beams", None)
    if beams is not None and not (type(beams) is int and beams == 1):
        raise _generate_option("num_beams", "takes only 1: beam search is not done here")
    if (sample := data.pop("do_sample", None)) is not None:
        sample = _switch(sample, "do_sample")
    if sample is False:
        data["temperature"] = 0
    if (size := data.pop("no_repeat_ngram_size", None)) is not None:
        if type(size) is not int:  # (named as sent, not as the vllm_xargs key it becomes)
            raise _generate_option("no_repeat_ngram_size", "must be an integer (0 or less: off)")
        xargs = data.get("vllm_xargs")
        if xargs is None or isinstance(xargs, dict):  # (another type: its own 400)
            data["vllm_xargs"] = {"no_repeat_ngram_size": size, **(xargs or {})}
    # (chat's max_completion_tokens, where given, is the limit: it wins over max_tokens)
    chat_limit = data.get("max_completion_tokens") is not None
    for name, field, tighter, least in (
        ("max_new_tokens", "max_completion_tokens" if chat_limit else "max_tokens", min, 1),
        ("min_new_tokens", "min_tokens", max, 0),
    ):
        if (value := data.pop(name, None)) is None:
            continue
        value = _bounded_int(value, name, least)
        given = data.get(field)
        if given is None:
            data[field] = value
        elif type(given) is int:
            data[field] = tighter(given, value)
    return data


def _generate_option(name: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{name} {problem}.", param=name, code="invalid_value")


# Other servers' switches for a thinking checkpoint's reasoning, which their clients send to
# any OpenAI connection: Qwen's own API (DashScope: enable_thinking, thinking_budget; Qwen
# Code and Qwen-Agent document them), OpenRouter's reasoning object (Qwen Code sends it too),
# the thinking object of Anthropic-style OpenAI endpoints, Ollama's think (Open WebUI's
# "Think" setting). Each is read as vLLM's own field for it; that field, sent too, wins. A
# null is no switch, as for every optional field.
REASONING_SWITCHES = frozenset(
    {"enable_thinking", "thinking_budget", "reasoning", "thinking", "think"}
)
REASONING_OBJECT_KEYS = {
    "reasoning": frozenset(
        {"effort", "max_tokens", "budget_tokens", "enabled", "exclude", "summary"}
    ),
    "thinking": frozenset({"type", "budget_tokens", "display"}),
}
# Anthropic's thinking types (its Messages API, and the thinking object on chat): thinking on
# or off
THINKING_SWITCH = {"enabled": True, "adaptive": True, "disabled": False}
OLLAMA_THINK_LEVELS = ("low", "medium", "high")
MAX_TOP_LOGPROBS = 20  # (OpenAI's top_logprobs' bound)


@dataclass
class AskedReasoning:
    """What the foreign switches ask for (None: nothing)."""

    enable: bool | None = None
    budget: int | None = None
    effort: str | None = None
    include: bool | None = None


def reasoning_switches(data: Any) -> Any:
    """A chat body with those switches read as chat_template_kwargs.enable_thinking,
    thinking_token_budget, reasoning_effort and include_reasoning."""
    if not isinstance(data, dict):
        return data
    kwargs = data.get("chat_template_kwargs")
    budgeted = isinstance(kwargs, dict) and kwargs.get("thinking_budget") is not None
    if not data.keys() & REASONING_SWITCHES and not budgeted:
        return data
    data, asked = dict(data), AskedReasoning()
    for read in (_dashscope_reasoning, _ollama_think, _thinking_object, _openrouter_reasoning):
        read(data, asked)  # (each takes its own keys out of data)
    for field, value in (
        ("reasoning_effort", asked.effort),
        ("thinking_token_budget", asked.budget),
        ("include_reasoning", asked.include),
    ):
        if value is not None and data.get(field) is None:
            data[field] = value
    kwargs = data.get("chat_template_kwargs")
    if (
        asked.enable is not None
        and data.get("reasoning_effort") != "none"  # (vLLM's own "off" wins too)
        and (kwargs is None or isinstance(kwargs, dict))
        and (kwargs or {}).get("enable_thinking") is None
    ):
        data["chat_template_kwargs"] = {**(kwargs or {}), "enable_thinking": asked.enable}
    return data


def _dashscope_reasoning(data: dict[str, Any], asked: AskedReasoning) -> None:
    if (enable := data.pop("enable_thinking", None)) is not None:
        asked.enable = _switch(enable, "enable_thinking")
    if (budget := data.pop("thinking_budget", None)) is not None:
        asked.budget = _bounded_int(budget, "thinking_budget")
    kwargs = data.get("chat_template_kwargs")  # (Cherry Studio puts the budget there too)
    if isinstance(kwargs, dict) and (budget := kwargs.get("thinking_budget")) is not None:
        asked.budget = _bounded_int(budget, "chat_template_kwargs.thinking_budget")


def _ollama_think(data: dict[str, Any], asked: AskedReasoning) -> None:
    """Ollama's think: a boolean, or a level (which thinks, at that effort)."""
    think = data.pop("think", None)
    if isinstance(think, str) and think in OLLAMA_THINK_LEVELS:
        asked.effort, think = think, True
    if think is not None:
        levels = ", ".join(OLLAMA_THINK_LEVELS)
        asked.enable = _switch(think, "think", f"a boolean or one of {levels}")


def _thinking_object(data: dict[str, Any], asked: AskedReasoning) -> None:
    """{type, budget_tokens, display} as /v1/messages reads them (display changes nothing)."""
    if (thinking := _reasoning_object(data, "thinking")) is None:
        return
    if (kind := thinking.get("type")) is not None and kind != "auto":  # (auto: no switch)
        if not isinstance(kind, str) or kind not in THINKING_SWITCH:
            raise _generate_option("thinking.type", "takes enabled, adaptive, disabled or auto")
        asked.enable = THINKING_SWITCH[kind]
    if (budget := thinking.get("budget_tokens")) is not None:
        asked.budget = _bounded_int(budget, "thinking.budget_tokens", least=1)


def _openrouter_reasoning(data: dict[str, Any], asked: AskedReasoning) -> None:
    """{effort, max_tokens (or budget_tokens), enabled, exclude, summary} (summary changes
    nothing)."""
    if (reasoning := _reasoning_object(data, "reasoning")) is None:
        return
    if (effort := reasoning.get("effort")) is not None:
        if not isinstance(effort, str) or effort not in get_args(ReasoningEffort):
            levels = ", ".join(get_args(ReasoningEffort))
            raise _generate_option("reasoning.effort", f"takes one of {levels}")
        asked.effort = effort
    for name in ("max_tokens", "budget_tokens"):
        if (budget := reasoning.get(name)) is not None:
            asked.budget = _bounded_int(budget, f"reasoning.{name}")
    if (enabled := reasoning.get("enabled")) is not None:
        asked.enable = _switch(enabled, "reasoning.enabled")
    if (exclude := reasoning.get("exclude")) is not None:
        asked.include = not _switch(exclude, "reasoning.exclude")


def dashscope_options(data: Any) -> Any:
    """DashScope's incremental_output: streamed chunks here are always increments (true
    changes nothing; false, each chunk the whole text so far, is not done: a 400)."""
    if not isinstance(data, dict) or "incremental_output" not in data:
        return data
    data = dict(data)
    if (value := data.pop("incremental_output")) is not None and value is not True:
        raise _generate_option(
            "incremental_output", "takes only true (each streamed chunk is what is new)"
        )
    return data


# Hosted APIs' own chat fields, which their clients and the apps written for them send, read
# as this server's: OpenRouter's routing hints (which models and providers serve a request,
# its prompt transforms, its usage accounting) change nothing here, one model and the usage
# always in the answer (logged); Mistral's random_seed is seed, its tool_choice "any" is
# "required", safe_prompt false its default; Groq's reasoning_format "parsed" is how reasoning
# comes here, "hidden" include_reasoning false, its reasoning_effort "default" no level;
# Fireworks' prompt_truncate_len is truncate_prompt_tokens, its (and Together's)
# context_length_exceeded_behavior "error" what a prompt too long gets here. What they would
# do that this server does not (Mistral's guardrail prompt, reasoning left inside the content,
# max_tokens lowered to fit) is a 400 naming the field.
OPENROUTER_HINTS = frozenset({"models", "provider", "route", "transforms", "usage"})
HOSTED_RENAMED = {"random_seed": "seed", "prompt_truncate_len": "truncate_prompt_tokens"}
HOSTED_NEUTRAL = {"safe_prompt": False, "context_length_exceeded_behavior": "error"}
# Web search switches (DashScope's enable_search, Dify's web_search): off is what is done here
HOSTED_NEUTRAL |= {"enable_search": False, "web_search": False}
# reasoning_format's values that mean reasoning in its own field: Groq's parsed, llama.cpp's
# auto, deepseek and deepseek-legacy (Dify's setting); hidden is include_reasoning false
PARSED_REASONING = ("parsed", "auto", "deepseek", "deepseek-legacy")


def hosted_options(data: Any) -> Any:
    """A chat body with those fields read (HOSTED_RENAMED, HOSTED_NEUTRAL, OPENROUTER_HINTS)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    if ignored := sorted(data.keys() & OPENROUTER_HINTS):
        logger.info("OpenRouter's routing hints with no effect here: %s", ", ".join(ignored))
        data = {key: value for key, value in data.items() if key not in OPENROUTER_HINTS}
    for name, field in HOSTED_RENAMED.items():
        if (value := data.pop(name, None)) is not None and data.get(field) is None:
            data[field] = value
    for name, neutral in HOSTED_NEUTRAL.items():
        if (value := data.pop(name, None)) is not None and value != neutral:
            raise _generate_option(name, f"takes only {json.dumps(neutral)} here")
    if data.get("tool_choice") == "any":
        data["tool_choice"] = "required"
    if data.get("reasoning_effort") in ("default", "auto"):  # (Groq's, Dify's: no level)
        del data["reasoning_effort"]
    if (shown := data.pop("reasoning_format", None)) is not None:
        if shown not in (*PARSED_REASONING, "hidden"):
            raise _generate_option(
                "reasoning_format",
                f"takes {', '.join(PARSED_REASONING)} or hidden (reasoning comes in its own "
                "field, never inside the content)",
            )
        if shown == "hidden" and data.get("include_reasoning") is None:
            data["include_reasoning"] = False
    return data


def integer_logprobs(data: Any) -> Any:
    """Together's and Fireworks' chat logprobs, an integer k: the k likeliest tokens at each
    step, OpenAI's logprobs true with top_logprobs k (which wins where also sent); 0 is none."""
    if not isinstance(data, dict) or type(k := data.get("logprobs")) is not int:
        return data
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise _generate_option("logprobs", f"takes true, false or 0 to {MAX_TOP_LOGPROBS}")
    data = {**data, "logprobs": k > 0}
    if k and data.get("top_logprobs") is None:
        data["top_logprobs"] = k
    return data


def _reasoning_object(data: dict[str, Any], name: str) -> dict[str, Any] | None:
    if (value := data.pop(name, None)) is None:
        return None
    if not isinstance(value, dict):
        raise _generate_option(name, "must be an object")
    if unknown := sorted(str(key) for key in value.keys() - REASONING_OBJECT_KEYS[name]):
        keys = ", ".join(sorted(REASONING_OBJECT_KEYS[name]))
        raise InvalidRequest(
            f"Unrecognized key {name}.{unknown[0]}: {name} takes {keys}.",
            param=f"{name}.{unknown[0]}",
            code="unknown_parameter",
        )
    return value


def _switch(value: Any, name: str, kinds: str = "a boolean") -> bool:
    if not isinstance(value, bool):
        raise _generate_option(name, f"must be {kinds}")
    return value


def _bounded_int(value: Any, name: str, least: int = 0) -> int:
    if type(value) is not int or not least <= value < 2**31:
        raise _generate_option(name, f"must be an integer from {least} to 2**31 - 1")
    return value
