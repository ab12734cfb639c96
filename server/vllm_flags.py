"""vLLM's command line, met where an operator brings it from a vLLM unit or compose file.

- `vlm-server serve MODEL` and `--served-model-name A B`, as `vllm serve` takes them.
- vLLM flags that ask for what this server always does are accepted (ACCEPTED), and vLLM's
  forms of values where a setting here means the same: --dtype half, --max-model-len 32k or
  auto, --generation-config vllm or a folder, --override-generation-config's JSON.
- Every other vLLM flag is refused, as any unknown flag is, and the error says what to use
  here instead (INSTEAD), or that there is nothing like it (NO_COUNTERPART): a unit fails at
  once and says how to fix it, never runs on with a flag silently dropped.
- VLLM_* variables are not read (this server's are VLM_*): one named like a setting of this
  server's is warned of, and VLLM_API_KEY as the only key refuses a start where others can
  reach the server: it would answer anyone.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import typing

# vLLM's flags with no counterpart here, and what to use here instead.
INSTEAD = {
    "--limit-mm-per-prompt": "--max-images-per-request and --max-videos-per-request",
    "--mm-processor-kwargs": "--auto-image-tokens (an image's default token budget), or "
    "mm_processor_kwargs in the request",
    "--media-io-kwargs": "media_io_kwargs in the request",
    "--uvicorn-log-level": "--log-level",
    "--disable-log-requests": "--log-level warning (each request has one info line)",
    "--seed": "the request's `seed`",
    "--chat-template": "the checkpoint's own chat template (chat_template_kwargs per request)",
    "--kv-cache-dtype": "the KV cache is kept in --dtype",
    "--max-logprobs": "top_logprobs goes up to 20",
    "--swap-space": "a preempted sequence is computed again (no swap)",
    "--guided-decoding-backend": "structured output is always xgrammar's",
    "--tokenizer": "the checkpoint's own tokenizer",
    "--download-dir": "HF_HUB_CACHE (hub downloads), or --models-dir (checkpoints by name)",
    "--enable-lora": "LoRA adapters are not served",
    "--disable-fastapi-docs": "/docs stays (--no-playground turns off the playground)",
}
# vLLM's flags that are nothing like one here: said so, never "did you mean" a flag of
# this server's that a few letters share (--max-log-len is not --max-model-len).
NO_COUNTERPART = (
    "--max-log-len",
    "--load-format",
    "--model-impl",
    "--config-format",
    "--tokenizer-mode",
    "--revision",
    "--code-revision",
    "--max-seq-len-to-capture",
    "--cuda-graph-sizes",
    "--compilation-config",
    "--speculative-config",
    "--hf-overrides",
    "--enable-expert-parallel",
    "--distributed-executor-backend",
    "--response-role",
    "--ssl-keyfile",
    "--ssl-certfile",
)
# vLLM's values of --dtype, as this server names them.
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
# vLLM's --generation-config vllm: its own defaults, which are OpenAI's.
GENERATION_CONFIG_ALIASES = {"vllm": "openai"}
# vLLM's sizes in tokens: 4k is 4,000 (25.6k too), 4K is 4,096 (whole numbers only).
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30}


def token_count(value: object) -> object:
    """`--max-model-len 32k` / `32K` as vLLM reads them; anything else is left to the
    setting's own check (a plain number, or a message saying what it must be)."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgKMG])", value.strip())
    if match is None:
        return value
    number, suffix = match.groups()
    if suffix in _BINARY:
        if "." in number:
            raise ValueError(f"{suffix} counts 1,024s: a whole number before it ({number}"
                             f"{suffix.lower()} counts 1,000s)")  # fmt: skip
        return int(number) * _BINARY[suffix]
    return int(float(number) * _DECIMAL[suffix])


def context_length(value: object) -> object:
    """--max-model-len: also vLLM's `auto` and `-1` (what fits in the KV cache, this
    server's 0) and its sizes (32k)."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "-1"):
        return 0
    return 0 if value == -1 else token_count(value)


def _not_a_number(name: str, value: object) -> str | None:
    """Why `value` cannot be the sampling default `name` (top_k's is whole), or None."""
    whole = name == "top_k"
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and (not whole or float(value).is_integer()):  # type: ignore[arg-type]
        return None
    return f"{name} must be {'a whole number' if whole else 'a number'}"


def check_generation_config(config: object, fields: typing.Iterable[str]) -> None:
    """A folder's generation_config.json: an object whose sampling fields (`fields`) are
    numbers (null: left out), or ValueError (caught at start, not after the model has
    loaded)."""
    if not isinstance(config, dict):
        raise ValueError("its generation_config.json is not a JSON object")
    for name in fields:
        value = config.get(name)
        if value is not None and (why := _not_a_number(name, value)):
            raise ValueError(f"its generation_config.json's {why} ({value!r})")


def generation_overrides(value: object, ranges: dict[str, tuple[float, float]]) -> object:
    """--override-generation-config '{"temperature": 0.7}', as vLLM takes it: the sampling
    defaults it names (JSON, or a mapping from the environment), each within `ranges`."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"must be a JSON object ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError('must be a JSON object, as {"temperature": 0.7}')
    overrides = {}
    for name, number in value.items():
        if name not in ranges:
            raise ValueError(f"{name!r} is not one of the sampling defaults: {', '.join(ranges)}")
        low, high = ranges[name]
        if why := _not_a_number(name, number):
            raise ValueError(why)
        if not low <= number <= high:
            raise ValueError(f"{name} must be from {low:g} to {high:g}")
        overrides[name] = number
    return overrides


def add_accepted(serve: argparse.ArgumentParser) -> None:
    """The positional MODEL and the vLLM flags whose meaning is what this server does."""
    serve.add_argument(
        "model_positional",
        nargs="?",
        metavar="MODEL",
        help="The model, as `vllm serve MODEL` takes it (the same as --model).",
    )
    group = serve.add_argument_group("vLLM's flags, accepted as they ask for what it does")
    for flags, kwargs in ACCEPTED:
        group.add_argument(*flags, **kwargs)


def _only_one(text: str) -> int:
    if text.strip() != "1":
        raise argparse.ArgumentTypeError(
            f"{text!r}: one server runs on one GPU (run replicas sharing --job-store)"
        )
    return 1


_SAID = "Accepted as vLLM takes it: "
ONE_GPU = {"type": _only_one, "help": f"{_SAID}only 1 (one server per GPU; replicas share "
           "--job-store)."}  # fmt: skip
ACCEPTED: list[tuple[tuple[str, ...], dict[str, typing.Any]]] = [
    (
        ("--enable-auto-tool-choice",),
        {"action": "store_true", "help": f"{_SAID}tool calls are always parsed."},
    ),
    (
        ("--tool-call-parser",),
        {
            "choices": ["hermes"],
            "help": f"{_SAID}only hermes, the format Qwen's models call tools in, always parsed.",
        },
    ),
    (
        ("--reasoning-parser",),
        {
            "choices": ["qwen3", "deepseek_r1"],
            "help": f"{_SAID}a thinking checkpoint's <think> is always parsed.",
        },
    ),
    (
        ("--enable-chunked-prefill",),
        {
            "action": "store_true",
            "help": f"{_SAID}prompts are always prefilled in chunks of --max-num-batched-tokens.",
        },
    ),
    (
        ("--enable-log-requests",),
        {"action": "store_true", "help": f"{_SAID}each request has an info line."},
    ),
    (
        ("--disable-log-stats",),
        {"action": "store_true", "help": f"{_SAID}no stats lines (the figures are on /metrics)."},
    ),
    (("--tensor-parallel-size", "-tp"), ONE_GPU),
    (("--pipeline-parallel-size", "-pp"), ONE_GPU),
    (("--data-parallel-size", "-dp"), ONE_GPU),
    (
        ("--trust-remote-code",),
        {
            "action": "store_true",
            "help": f"{_SAID}Qwen's vision-language models are built into transformers; a "
            "checkpoint's own code is never run.",
        },
    ),
]


class ExtendNames(argparse.Action):
    """--served-model-name as vLLM takes it (`A B`) and repeated; records whether one flag
    took several words, which may have swallowed the model (`--served-model-name A MODEL`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[no-untyped-def, override]
        names = list(getattr(namespace, self.dest, None) or [])
        setattr(namespace, self.dest, names + list(values))
        if len(values) > 1:
            namespace.several_names_after_one_flag = list(values)


def unrecognized_hints(tokens: list[str], known_flags: typing.Iterable[str]) -> str:
    """For an unrecognized-arguments error: what to use instead of each vLLM flag, and the
    closest flag to a mistyped one."""
    known = sorted(known_flags)
    hints = []
    for token in tokens:
        # (--limit-mm-per-prompt.video 0, vLLM's dotted form, and --flag=value)
        flag = token.split("=", 1)[0].split(".", 1)[0]
        if not flag.startswith("--"):
            continue
        if flag in INSTEAD:
            hints.append(f"{flag} is vLLM's; here: {INSTEAD[flag]}")
        elif flag in NO_COUNTERPART:
            hints.append(f"{flag} is vLLM's; nothing like it here")
        elif close := difflib.get_close_matches(flag, known, n=1, cutoff=0.75):
            hints.append(f"{flag}: did you mean {close[0]}?")
    return "; ".join(hints)


# vLLM's own variables whose names look like a setting here but mean something else
# (VLLM_PORT is its internal port; Kubernetes sets it in a pod beside a Service named vllm).
NOT_OURS = frozenset({"VLLM_PORT"})


def env_warnings(environ: typing.Mapping[str, str], known: set[str], prefix: str) -> list[str]:
    """VLLM_MAX_MODEL_LEN and the like, named as a setting here: not read."""
    warnings = []
    for key in sorted(environ):
        upper = key.upper()
        ours = prefix + upper.removeprefix("VLLM_")
        if upper.startswith("VLLM_") and ours in known and upper not in NOT_OURS:
            warnings.append(f"{key} is not read (this server's variables start {prefix}): {ours}")
    return warnings


def api_key_refusal(
    environ: typing.Mapping[str, str], has_keys: bool, loopback: bool
) -> tuple[str, str] | None:
    """VLLM_API_KEY set and no key of this server's: ("refuse" | "warn", why). A unit carried
    over from vLLM would serve anyone; on a loopback address only this machine can call it,
    as without any key (a client tool's VLLM_API_KEY in a developer's shell)."""
    if has_keys or not environ.get("VLLM_API_KEY"):
        return None
    why = (
        "VLLM_API_KEY is vLLM's variable, not read here: without VLM_API_KEY (or --api-key) "
        "this server answers anyone who reaches it; rename it to VLM_API_KEY"
    )
    return ("warn" if loopback else "refuse"), why


def dtype(text: str) -> str:
    """--dtype as vLLM also names it: `half` and `float` are float16 and float32."""
    return DTYPE_ALIASES.get(text, text)


def markdown_table() -> str:
    """The README's table of vLLM's flags: what each is here."""
    rows = ["| vLLM | here |", "| --- | --- |"]
    rows.append("| `vllm serve MODEL` | `vlm-server serve MODEL` (or `--model MODEL`) |")
    rows.append("| `--served-model-name A B` | the same (or the flag repeated) |")
    rows.append("| `--dtype half` / `float` | the same (float16 / float32; `VLM_DTYPE` too) |")
    rows.append(
        "| `--max-model-len 32k` / `32K` / `auto` / `-1` | the same (32,000 / 32,768 / what "
        "the KV cache holds, this server's default); `--max-num-batched-tokens 16k` too |"
    )
    rows.append(
        "| `--generation-config auto` / `vllm` / a folder | the same; `vllm` is `openai` "
        "(OpenAI's sampling defaults), this server's default; vLLM's is `auto` |"
    )
    rows.append(
        "| `--override-generation-config '{\"temperature\": 0.7}'` | the same for "
        "temperature, top_p, top_k, min_p and repetition_penalty; vLLM's other keys "
        "(`max_new_tokens`, ...) are refused |"
    )
    for flags, kwargs in ACCEPTED:
        names = " / ".join(f"`{flag}`" for flag in flags)
        rows.append(f"| {names} | {kwargs['help']} |")
    for flag, instead in INSTEAD.items():
        rows.append(f"| `{flag}` | refused; here: {instead} |")
    others = ", ".join(f"`{flag}`" for flag in NO_COUNTERPART)
    rows.append(f"| {others} | refused: nothing like them here |")
    rows.append(
        "| `VLLM_*` variables | not read (this server's are `VLM_*`): one named like a setting "
        "here is a warning; `VLLM_API_KEY` with no key of this server's refuses a start on an "
        "address others can reach (a warning on loopback) |"
    )
    return "\n".join(rows)
