"""vlm-server serve | make-tiny-model.

`serve` flags are generated from Settings, so each one also works as a VLM_* env var; a flag
given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path
from typing import Any, get_args, get_origin

from server.config import Settings
from server.engine.tiny import FAMILIES, TinySpec
from server.exceptions import ModelLoadError

logger = logging.getLogger("server.cli")

FLAG_HELP = {
    "model": "checkpoint directory, hub id (looked up in models/, then the HF cache) or 'tiny'",
    "served_model_name": "name clients send as `model` (repeatable); default: --model",
    "api_keys": "Bearer key clients must send (repeatable); env VLM_API_KEYS=a,b",
    "quantization": "load weights with bitsandbytes (CUDA only)",
    "quantize_vision": "also quantise the vision tower (kept in full precision by default)",
    "device": "auto | cpu | cuda | cuda:N",
    "dtype": "auto: bfloat16 on CUDA, float32 on CPU",
    "attn_implementation": "vision tower attention; auto: flash_attention_2 when installed on "
    "CUDA, else sdpa (the text model always uses sdpa)",
    "default_max_tokens": "max_tokens for requests that give none (bounded by the context)",
    "max_num_seqs": "sequences running at once (continuous batching) (default: 64)",
    "max_num_batched_tokens": "tokens computed in one engine step: every running decode, then "
    "prompt chunks; a longer prompt is prefilled in chunks of this size (default: 8192)",
    "kv_cache_memory": "KV cache size in GiB; 0 (default): measured, see "
    "--gpu-memory-utilization (4 GiB on a CPU)",
    "gpu_memory_utilization": "share of the GPU's memory this server may use: the KV cache gets "
    "what is left after the weights and the measured peak of a worst-case step (default: 0.9)",
    "block_size": "tokens per KV cache block; prefix-cache hits are whole blocks (default: 16)",
    "enable_prefix_caching": "reuse the KV blocks of identical prompt prefixes, images and "
    "videos included (default: on)",
    "attention_backend": "decode attention over the paged KV cache: reference (gather + sdpa, "
    "exact everywhere) or triton (reads the block table in place; CUDA with bf16/fp16, "
    "--block-size >= 16; off until verified on your GPU by scripts/gpu_check.sh)",
    "enforce_eager": "run every step eagerly; --no-enforce-eager replays decode steps as CUDA "
    "graphs, one per batch size 1, 2, 4, 8, 16, 32, ... (CUDA only; bitsandbytes stays eager) "
    "(default: on, i.e. no graphs, until verified on your GPU by scripts/gpu_check.sh)",
    "encoder_cache_memory": "GiB of vision-tower outputs kept for images and videos asked about "
    "again; 0 turns it off (default: 1)",
    "allowed_media_domains": "only these hosts for media URLs and webhook URLs (repeatable); "
    "listed hosts may be private, e.g. an internal media store or webhook receiver; default: any "
    "host with public addresses only",
    "allowed_local_media_path": "serve file:// media URLs from below this directory",
    "media_follow_redirects": "follow media URL redirects (each hop is checked again)",
    "data_dir": "where async jobs (jobs.sqlite3), pending webhooks, the generated webhook "
    "secret and spooled videos live; keep it across restarts",
    "webhook_secret": "whsec_<base64> key that signs webhooks (Standard Webhooks v1); default: "
    "generated once and kept in DATA_DIR/webhook_secret",
    "webhook_retry_delays": "seconds before each webhook retry, e.g. 5,30,120 (jittered; "
    "Retry-After honoured); a delivery fails after the last one",
    "webhook_timeout": "seconds one webhook attempt may take",
    "job_retention_hours": "finished async jobs (and their webhook records) are deleted this "
    "long after they end; their status is then a 404 (0: keep forever)",
}
FLAG_ALIASES = {"api_keys": "--api-key"}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(Settings, include_extras=True)
    for name, field in Settings.model_fields.items():
        flag = FLAG_ALIASES.get(name, "--" + name.replace("_", "-"))
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": FLAG_HELP.get(name, f"(default: {field.default})"),
        }
        hint = hints[name]
        base = get_args(hint)[0] if get_origin(hint) is typing.Annotated else hint
        choices = get_args(hint) if get_origin(hint) is typing.Literal else None
        if get_origin(base) is list:
            kwargs["action"] = "append"
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices:
            kwargs["choices"] = choices
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-server", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    _add_settings_flags(serve)
    tiny = commands.add_parser("make-tiny-model", help="write a random-weight checkpoint offline")
    tiny.add_argument("directory", type=Path)
    for spec_field in dataclasses.fields(TinySpec):
        flag = "--" + spec_field.name.replace("_", "-")
        if spec_field.name == "family":
            tiny.add_argument(flag, choices=FAMILIES, default=spec_field.default)
        else:
            tiny.add_argument(flag, type=int, default=spec_field.default)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line, then VLM_* env vars, then defaults."""
    return Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields})


def _serve(args: argparse.Namespace) -> int:
    from server.api.app import create_app
    from server.api.server import serve
    from server.engine.loader import load_model
    from server.log import configure_logging

    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    try:
        # Load before serving, so a missing or broken checkpoint is one clear line, not a trace.
        loaded = load_model(settings.engine_config())
        app = create_app(settings, loaded)
        serve(app, settings.host, settings.port, settings.log_level, settings.shutdown_timeout)
    except ModelLoadError as exc:
        logger.error("%s", exc)
        return 2
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from server.engine.tiny import make_tiny_checkpoint
    from server.log import configure_logging

    configure_logging("info")
    spec = TinySpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinySpec)})
    try:
        make_tiny_checkpoint(args.directory, spec)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _make_tiny(args)


if __name__ == "__main__":
    sys.exit(main())
