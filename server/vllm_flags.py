"""vLLM's command line, met where an operator brings it from a vLLM unit or compose file.

- `vlm-server serve MODEL` and `--served-model-name A B`, as `vllm serve` takes them.
- vLLM flags that ask for what this server always does are accepted (ACCEPTED_HELP).
- Every other vLLM flag is refused, as any unknown flag is, and the error says what to use
  here instead (INSTEAD): a unit fails at once and says how to fix it, never runs on with a
  flag silently dropped.
- vLLM's VLLM_* variables are not read (this server's are VLM_*): one that has a VLM_
  counterpart is warned of, and VLLM_API_KEY as the only key refuses the start: the server
  would be open to anyone who reaches it.
"""

from __future__ import annotations

import argparse
import difflib
import typing

# vLLM's flags with no counterpart here, and what is done or used here instead.
INSTEAD = {
    "--limit-mm-per-prompt": "--max-images-per-request and --max-videos-per-request",
    "--mm-processor-kwargs": "--auto-image-tokens (an image's default token budget), or "
    "mm_processor_kwargs in the request",
    "--uvicorn-log-level": "--log-level",
    "--disable-log-requests": "--log-level warning (each request has one info line)",
    "--enable-log-requests": "each request has one line at --log-level info (the default)",
    "--disable-log-stats": "no stats lines are logged (the figures are on /metrics)",
    "--seed": "the request's `seed`",
    "--chat-template": "the checkpoint's own chat template (chat_template_kwargs per request)",
    "--kv-cache-dtype": "the KV cache is kept in --dtype",
    "--max-logprobs": "top_logprobs goes up to 20",
    "--swap-space": "a preempted sequence is computed again (no swap)",
    "--enable-chunked-prefill": "prompts are always prefilled in chunks of "
    "--max-num-batched-tokens",
    "--pipeline-parallel-size": "one server per GPU: replicas sharing --job-store",
    "--data-parallel-size": "one server per GPU: replicas sharing --job-store",
    "--reasoning-parser": "a thinking checkpoint's reasoning is always parsed",
    "--guided-decoding-backend": "structured output is always xgrammar's",
    "--tokenizer": "the checkpoint's own tokenizer",
    "--download-dir": "HF_HUB_CACHE (hub downloads), or --models-dir (checkpoints by name)",
    "--enable-lora": "LoRA adapters are not served",
    "--disable-fastapi-docs": "/docs stays (--no-playground turns off the playground)",
}
# vLLM's values of --dtype, as this server names them.
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
ACCEPTED_HELP = {
    "--enable-auto-tool-choice": "Accepted as vLLM takes it: tool calls are always parsed.",
    "--tool-call-parser": "Accepted as vLLM takes it: only hermes, the format Qwen's models "
    "call tools in, which is always parsed.",
    "--tensor-parallel-size": "Accepted as vLLM takes it: only 1 (one server per GPU; run "
    "replicas sharing --job-store for more).",
    "--trust-remote-code": "Accepted as vLLM takes it: Qwen's vision-language models are "
    "built into transformers, and a checkpoint's own code is never run.",
}


def add_accepted(serve: argparse.ArgumentParser) -> None:
    """The positional MODEL and the vLLM flags whose meaning is what this server does."""
    serve.add_argument(
        "model_positional",
        nargs="?",
        metavar="MODEL",
        help="The model, as `vllm serve MODEL` takes it (the same as --model).",
    )
    group = serve.add_argument_group("vLLM's flags, accepted as they ask for what it does")
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help=ACCEPTED_HELP["--enable-auto-tool-choice"],
    )
    group.add_argument(
        "--tool-call-parser", choices=["hermes"], help=ACCEPTED_HELP["--tool-call-parser"]
    )
    group.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=_one_gpu,
        help=ACCEPTED_HELP["--tensor-parallel-size"],
    )
    group.add_argument(
        "--trust-remote-code", action="store_true", help=ACCEPTED_HELP["--trust-remote-code"]
    )


def _one_gpu(text: str) -> int:
    if text.strip() != "1":
        raise argparse.ArgumentTypeError(
            f"{text!r}: one server runs on one GPU (run replicas sharing --job-store)"
        )
    return 1


def dtype(text: str) -> str:
    """--dtype's argparse type: vLLM's `half` and `float` taken as float16 and float32."""
    return DTYPE_ALIASES.get(text, text)


def unrecognized_hints(tokens: list[str], known_flags: typing.Iterable[str]) -> str:
    """For an unrecognized-arguments error: what to use instead of each vLLM flag, and the
    closest flag to a mistyped one."""
    known = sorted(known_flags)
    hints = []
    for token in tokens:
        flag = token.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        if flag in INSTEAD:
            hints.append(f"{flag} is vLLM's; here: {INSTEAD[flag]}")
        elif close := difflib.get_close_matches(flag, known, n=1, cutoff=0.75):
            hints.append(f"{flag}: did you mean {close[0]}?")
    return "; ".join(hints)


def env_warnings(environ: typing.Mapping[str, str], known: set[str], prefix: str) -> list[str]:
    """vLLM's variables for settings this server has (VLLM_MAX_MODEL_LEN): not read."""
    warnings = []
    for key in sorted(environ):
        upper = key.upper()
        ours = prefix + upper.removeprefix("VLLM_")
        if upper.startswith("VLLM_") and ours in known and upper != ours:
            warnings.append(f"{key} is vLLM's variable and is ignored: this server reads {ours}")
    return warnings


def api_key_refusal(environ: typing.Mapping[str, str], has_keys: bool) -> str | None:
    """VLLM_API_KEY set and no key of this server's: the start is refused (a unit carried
    over from vLLM would serve everyone)."""
    if has_keys or not environ.get("VLLM_API_KEY"):
        return None
    return (
        "VLLM_API_KEY is vLLM's variable, not read here: without VLM_API_KEY (or --api-key) "
        "this server would answer anyone; rename it to VLM_API_KEY"
    )


def markdown_table() -> str:
    """The README's table of vLLM's flags: what each is here."""
    rows = ["| vLLM | here |", "| --- | --- |"]
    rows.append("| `vllm serve MODEL` | `vlm-server serve MODEL` (or `--model MODEL`) |")
    rows.append("| `--served-model-name A B` | the same (or the flag repeated) |")
    rows.append("| `--dtype half` / `float` | the same (float16 / float32) |")
    for flag, help_text in ACCEPTED_HELP.items():
        rows.append(f"| `{flag}` | {help_text} |")
    for flag, instead in INSTEAD.items():
        rows.append(f"| `{flag}` | refused; here: {instead} |")
    rows.append(
        "| `VLLM_*` variables | not read (this server's are `VLM_*`): one with a `VLM_` "
        "counterpart is a warning; `VLLM_API_KEY` with no key of this server's refuses the "
        "start |"
    )
    return "\n".join(rows)
