"""vlm-server: serve a Qwen vision-language model over OpenAI's API and the media endpoints.

Commands: serve, make-tiny-model, redeliver-webhooks, webhook-secret.
`serve` flags are generated from Settings, so each one also works as a VLM_* env var; a flag
given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import logging
import os
import re
import socket
import sys
import tempfile
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, get_args, get_origin

from pydantic import ValidationError

from server import __version__, vllm_flags
from server.config import LOOPBACK_HOSTS, Settings
from server.engine.tiny import FAMILIES, SPEC_MINIMUMS, TinySpec, spec_flag
from server.exceptions import StartupError
from server.flag_help import ENV_PREFIX, env_names, field_for_flag, flag_name, help_text

if TYPE_CHECKING:
    from server.jobs.store import JobStore

logger = logging.getLogger("server.cli")

TINY_HELP = {
    "family": "Model family whose architecture, processor and chat template are built.",
    "hidden_size": "Text model hidden size.",
    "num_layers": "Text model decoder layers.",
    "num_heads": "Text model attention heads (hidden size / heads must be even).",
    "num_kv_heads": "Text model key/value heads (a divisor of --num-heads).",
    "intermediate_size": "Text model MLP width.",
    "vision_depth": "Vision tower blocks.",
    "vision_embed_dim": "Vision tower width.",
    "vision_heads": "Vision tower heads (width / heads must be divisible by 4).",
    "bpe_vocab_size": "Byte-level BPE vocabulary trained for the tokenizer (its 256 byte tokens "
    "included; a bigger one may stop short where the training text runs out of merges).",
    "max_position_embeddings": "Context length in tokens.",
    "seed": "Random seed of the weights (same seed, same checkpoint).",
}
# VLM_* names that are not serve settings but are read elsewhere (the benchmark scripts).
OTHER_ENV_NAMES = ("VLM_CODE_ROOT",)
# Values never echoed in an error line: keys, and URLs that may hold a password.
SECRET_FIELDS = ("api_keys", "webhook_secret")  # (a job store URL: its password hidden)
# A value that starts like this is a local directory, never a hub id.
PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


# What a value must be, in words, by pydantic error type (others: the validator's own message).
ALLOWED = {
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
    "literal_error": "must be one of {expected}",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be at most {le}",
}


class ConfigError(Exception):
    """A setting the server cannot start with; its message is one line for the operator."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line (not the usage block), exit code 2."""

    commands: Any  # (the top-level parser's subcommands)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def refuse_unrecognized(self, tokens: list[str]) -> NoReturn:
        """This command's unrecognized arguments, with what to use instead of vLLM's flags
        and the closest flag to a mistyped one."""
        known = [flag for action in self._actions for flag in action.option_strings]
        hints = vllm_flags.unrecognized_hints(tokens, known)
        self.error(f"unrecognized arguments: {' '.join(tokens)}" + (f" ({hints})" if hints else ""))


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(Settings, include_extras=True)
    for name, field in Settings.model_fields.items():
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": help_text(name, field),
        }
        hint = hints[name]
        base = get_args(hint)[0] if get_origin(hint) is typing.Annotated else hint
        choices = get_args(hint) if get_origin(hint) is typing.Literal else None
        if name == "served_model_name":  # (vLLM's form, `A B`, as well as the flag repeated)
            kwargs["action"], kwargs["nargs"] = vllm_flags.ExtendNames, "+"
        elif get_origin(base) is list:
            kwargs["action"] = "append"
        if name == "dtype":
            kwargs["type"] = vllm_flags.dtype  # (choices are checked after it)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices:
            kwargs["choices"] = choices
        if hint is not bool and not choices:
            kwargs["metavar"] = flag_name(name).removeprefix("--").replace("-", "_").upper()
        parser.add_argument(flag_name(name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vlm-server", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vlm-server {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    parser.commands = commands
    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description="Serve a Qwen2-VL-family model over HTTP. Every flag is also an environment "
        "variable VLM_<FLAG> (e.g. VLM_PORT=8001); a flag given here wins.",
    )
    _add_settings_flags(serve)
    vllm_flags.add_accepted(serve)
    tiny = commands.add_parser(
        "make-tiny-model",
        help="write a random-weight checkpoint offline",
        description="Write a tiny random-weight Qwen2-VL-family checkpoint (tokenizer, chat "
        "template, processor, safetensors) without network access. Its answers are gibberish; "
        "it exercises the same code as a real checkpoint.",
    )
    tiny.add_argument("directory", type=Path, help="Directory to write the checkpoint to.")
    tiny.add_argument(
        "--force",
        action="store_true",
        help="Replace the directory even if it holds something else than a tiny checkpoint "
        "(by default such a directory is refused: it could be a downloaded model).",
    )
    for spec_field in dataclasses.fields(TinySpec):
        flag = spec_flag(spec_field.name)
        least = SPEC_MINIMUMS.get(spec_field.name)
        floor = "" if least is None else f" At least {least}."
        hint = f"{TINY_HELP[spec_field.name]}{floor} Default: {spec_field.default}."
        if spec_field.name == "family":
            tiny.add_argument(flag, choices=FAMILIES, default=spec_field.default, help=hint)
        else:
            tiny.add_argument(flag, type=int, default=spec_field.default, help=hint)
    redeliver = commands.add_parser(
        "redeliver-webhooks",
        help="send failed webhooks again",
        description="Put webhook deliveries whose retries ran out (status failed: the "
        "receiver was down longer than --webhook-retry-delays) back in the queue, with a new "
        "schedule of retries; the running servers send them within a minute. Reads the same "
        "--job-store and --data-dir (or VLM_JOB_STORE / VLM_DATA_DIR) as serve.",
    )
    _add_store_flags(redeliver)
    redeliver.add_argument(
        "--job", action="append", dest="jobs", metavar="JOB_ID", help="Only this job's (repeat)."
    )
    redeliver.add_argument(
        "--since-hours",
        type=_positive_number,
        default=None,
        help="Only deliveries made in the last this many hours.",
    )
    secret = commands.add_parser(
        "webhook-secret",
        help="print the secret a receiver checks webhooks with",
        description="Print the whsec_ secret that signs webhooks: the shared one, or with "
        "--project or --api-key the one that signs that project's webhooks under "
        "--webhook-secret-per-project. Reads the secret every replica signs with from the "
        "same --job-store and --data-dir (or VLM_JOB_STORE / VLM_DATA_DIR) as serve.",
    )
    _add_store_flags(secret)
    whose = secret.add_mutually_exclusive_group()
    whose.add_argument(
        "--project",
        help="A project named in the API key file (KEY PROJECT), or a key's own project as "
        "serve's start-up line and /metrics name it (key-...).",
    )
    whose.add_argument(
        "--api-key",
        metavar="KEY",
        help="The project of this key, as serve's keys name it (--api-key-file, or "
        "VLM_API_KEY_FILE / VLM_API_KEYS); a key they do not hold is refused.",
    )
    secret.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="As serve's (or VLM_API_KEY_FILE / VLM_API_KEYS): --project and --api-key are "
        "checked against serve's keys, and refused without them.",
    )
    return parser


def _add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job-store", default=None, help="As serve's --job-store.")
    parser.add_argument("--data-dir", type=Path, default=None, help="As serve's --data-dir.")


def _take_positional_model(args: argparse.Namespace) -> None:
    """`serve MODEL` (vLLM's form) is --model MODEL. A name list takes every word after it:
    `--served-model-name A MODEL` with no model on the command line would serve the default
    (VLM_MODEL, or tiny) under the name MODEL; refused where that last word looks like a model
    (a hub id or a directory)."""
    positional = args.__dict__.pop("model_positional", None)
    swallowed = args.__dict__.pop("several_names_after_one_flag", None)
    if positional is not None:
        if "model" in vars(args) and args.model != positional:
            raise ConfigError(f"two models: {positional!r} and --model {args.model!r}")
        args.model = positional
    elif swallowed and "model" not in vars(args) and _looks_like_a_model(swallowed[-1]):
        raise ConfigError(
            f"--served-model-name {' '.join(swallowed)}: is {swallowed[-1]!r} the model? A name "
            "list takes every word after it: give the model first (serve MODEL "
            "--served-model-name A B) or as --model; or repeat the flag for each name"
        )


def _looks_like_a_model(word: str) -> bool:
    return "/" in word or word.startswith(("tiny", *PATH_PREFIXES)) or Path(word).is_dir()


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line, then VLM_* env vars, then defaults."""
    return Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields})


def load_settings(args: argparse.Namespace) -> Settings:
    """settings_from_args, with each bad value explained in one line (ConfigError)."""
    try:
        return settings_from_args(args)
    except ValidationError as exc:
        given = vars(args)
        raise ConfigError("\n".join(_explain(e, given) for e in exc.errors())) from None


def _explain(error: Any, given: dict[str, Any]) -> str:
    """'--port 'abc': must be a whole number (from VLM_PORT)'."""
    if not error["loc"]:  # the settings together (their values may hold secrets: not shown)
        return _allowed(error)
    name = field_for_flag(str(error["loc"][0]))
    value = error.get("input")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if name == "job_store" and isinstance(value, str):
        value = _without_password(value)
    elif name in SECRET_FIELDS:
        value = "(hidden)"
    source = ""
    if name not in given:
        env = next((e for e in env_names(name) if _getenv(e) is not None), None)
        source = f" (from {env})" if env else ""
    return f"{flag_name(name)} {value!r}{source}: {_allowed(error)}"


def _without_password(url: str) -> str:
    """A connection URL as an error may show it: its password (up to the last @ of the part
    before the path, which may hold @ itself; and a password= query parameter) hidden."""
    url = re.sub(r"^([A-Za-z0-9+.-]*://[^:/@]*):[^/]*@", r"\1:***@", url)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)


def _allowed(error: Any) -> str:
    template = ALLOWED.get(error["type"])
    if template is not None:
        return template.format(**(error.get("ctx") or {}))
    return str(error["msg"]).removeprefix("Value error, ")


def _getenv(name: str) -> str | None:
    """Env vars are matched without regard to case, as pydantic-settings reads them."""
    return next((v for k, v in os.environ.items() if k.upper() == name), None)


def idle_flag_warnings(settings: Settings) -> list[str]:
    """Settings that do nothing as the others stand."""
    if settings.all_api_keys():
        return []
    warnings = []
    if settings.metrics_require_api_key:
        warnings.append("--metrics-require-api-key does nothing without API keys (--api-key)")
    if settings.webhook_secret_per_project:
        warnings.append(
            "--webhook-secret-per-project does nothing without API keys (--api-key): every "
            "job is in one project, signed with the shared secret"
        )
    if settings.scheduling_policy == "fair":
        warnings.append(
            "--scheduling-policy fair shares the batch between API keys' projects: without "
            "API keys every request is in one project, and it is first come, first served"
        )
    return warnings


def exposure_warnings(settings: Settings, given: typing.Iterable[str]) -> list[str]:
    """What an operator may not mean: no API key on an address others can reach, and env
    vars a flag overrides (values not shown: they may be keys)."""
    warnings = [
        f"{flag_name(name)} is given on the command line: {env} is ignored"
        for name in given
        if name in Settings.model_fields
        for env in env_names(name)
        if _getenv(env)  # (set empty: nothing is lost)
    ]
    if not settings.all_api_keys() and settings.host not in LOOPBACK_HOSTS:
        warnings.append(
            f"no API key, listening on {settings.host}: whoever reaches port {settings.port} "
            "can use the server and read every stored job, file and response (--api-key)"
        )
    return warnings


def unknown_env_warnings(environ: typing.Mapping[str, str]) -> list[str]:
    """A VLM_* variable that is no setting is ignored: say so, and name the closest one."""
    known = {e for name in Settings.model_fields for e in env_names(name)}
    known.update(OTHER_ENV_NAMES)
    warnings = []
    for key in sorted(environ):
        upper = key.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known:
            close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else ""
            warnings.append(f"{key} is not a vlm-server setting and is ignored{hint}")
    return warnings + vllm_flags.env_warnings(environ, known, ENV_PREFIX)


def check_model_path(model: str) -> None:
    """A path-like --model must be a checkpoint directory: never looked up on the hub."""
    if not model.startswith(PATH_PREFIXES):
        return
    path = Path(model).expanduser()
    if path.is_file():
        raise ConfigError(f"--model {model!r}: a file; give the checkpoint's directory")
    if not path.is_dir():
        raise ConfigError(f"--model {model!r}: no such directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model {model!r}: not a checkpoint (no config.json in it)")


def check_directories(settings: Settings) -> None:
    """--data-dir made (it is written to), --models-dir a directory if it exists: one line
    before the model loads, not a traceback after."""
    for flag, path in (("--models-dir", settings.models_dir), ("--data-dir", settings.data_dir)):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{flag} '{path}': not a directory")
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryFile(dir=settings.data_dir):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"--data-dir '{settings.data_dir}': cannot write there ({reason.lower()})"
        ) from None


def check_job_store(settings: Settings) -> None:
    """The job store opened (and closed again) before the model loads, which takes minutes:
    a database that cannot be reached or a file that cannot be written is one line at once."""
    opened_job_store(settings.job_store, settings.data_dir).close()


def opened_job_store(job_store: str | None, data_dir: Path) -> JobStore:
    """The job store, or why not in one line (ConfigError; JobStoreStartError, a
    StartupError, for a database that cannot be reached)."""
    from server.exceptions import JobStoreUnavailable
    from server.jobs.store import open_job_store

    try:
        return open_job_store(job_store, data_dir)
    except ValueError as exc:  # (a store a newer version of the server wrote)
        raise ConfigError(f"--job-store: {exc}") from None
    except JobStoreUnavailable as exc:  # (locked by another process, a disk gone read-only)
        raise ConfigError(f"--job-store: cannot use it now: {exc.__cause__ or exc}") from None


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening address before the model loads (minutes), so a port already in use
    is found at once. uvicorn starts listening on this socket once the app is ready."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        where = f"--host {host} --port {port}"
        raise ConfigError(f"{where}: cannot listen there ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


def _serve(args: argparse.Namespace) -> int:
    from server.log import configure_logging

    try:
        _take_positional_model(args)
        settings = load_settings(args)
    except ConfigError as exc:
        sys.stderr.write(f"vlm-server serve: error: {exc}\n")
        return 2
    configure_logging(settings.log_level, settings.log_format)
    # Imported after the settings are checked: a typo is reported before torch loads.
    from server.api.app import create_app
    from server.api.server import serve
    from server.engine.loader import load_model

    try:
        verdict = vllm_flags.api_key_refusal(
            os.environ, bool(settings.all_api_keys()), settings.host in LOOPBACK_HOSTS
        )
        if verdict is not None and verdict[0] == "refuse":
            raise ConfigError(verdict[1])
        check_model_path(settings.model)
        check_directories(settings)
        check_job_store(settings)
        sock = bind_socket(settings.host, settings.port)
        # Warnings once it can start: a start-up mistake is its one line, not "listening on
        # HOST" before it cannot listen there.
        warnings = [
            *unknown_env_warnings(os.environ),
            *idle_flag_warnings(settings),
            *exposure_warnings(settings, vars(args)),
            *([verdict[1]] if verdict is not None else []),
        ]
        for warning in warnings:
            logger.warning("%s", warning)
        # Load before serving, so a missing or broken checkpoint is one clear line, not a trace.
        loaded = load_model(settings.engine_config())
        app = create_app(settings, loaded)
        return serve(app, settings, sock)
    except (ConfigError, StartupError) as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the model loads: nothing to drain
        logger.info("interrupted before the server started")
        return 130


def _make_tiny(args: argparse.Namespace) -> int:
    from server.engine.tiny import make_tiny_checkpoint
    from server.log import configure_logging

    configure_logging("info")
    spec = TinySpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinySpec)})
    try:
        make_tiny_checkpoint(args.directory, spec, force=args.force)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    except OSError as exc:  # a read-only or full disk, say (its path may be a temporary one)
        logger.error("cannot write %s: %s", args.directory, exc.strerror or exc)
        return 2
    return 0


def _serve_store(args: argparse.Namespace) -> JobStore:
    """serve's job store, for a command run beside it (ConfigError, StartupError)."""
    job_store = args.job_store or os.environ.get(f"{ENV_PREFIX}JOB_STORE")
    default_dir = Settings.model_fields["data_dir"].default
    data_dir = args.data_dir or Path(os.environ.get(f"{ENV_PREFIX}DATA_DIR") or default_dir)
    if job_store is None and not (data_dir / "jobs.sqlite3").exists():
        raise ConfigError(f"--data-dir {data_dir}: no job store there (give serve's --data-dir)")
    return opened_job_store(job_store, data_dir)


def _with_serve_store(args: argparse.Namespace, use: typing.Callable[[JobStore], int]) -> int:
    """use(serve's job store), its errors as one line and exit code 2."""
    from server.exceptions import JobStoreUnavailable
    from server.log import configure_logging

    configure_logging("info", "text")
    try:
        store = _serve_store(args)
    except (ConfigError, StartupError) as exc:
        logger.error("%s", exc)
        return 2
    try:
        return use(store)
    except JobStoreUnavailable as exc:
        logger.error("--job-store: cannot use it now: %s", exc.__cause__ or exc)
        return 2
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    finally:
        store.close()


def _positive_number(text: str) -> float:
    """An argparse type: a number above 0 (a negative --since-hours selected nothing, silently)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number above 0")
    return value


def _redeliver(args: argparse.Namespace, store: JobStore) -> int:
    missing = [job_id for job_id in args.jobs or () if store.get(job_id) is None]
    if missing:  # (a typo: say so, rather than "0 queued again")
        raise ConfigError(f"--job {', '.join(missing)}: no such job in this job store")
    since = None if args.since_hours is None else store.now() - args.since_hours * 3600
    count = store.redeliver(args.jobs, since)
    logger.info("%d failed webhook deliver%s queued again", count, "y" if count == 1 else "ies")
    if count == 0:
        logger.info("%s", _deliveries_line(args, store))
    return 0


def _deliveries_line(args: argparse.Namespace, store: JobStore) -> str:
    """Why nothing was queued again: the deliveries asked about, by status."""
    if args.jobs:
        deliveries = [d for job_id in args.jobs for d in store.deliveries_of(job_id)]
        counts: dict[str, int] = {}
        for delivery in deliveries:
            counts[delivery["status"]] = counts.get(delivery["status"], 0) + 1
        whose = "those jobs'" if len(args.jobs) > 1 else "the job's"
    else:
        counts = store.count_deliveries_by_status() or {}
        whose = "the job store's"
    if not counts:
        return f"{whose} webhook deliveries: none (no webhook_url, or not ended yet)"
    by_status = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    within = ""
    if args.since_hours is not None:
        within = f" (only failed ones of the last {args.since_hours:g} h are sent again)"
    return f"{whose} webhook deliveries: {by_status}{within}"


def _webhook_secret(args: argparse.Namespace, store: JobStore) -> int:
    from server.jobs.webhooks import project_secret

    secret = store.stored_value("webhook_secret")
    if secret is None:
        raise ConfigError("no webhook secret in the job store yet: start serve with it once")
    sys.stdout.write(project_secret(secret, _project_asked(args, store)) + "\n")
    return 0


def _project_asked(args: argparse.Namespace, store: JobStore) -> str:
    """The project --project or --api-key names, checked against serve's keys (a typo, or keys
    this command does not see, would give a tenant a secret that never verifies). A key's own
    project is named as serve's start-up line and /metrics name it."""
    from server.jobs.project import ALL, ProjectLabels, named_projects

    if args.project is None and args.api_key is None:
        return ALL
    keys = _serve_keys(args)
    if not keys:
        raise ConfigError(
            f"{'--api-key' if args.api_key else '--project'}: serve's API keys are needed to "
            "check it against (--api-key-file, or VLM_API_KEY_FILE / VLM_API_KEYS / "
            "VLM_API_KEY as serve has them); without keys every webhook is signed with the "
            "shared secret (no flag)"
        )
    if args.api_key:
        if args.api_key not in keys:
            raise ConfigError("--api-key: not one of serve's API keys")
        return keys[args.api_key]
    label_key = store.stored_value("metrics_label_key")
    if label_key is None:  # (a store an older server made: its key projects had no names)
        raise ConfigError("the job store has not named its projects yet: start serve with it once")
    label = ProjectLabels(label_key, named_projects(keys))
    by_name = {label(project): project for project in keys.values()}
    if args.project not in by_name:
        known = ", ".join(sorted(by_name))
        raise ConfigError(f"--project {args.project!r}: no API key is in it (projects: {known})")
    return by_name[args.project]


def _serve_keys(args: argparse.Namespace) -> dict[str, str]:
    """serve's API keys and their projects, read as serve reads them (--api-key-file given
    here, else VLM_API_KEY_FILE, VLM_API_KEYS, VLM_API_KEY)."""
    given = {"api_key_file": args.api_key_file} if args.api_key_file else {}
    try:
        return Settings(**given).all_api_keys()
    except ValidationError as exc:
        raise ConfigError("\n".join(_explain(e, given) for e in exc.errors())) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unrecognized = parser.parse_known_args(argv)
    if unrecognized:  # (said by the command's own parser: `vlm-server serve: error: ...`)
        parser.commands.choices[args.command].refuse_unrecognized(unrecognized)
    if args.command == "serve":
        return _serve(args)
    if args.command == "redeliver-webhooks":
        return _with_serve_store(args, functools.partial(_redeliver, args))
    if args.command == "webhook-secret":
        return _with_serve_store(args, functools.partial(_webhook_secret, args))
    return _make_tiny(args)


if __name__ == "__main__":
    sys.exit(main())
