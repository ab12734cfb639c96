"""Server settings: one pydantic-settings class (flags and VLM_* env vars), split into
frozen dataclasses for the parts of the server that consume them."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server import vllm_flags
from server.jobs.project import of_key
from server.media.netguard import bracketed
from server.vllm_flags import DTYPE_ALIASES, GENERATION_CONFIG_ALIASES

Quantization = Literal["none", "bnb-4bit", "bnb-8bit"]
# Addresses only this machine reaches (--host).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DType = Literal["auto", "bfloat16", "float16", "float32"]

# A comma-separated env var (VLM_API_KEYS=a,b) or a repeated CLI flag both become a list.
StrList = Annotated[list[str], NoDecode]


@dataclass(frozen=True)
class EngineConfig:
    model: str
    models_dir: Path
    device: str
    dtype: DType
    quantization: Quantization
    quantize_vision: bool
    attn_implementation: str
    default_max_tokens: int
    max_model_len: int  # 0: the model's context length
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_memory_gib: float  # 0: automatic
    max_queued_requests: int
    queue_timeout_s: float
    scheduling_policy: Literal["fcfs", "priority", "fair"] = "fcfs"
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    enable_prefix_caching: bool = True
    cache_per_project: bool = False
    encoder_cache_memory_gib: float = 1.0
    attention_backend: str = "reference"
    enforce_eager: bool = True
    async_scheduling: bool = False
    fused_decoder: bool = True
    compile_decoder: bool = False
    max_grammar_ms_per_token: float = 20.0  # 0: no limit


@dataclass(frozen=True)
class MediaLimits:
    max_image_bytes: int
    max_images_per_request: int
    max_media_bytes_per_request: int
    max_video_bytes: int
    max_videos_per_request: int
    image_decode_memory_bytes: int = 2**30
    max_concurrent_downloads: int = 32  # requests downloading their media at once
    max_concurrent_preprocessing: int = 8  # requests decoding it (and building their inputs)
    slot_timeout_s: float = 60.0  # a request's wait for those slots (--queue-timeout)


class Settings(BaseSettings):
    """Every field is also a `vlm-server serve` flag (underscores become dashes)."""

    # populate_by_name: the CLI passes fields by name; env vars may use the aliases below.
    model_config = SettingsConfigDict(env_prefix="VLM_", extra="ignore", populate_by_name=True)

    model: str = "tiny"
    served_model_name: StrList = []
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)  # 0: any free port (tests)
    # Proxies whose X-Forwarded-For / -Proto are believed (uvicorn's; the access log's client)
    forwarded_allow_ips: StrList = ["127.0.0.1"]
    root_path: str = ""  # the path prefix a proxy serves the API under (vLLM's --root-path)
    # VLM_API_KEY is the flag's own name (--api-key); VLM_API_KEYS reads better for a list.
    api_keys: StrList = Field(
        default=[], validation_alias=AliasChoices("VLM_API_KEYS", "VLM_API_KEY")
    )
    api_key_file: Path | None = None
    metrics_require_api_key: bool = False
    metrics_project: str | None = None  # only its keys read /metrics (implies the above)
    # Browser origins allowed to call the API (CORS); none by default, unlike vLLM's "*", so
    # a web page the user visits cannot drive a server on their machine or network.
    allowed_origins: StrList = []
    # Host names a server without keys on a loopback address answers besides localhost and IP
    # addresses (the DNS-rebinding guard: server/api/middleware.py's LocalHostMiddleware).
    allowed_hosts: StrList = []
    max_request_body_bytes: int = Field(default=300 * 1024 * 1024, ge=1)  # a 200 MiB video
    quantization: Quantization = "none"
    quantize_vision: bool = False
    dtype: DType = "auto"
    device: str = "auto"
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2"] = "auto"
    models_dir: Path = Path("models")
    data_dir: Path = Path("data")
    # 0: the rest of the context, as vLLM and OpenAI answer a request without max_tokens
    default_max_tokens: int = Field(default=0, ge=0)
    max_n: int = Field(default=8, ge=1)  # choices (`n`) per request
    max_model_len: int = Field(default=0, ge=0)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=8192, ge=1)
    kv_cache_memory: float = Field(default=0.0, ge=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    block_size: int = Field(default=16, ge=1, le=1024)
    enable_prefix_caching: bool = True
    # The caches (prefix, vision, grammar) shared only within an API key's project.
    cache_per_project: bool = False
    encoder_cache_memory: float = Field(default=1.0, ge=0)
    attention_backend: Literal["reference", "triton"] = "reference"
    # Decode steps as CUDA graphs stay off until scripts/gpu_check.sh has passed with them on.
    enforce_eager: bool = True
    # Queue step t+1 before reading step t's tokens; off until scripts/gpu_check.sh has
    # passed with it on.
    async_scheduling: bool = False
    # Steps of generated tokens through engine/decoder.py (HF's math, half the kernels).
    fused_decoder: bool = True
    # Its layers compiled by torch.compile: GPU-only gain, off until gpu_check passes with it.
    compile_decoder: bool = False
    # What omitted sampling fields take on the OpenAI routes: OpenAI's defaults (`openai`;
    # vLLM's `vllm`), the checkpoint's generation_config (`auto`, vLLM's default), or the
    # generation_config.json in a folder (as vLLM takes one).
    generation_config: str = "openai"
    # vLLM's --override-generation-config: sampling defaults set over those.
    override_generation_config: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    max_queued_requests: int = Field(default=256, ge=1)
    queue_timeout: float = Field(default=60.0, gt=0)
    max_grammar_ms_per_token: float = Field(default=20.0, ge=0)
    # vLLM's: fcfs, or priority (a request's `priority`: lower first, and it may preempt);
    # ours: fair (the batch shared between API keys' projects)
    scheduling_policy: Literal["fcfs", "priority", "fair"] = "fcfs"
    job_priority: int = Field(default=1, ge=-(2**31), lt=2**31)  # async jobs' requests
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    # (evaluation harnesses send a video as up to 64 frames: lmms-eval's default)
    max_images_per_request: int = Field(default=64, ge=0)
    # The visual tokens of an image part whose detail is auto or left out (0: the model's most)
    auto_image_tokens: int = Field(default=1280, ge=0)
    image_decode_memory: float = Field(default=1.0, gt=0)  # GiB, all images being decoded
    max_media_bytes_per_request: int = Field(default=256 * 1024 * 1024, ge=1)
    max_video_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    max_videos_per_request: int = Field(default=4, ge=0)  # (sharing the context equally)
    video_decode_workers: int = Field(default=2, ge=1)
    video_decode_timeout: float = Field(default=60.0, gt=0)
    video_decode_worker_max_jobs: int = Field(default=1000, ge=0)
    video_max_fps: float = Field(default=2.0, gt=0)
    caption_tokens: int = Field(default=256, ge=1)
    max_concurrent_preprocessing: int = Field(default=8, ge=1)
    max_concurrent_downloads: int = Field(default=32, ge=1)
    media_fetch_timeout: float = Field(default=10.0, gt=0)
    allowed_media_domains: StrList = []
    allowed_local_media_path: Path | None = None
    media_follow_redirects: bool = False
    shutdown_timeout: float = Field(default=30.0, ge=0)
    client_timeout: float = Field(default=60.0, ge=0)  # a request's headers; a body's pause
    webhook_secret: str | None = None  # whsec_...; default: generated once under --data-dir
    webhook_secret_per_project: bool = False
    webhook_retry_delays: StrList = ["5", "30", "120", "600", "1800"]  # seconds, per retry
    webhook_timeout: float = Field(default=10.0, gt=0)
    job_retention_hours: float = Field(default=168.0, ge=0)  # finished jobs; 0: keep forever
    max_file_storage_bytes: int = Field(default=100 * 1024**3, ge=0)  # a project's files; 0: any
    job_store: str | None = None  # sqlite:///PATH | postgresql://...; default: under data_dir
    # Seconds a job stays held without renewal; renewed every third of it, so under 2 s a slow
    # store round trip or a pause of the loop could let a live job be taken over and run twice.
    job_lease: float = Field(default=30.0, ge=2)
    job_max_attempts: int = Field(default=3, ge=1)  # takeovers before a job fails
    store_responses: bool = True  # the Responses API's answers, for previous_response_id
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    playground: bool = True
    _api_keys: dict[str, str] = PrivateAttr(default_factory=dict)  # (all_api_keys)

    @field_validator(
        "served_model_name",
        "api_keys",
        "allowed_origins",
        "allowed_hosts",
        "allowed_media_domains",
        "forwarded_allow_ips",
        "webhook_retry_delays",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: object, info: ValidationInfo) -> object:
        """`a,b` works in env vars, and in repeated flags too except for API keys (a key given
        as a flag is kept whole: it may hold a comma)."""
        if isinstance(value, str):
            if info.field_name == "api_keys" and value and not value.replace(",", "").strip():
                # (set to nothing but commas and spaces: a slip; empty is no keys, as unset)
                raise ValueError("holds no API key: the server would run without authentication")
            value = [value]
        elif info.field_name == "api_keys" or not isinstance(value, list):
            return value
        return [p.strip() for item in value for p in str(item).split(",") if p.strip()]

    @field_validator("dtype", mode="before")
    @classmethod
    def _vllms_dtype_names(cls, value: object) -> object:
        """vLLM's `half` and `float` (VLM_DTYPE=half too, as --dtype half)."""
        return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("max_model_len", mode="before")
    @classmethod
    def _vllms_context_length(cls, value: object) -> object:
        """vLLM's `32k`, `32K`, `auto` and `-1` (what the KV cache holds: 0 here)."""
        return vllm_flags.context_length(value)

    @field_validator("max_num_batched_tokens", mode="before")
    @classmethod
    def _vllms_token_count(cls, value: object) -> object:
        return vllm_flags.token_count(value)

    @field_validator("generation_config", mode="before")
    @classmethod
    def _generation_config(cls, value: object) -> object:
        """openai, auto, vLLM's `vllm` (openai), or a folder with a generation_config.json."""
        if not isinstance(value, str):
            return value
        value = GENERATION_CONFIG_ALIASES.get(value, value)
        if value in ("openai", "auto"):
            return value
        file = Path(value) / "generation_config.json"
        if not value.strip() or not file.is_file():
            if not value.strip():
                found = "none given"
            elif Path(value).is_dir():
                found = "a folder without one"
            else:
                found = "no such folder"
            raise ValueError(
                "must be openai (vLLM's vllm), auto, or a folder holding a "
                f"generation_config.json ({found})"
            )
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"its generation_config.json cannot be read: {exc}") from None
        from server.engine.sampling import GENERATION_CONFIG_RANGES  # (torch: only when given)

        vllm_flags.check_generation_config(config, GENERATION_CONFIG_RANGES)
        return value

    @field_validator("override_generation_config", mode="before")
    @classmethod
    def _generation_overrides(cls, value: object) -> object:
        from server.engine.sampling import GENERATION_CONFIG_RANGES  # (torch: only when given)

        return vllm_flags.generation_overrides(value, GENERATION_CONFIG_RANGES)

    @field_validator("webhook_retry_delays")
    @classmethod
    def _check_delays(cls, value: list[str]) -> list[str]:
        for delay in value:
            try:
                seconds = float(delay)
            except ValueError:
                raise ValueError(f"webhook retry delay {delay!r} is not a number") from None
            if not 0 <= seconds <= 86400:
                raise ValueError(f"webhook retry delay {delay} s is outside 0..86400")
        return value

    @field_validator("allowed_media_domains")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        return [_host_as_matched(host) for host in value]

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        for proxy in (p for p in value if p != "*"):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"{proxy!r} is not an address or network (10.0.0.5, 10.0.0.0/8, fd00::/8) or *"
                ) from None
        return value

    @field_validator("root_path")
    @classmethod
    def _check_root_path(cls, value: str) -> str:
        value = value.rstrip("/")
        if value and (not ROOT_PATH.fullmatch(value) or {".", ".."} & set(value.split("/"))):
            raise ValueError(
                f"{value!r} is not a path prefix: `/` and segments of letters, digits, `_`, "
                "`.`, `-`, not `.` or `..` (/vlm, /qwen/7b)"
            )
        if value and value.split("/")[1] in SERVED_SEGMENTS:
            raise ValueError(
                f"{value!r} starts with /{value.split('/')[1]}, a path this server answers "
                "itself: choose another prefix (/vlm)"
            )
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not a web origin: scheme and host, and a port if not the "
                    "scheme's (https://app.example.com, http://localhost:3000), or *"
                )
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        for entry in value:
            key_and_project(entry)
        return value

    @field_validator("api_key_file")
    @classmethod
    def _check_key_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return value
        if not value.is_file():
            raise ValueError("no such file")
        lines = _key_lines(value)
        if not lines:  # (an empty secret mount, say)
            raise ValueError("holds no API key: the server would run without authentication")
        for number, line in enumerate(lines, start=1):
            try:
                key_and_project(line)
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
        return value

    @field_validator("allowed_local_media_path")
    @classmethod
    def _check_local_media_path(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError("no such directory")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: str | None) -> str | None:
        """Checked at start-up: a bad key would otherwise fail every delivery, later."""
        try:
            key = base64.b64decode((value or "whsec_AA==").removeprefix("whsec_"), validate=True)
        except ValueError:
            key = b""
        if not key:
            raise ValueError("must be whsec_ followed by a base64 key (Standard Webhooks)")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("job_store")
    @classmethod
    def _check_job_store(cls, value: str | None) -> str | None:
        """Empty means the default (an empty env var from a compose file)."""
        if not value:
            return None
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("job store must be sqlite:///PATH or postgresql://...")
        return value

    def all_api_keys(self) -> dict[str, str]:
        """Each key of the --api-key values and the lines of --api-key-file, and its project
        (`KEY PROJECT` names it; a lone KEY is its own: server/jobs/project.py); read once,
        as the settings are made."""
        return dict(self._api_keys)

    @model_validator(mode="after")
    def _read_api_keys(self) -> Settings:
        entries = [*self.api_keys, *(_key_lines(self.api_key_file) if self.api_key_file else [])]
        keys: dict[str, str] = {}
        for key, name in map(key_and_project, entries):
            if keys.setdefault(key, name) != name:
                raise ValueError(
                    f"an API key is given twice, with two projects ({keys[key]!r} and "
                    f"{name!r}): give it once"
                )
        self._api_keys = keys
        if self.metrics_project and self.metrics_project not in keys.values():
            raise ValueError(
                f"--metrics-project {self.metrics_project!r}: no API key is in that project "
                "(give one as `KEY PROJECT` in --api-key or --api-key-file)"
            )
        return self

    def metrics_open(self) -> bool:
        """Whether /metrics answers without an API key."""
        return not (self.metrics_require_api_key or self.metrics_project)

    def served_model_names(self) -> list[str]:
        """The names clients may send as `model`; the model path/id when none are given."""
        return list(self.served_model_name) or [self.model]

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            models_dir=self.models_dir,
            device=self.device,
            dtype=self.dtype,
            quantization=self.quantization,
            quantize_vision=self.quantize_vision,
            attn_implementation=self.attn_implementation,
            default_max_tokens=self.default_max_tokens,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            kv_cache_memory_gib=self.kv_cache_memory,
            gpu_memory_utilization=self.gpu_memory_utilization,
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            cache_per_project=self.cache_per_project,
            encoder_cache_memory_gib=self.encoder_cache_memory,
            attention_backend=self.attention_backend,
            enforce_eager=self.enforce_eager,
            async_scheduling=self.async_scheduling,
            fused_decoder=self.fused_decoder,
            compile_decoder=self.compile_decoder,
            max_grammar_ms_per_token=self.max_grammar_ms_per_token,
            max_queued_requests=self.max_queued_requests,
            queue_timeout_s=self.queue_timeout,
            scheduling_policy=self.scheduling_policy,
        )

    def media_limits(self) -> MediaLimits:
        return MediaLimits(
            max_image_bytes=self.max_image_bytes,
            max_images_per_request=self.max_images_per_request,
            max_media_bytes_per_request=self.max_media_bytes_per_request,
            max_video_bytes=self.max_video_bytes,
            max_videos_per_request=self.max_videos_per_request,
            image_decode_memory_bytes=int(self.image_decode_memory * 2**30),
            max_concurrent_downloads=self.max_concurrent_downloads,
            max_concurrent_preprocessing=self.max_concurrent_preprocessing,
            slot_timeout_s=self.queue_timeout,
        )


PROJECT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# --allowed-media-domains: a host name (an address is checked by ipaddress)
HOST_NAME = re.compile(r"[\w.-]+")
# --allowed-origins: what a browser sends as Origin (any scheme: extensions and app shells
# have their own; no path, no trailing slash)
ROOT_PATH = re.compile(r"(/[A-Za-z0-9_.-]+)+")
# First segments of the paths the server answers (its routes, and OpenAI's resources at the
# root and under hosted prefixes): a --root-path starting with one would be read as a route.
SERVED_SEGMENTS = frozenset(
    {"v1", "v2", "docs", "redoc", "openapi.json", "static-offline-docs", "playground"}
    | {"health", "metrics", "ping", "version", "invocations", "openai"}
    | {"tokenize", "detokenize", "tokenizer_info"}
    | {"models", "chat", "completions", "responses", "conversations", "files", "batches"}
    | {"embeddings", "audio", "images", "moderations", "fine_tuning", "messages"}
)
ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(\[[0-9A-Fa-f:.]+\]|[^/\s:@\[\]]+)(:\d{1,5})?")


def _host_as_matched(entry: str) -> str:
    """An --allowed-media-domains entry as the URL check compares hosts: an IPv6 address
    without brackets, a name in lower-case ASCII (an international one as punycode); with a
    port, host:port ([address]:port for IPv6)."""
    host, port = _host_and_port(entry.strip())
    bare = host.removeprefix("[").removesuffix("]")
    try:
        name = str(ipaddress.ip_address(bare))
    except ValueError:
        try:
            name = bare.encode("idna").decode("ascii").lower().rstrip(".")  # (FQDN's dot)
        except UnicodeError:
            name = ""
        if not HOST_NAME.fullmatch(name) or (port is not None and not port.isdigit()):
            raise ValueError(
                f"{entry!r} is not a host name or address, with a port or without: no scheme "
                "or path (media.example.com, 10.0.0.5, [fd00::5], media.internal:8080)"
            ) from None
    if port is None:
        return name
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return f"{bracketed(name)}:{int(port)}"


def _host_and_port(entry: str) -> tuple[str, str | None]:
    """'[fd00::5]:8080' and 'host:8080' have a port; a bare IPv6 address has colons, no port."""
    if entry.startswith("[") and "]:" in entry:
        host, port = entry.rsplit(":", 1)
        return host, port
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, port
    return entry, None


def key_and_project(entry: str) -> tuple[str, str]:
    """`KEY` (its own project) or `KEY PROJECT` (keys naming one project share its objects)."""
    words = entry.split()
    if len(words) == 1:
        return words[0], of_key(words[0])
    if len(words) == 2 and PROJECT_NAME.fullmatch(words[1]):
        return words[0], words[1]
    raise ValueError(
        "an API key is given as KEY or as KEY PROJECT (a project name of letters, digits, "
        "'_', '.' or '-', at most 64)"
    )


def _key_lines(path: Path) -> list[str]:
    """The lines of an API key file, without blanks and # comments."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]
