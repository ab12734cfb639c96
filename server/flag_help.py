"""What each `serve` flag means, and its default in words and units.

One source for `vlm-server serve --help` and the README's flag table (tests/unit/test_flags.py
keeps the README in step), so the two cannot drift."""

from __future__ import annotations

from typing import Any

from pydantic.fields import FieldInfo

from server.config import Settings

ENV_PREFIX = "VLM_"
# Flags whose name is not the field's (the field is plural: the flag is repeated).
FLAG_NAMES = {"api_keys": "--api-key"}
# Env names a field also answers to, beyond VLM_<FIELD>.
ENV_ALIASES = {"api_keys": ("VLM_API_KEY",)}

GIB = 2**30
MIB = 2**20
# How a default is shown: byte counts in MiB, durations in seconds, memory sizes in GiB.
UNITS = {
    "max_request_body_bytes": "bytes",
    "max_image_bytes": "bytes",
    "max_media_bytes_per_request": "bytes",
    "max_video_bytes": "bytes",
    "queue_timeout": "s",
    "max_grammar_ms_per_token": "ms",
    "video_decode_timeout": "s",
    "media_fetch_timeout": "s",
    "shutdown_timeout": "s",
    "client_timeout": "s",
    "webhook_timeout": "s",
    "kv_cache_memory": "GiB",
    "image_decode_memory": "GiB",
    "encoder_cache_memory": "GiB",
    "job_retention_hours": "hours",
    "max_file_storage_bytes": "bytes",
    "job_lease": "s",
    "video_max_fps": "frames/s",
    "caption_tokens": "tokens",
    "default_max_tokens": "tokens",
    "max_num_batched_tokens": "tokens",
    "block_size": "tokens",
}
# Defaults that mean something other than their value.
DEFAULT_TEXT = {
    "served_model_name": "the --model value",
    "root_path": "none (served at the host's root)",
    "max_model_len": "0 = the model's context length",
    "default_max_tokens": "0 = the rest of the context",
    "override_generation_config": "none",
    "kv_cache_memory": "0 = measured (CUDA) or up to 4 GiB (CPU)",
    "webhook_secret": "generated once, kept in the job store (a copy in DATA_DIR/webhook_secret)",
    "job_store": "sqlite:///DATA_DIR/jobs.sqlite3",
    "allowed_media_domains": "any host whose addresses are all public",
    "api_keys": "none: no auth",
    "allowed_origins": "none: browsers refuse cross-origin calls",
    "allowed_hosts": "none: localhost, this machine's name and IP addresses",
}

HELP = {
    "model": "Checkpoint to serve: a directory (a value starting with /, ./, ../ or ~ is always "
    "a path), a name under --models-dir, a Hugging Face hub id (found in --models-dir, then "
    "the HF cache; downloaded only when online) or 'tiny' / 'tiny-qwen2.5-vl' / 'tiny-qwen3-vl' / "
    "'tiny-qwen3-vl-thinking' / 'tiny-qwen3-vl-moe' (a random-weight test model built offline "
    "under --models-dir, as tiny-qwen2-vl, ...; a checkpoint there by the name given wins).",
    "served_model_name": "Name clients send as `model` (repeatable, or several after one flag "
    "as vLLM takes them); other names get a 404.",
    "host": "Address to listen on (0.0.0.0: every interface).",
    "port": "TCP port to listen on; checked before the model loads.",
    "api_keys": "Bearer key clients must send (repeatable; env VLM_API_KEY or VLM_API_KEYS, "
    "comma-separated). /health, /ping, /version, /metrics (unless --metrics-require-api-key), "
    "the docs and the playground stay open. What a key stores (files, batches, jobs, "
    "responses, conversations) only its project sees: each key is its own project, or give "
    "`KEY PROJECT` to share one project's objects between keys.",
    "api_key_file": "File of API keys, one per line (`KEY` or `KEY PROJECT`; # comments), "
    "added to --api-key.",
    "metrics_require_api_key": "Make /metrics need an API key too (open by default).",
    "metrics_project": "Only the API keys of this project (named in the key file: `KEY "
    "PROJECT`) may read /metrics, which counts every project's tokens; others get 403.",
    "allowed_origins": "Web origins a browser may call the API from (CORS; repeatable or "
    "comma-separated, * for any): for a web app on another origin. Off by default, so a page "
    "you visit cannot drive a server on your machine.",
    "allowed_hosts": "Host names a server with no API key on a loopback address also answers "
    "(repeatable or comma-separated; say, the name a proxy on this machine passes on). Without "
    "keys there it answers only requests addressed to localhost, this machine's name or an IP "
    "address, as Ollama does: a web page that rebinds its own name to 127.0.0.1 cannot drive it.",
    "max_request_body_bytes": "Largest request body; larger ones get a 413 before they are read.",
    "quantization": "Load the weights with bitsandbytes (CUDA only): bnb-4bit (NF4) or bnb-8bit.",
    "quantize_vision": "Also quantise the vision tower (kept in full precision otherwise).",
    "dtype": "Weight and compute dtype; auto: bfloat16 on CUDA (float16 without bf16), "
    "float32 on a CPU.",
    "device": "auto (CUDA when present), cpu, cuda or cuda:N.",
    "attn_implementation": "Vision tower attention; auto: flash_attention_2 when installed on "
    "CUDA, else sdpa (the text model attends over the paged KV cache: --attention-backend).",
    "models_dir": "The local model store, searched for --model names.",
    "data_dir": "Server state: async jobs (jobs.sqlite3), pending webhooks, the webhook secret, "
    "spooled videos; keep it across restarts.",
    "default_max_tokens": "max_tokens for chat and Responses requests that give none; 0: the rest "
    "of the context, as vLLM and OpenAI (a text completion's default stays 16, as theirs).",
    "max_n": "Most choices (`n`) one chat or text completion may ask for; each is a sequence of "
    "its own, sharing the prompt's KV blocks.",
    "max_model_len": "Longest sequence, prompt plus answer, in tokens. More than the KV cache "
    "holds does not start (the error says what fits); more than the model's context serves the "
    "model's (its positions go no further), with a warning; left at 0, the model's context is "
    "capped at what the cache holds, with a warning. vLLM's forms too: 32k (32,000), 32K "
    "(32,768), auto and -1 (0).",
    "max_num_seqs": "Requests running (decoded together) at once; at least 1.",
    "max_num_batched_tokens": "Tokens computed in one engine step: every running decode, then "
    "prompt chunks (a longer prompt is prefilled in chunks of this size). 16k and 16K as "
    "vLLM reads them.",
    "kv_cache_memory": "KV cache size in GiB, instead of measuring what "
    "--gpu-memory-utilization leaves.",
    "gpu_memory_utilization": "Share of the GPU's memory (0..1] this server may use: the KV cache "
    "gets what the weights, the measured worst-case step and --encoder-cache-memory leave.",
    "block_size": "Tokens per KV cache block; prefix-cache hits are whole blocks.",
    "enable_prefix_caching": "Reuse the KV blocks of identical prompt prefixes, images and "
    "videos included.",
    "cache_per_project": "Share the prefix, vision-encoder and grammar caches only within an "
    "API key's project, as if each project sent its own cache_salt: another project's request "
    "can no longer tell from cached_tokens or a fast answer that a prompt or image was sent "
    "before; a system prompt all keys share is then computed once per project.",
    "encoder_cache_memory": "Vision-tower outputs kept for images and videos asked about again, "
    "in GiB; 0 turns it off. On a GPU it is part of --gpu-memory-utilization's share (the "
    "measured KV cache gets that much less; --kv-cache-memory is taken as given).",
    "attention_backend": "Decode attention over the paged KV cache: reference (gather + sdpa, "
    "exact everywhere) or triton (reads blocks in place; CUDA, bf16/fp16, --block-size 16, 32, "
    "64 or 128; verify it with scripts/gpu_check.sh first).",
    "enforce_eager": "Decode without CUDA graphs (--no-enforce-eager captures them; turn that "
    "on once scripts/gpu_check.sh has passed with it on your GPU).",
    "async_scheduling": "Queue each step before the previous step's tokens reach the host, so "
    "the host's work overlaps the GPU's (turn it on once scripts/gpu_check.sh has passed with "
    "it on your GPU).",
    "fused_decoder": "Decode steps of generated tokens through the server's fused text decoder "
    "(HF's layers from the same weights in about half the GPU kernels; equal to HF's forward "
    "on the CPU); --no-fused-decoder runs every step through HF's text model.",
    "compile_decoder": "Compile the fused decoder's layers with torch.compile at start-up "
    "(about half the GPU kernels per decode step again; meant with --no-enforce-eager, whose "
    "graphs skip the compiled code's per-call checks; start-up takes longer, and bf16 logits "
    "can differ from HF's in the last bits; if compiling fails, the decoder runs uncompiled and "
    "the log says why). Off until scripts/gpu_check.sh has passed with it on your GPU.",
    "generation_config": "Defaults for the sampling fields a chat or text completion request "
    "leaves out: `openai` (temperature 1, top_p 1, no top_k/min_p/repetition penalty, as the "
    "hosted API; vLLM's `vllm` is the same), `auto` (the checkpoint's generation_config.json "
    "values, as vLLM does by default; Qwen's instruct checkpoints ask for near-greedy decoding), "
    "or a folder holding a generation_config.json; the values taken are logged at start. "
    "/v2/media keeps its own defaults.",
    "override_generation_config": "vLLM's: sampling defaults set over --generation-config's, as "
    'JSON: \'{"temperature": 0.7, "top_p": 0.8}\' (temperature, top_p, top_k, min_p, '
    "repetition_penalty).",
    "max_queued_requests": "Requests waiting for a batch slot; beyond it: 503 with Retry-After "
    "(under --scheduling-policy fair, only for projects holding their share of it).",
    "queue_timeout": "A request still waiting for a slot after this (in the engine's queue, or "
    "to download or decode its media) gets a 503 with Retry-After.",
    "max_grammar_ms_per_token": "CPU a request's structured-output constraint may take per "
    "token (masking and advancing its grammar, on the engine's thread, which every request "
    "waits on); one over it on 5 of its last 8 tokens fails with a 400 (an ambiguous EBNF "
    "grammar gets slower at every token). 0: no limit.",
    "scheduling_policy": "Order of the request queue: `fcfs` (vLLM's; first come, first "
    "served; a request's non-zero `priority` is a 400), `priority` (vLLM's; lower `priority` "
    "values first, ties first come; a request that outranks running ones and finds no room "
    "preempts the lowest-ranked, which are recomputed later) or `fair` (the batch shared "
    "between API keys' projects: the next admitted is the first request of the project with "
    "the fewest running, so one key's hundreds of queued requests do not hold another's back; "
    "one finding the batch full takes the place of the newest of a project running at least "
    "two more than its own; a project holding less than its share of a full queue, "
    "--max-queued-requests over the projects queued, is still let in; first come, first "
    "served within a project).",
    "job_priority": "The `priority` of async jobs that name none, under --scheduling-policy "
    "priority (requests default to 0: by default interactive requests go before jobs, and may "
    "preempt them).",
    "max_image_bytes": "Largest image, enforced while downloading and before base64 decoding.",
    "max_images_per_request": (
        "Images in one request, all messages together (evaluation harnesses send a video as "
        "up to 64 frames)."
    ),
    "auto_image_tokens": "The most visual tokens an image becomes when its part's `detail` is "
    "auto or left out (a larger image is scaled down to it; `low`: 256, `high`: the model's "
    "most). 0: the model's most, as `high`, and as vLLM reads every image (what clients "
    "written for vLLM expect, e.g. for documents read at full resolution).",
    "max_media_bytes_per_request": "All media of one request together.",
    "max_video_bytes": "Largest video.",
    "max_videos_per_request": "Videos in one request (they share the context equally).",
    "video_decode_workers": "Video decode worker processes (a crashing decoder costs one "
    "request, never the server).",
    "video_decode_timeout": "Per video; a decoder that overruns is killed and replaced.",
    "video_decode_worker_max_jobs": "Videos a decode worker decodes before it is replaced "
    "by a fresh one (started off the request's path, ~0.15 s of one core), bounding what a "
    "long-lived decoder process grows by. 0: never.",
    "video_max_fps": "Most frames taken per second of video (at most 60 frames in all).",
    "caption_tokens": "Caption length per frame in captions mode; the planner budgets frames "
    "with it.",
    "max_concurrent_preprocessing": "Requests decoding their media and building their "
    "prompts at once (their downloads are done before, outside these slots).",
    "max_concurrent_downloads": "Requests downloading their media (http/https URLs) at once, "
    "before they take a preprocessing slot: a slow media host holds a download slot, not one "
    "that requests with inline media need. Downloads wait in files under the data dir.",
    "image_decode_memory": "Memory the images being decoded may take together, all requests "
    "(reckoned from each image's header: 16 bytes a pixel, 64 MP at most; a large baseline JPEG "
    "at the reduced scale it is decoded at); an image that would "
    "pass it waits until others are done (one larger than it all is decoded alone), so a "
    "few small files of huge pixel counts cannot take the host's memory. A video sent as its "
    "JPEG frames counts as one of its frames.",
    "media_fetch_timeout": "For the whole download of one media URL.",
    "allowed_media_domains": "An allow-list for media and webhook URLs (repeatable or "
    "comma-separated): once set, only these hosts, which may be private (an internal media "
    "store); every other host, public ones included, is refused. An entry with a port "
    "(media.internal:8080, [fd00::5]:8080) allows that port of the host only.",
    "allowed_local_media_path": "Serve file:// media URLs from below this directory (off when "
    "not set).",
    "media_follow_redirects": "Follow media URL redirects, each hop checked again.",
    "forwarded_allow_ips": "Proxies (addresses or networks, repeatable or comma-separated; *: "
    "any) whose X-Forwarded-For and X-Forwarded-Proto are believed: the access log's client is "
    "then the address the proxy saw (by default a proxy on this host).",
    "root_path": "The path prefix a reverse proxy serves the API under (/vlm: clients call "
    "https://host/vlm/v1/...), whether the proxy strips it or passes it on: job status URLs, "
    "the playground and /docs name it (vLLM's --root-path).",
    "shutdown_timeout": "On SIGTERM or Ctrl-C: new requests get a 503, and in-flight ones and "
    "webhook attempts this long to finish (running jobs go back to the queue at once).",
    "client_timeout": "A request's headers must arrive within this long of its first byte (or "
    "of the connection), and its body may pause at most this long; then the connection closes "
    "(nginx's client_header_timeout / client_body_timeout; 0: no limit).",
    "webhook_secret": "whsec_<base64> key that signs webhooks (Standard Webhooks v1).",
    "webhook_secret_per_project": "Sign each API key project's webhooks with its own secret, "
    "derived from --webhook-secret and the project's name (`vlm-server webhook-secret "
    "--project NAME` prints it): a tenant's job whose webhook_url names another tenant's "
    "receiver then fails that receiver's signature check. Jobs made without API keys keep the "
    "shared secret.",
    "webhook_retry_delays": "Seconds before each webhook retry, comma-separated (jittered; "
    "Retry-After honoured, up to an hour); a delivery fails after the last one (empty: after "
    "its first attempt).",
    "webhook_timeout": "The longest one webhook delivery attempt may take, all of it (connecting, "
    "sending, the receiver's status line and headers; its body is not read).",
    "job_retention_hours": "Finished async jobs are deleted this long after they end (0: keep "
    "them forever).",
    "max_file_storage_bytes": "An upload (/v1/files) that would take what one project's files "
    "hold in all (its uploads and its batches' output files) past this is a 400 "
    "storage_limit_exceeded until files are deleted; a batch's output is never refused (0: no "
    "bound). Without API keys, every file counts together.",
    "job_store": "Where async jobs, pending webhooks and the webhook secret live: "
    "sqlite:///relative/path or sqlite:////absolute/path (one machine; the start-up line shows "
    "the file) or postgresql://USER@HOST/DB, shared by several replicas (docs/DEPLOYMENT.md).",
    "job_lease": "How long a replica holds a job without renewing it (it renews every third of "
    "this; at least 2 s); a replica that dies has its jobs taken over by another after this long.",
    "job_max_attempts": "A job whose server stops while running it (killed, crashed, cut off "
    "from the job store: its lease runs out) this many times fails (job_interrupted) rather "
    "than runs again: one that takes its server down would take every replica down in turn. "
    "Orderly stops (SIGTERM) put jobs back without counting.",
    "store_responses": "Keep the Responses API's answers (unless a request says store: false) "
    "in the job store, for previous_response_id and GET /v1/responses/{id}, as long as "
    "finished jobs (--job-retention-hours, from a conversation's last turn), images as sent "
    "included; --no-store-responses keeps none.",
    "log_level": "Least severe log level written (debug adds each request's admission to the "
    "running batch, with its wait and prefix-cache hit, preemptions, and fields accepted but "
    "ignored).",
    "log_format": "text for people; json: one object per line (time, level, logger, "
    "request_id, message).",
    "playground": "Serve the browser playground at / (--no-playground turns it off).",
}


def flag_name(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def env_names(name: str) -> tuple[str, ...]:
    return (ENV_PREFIX + name.upper(), *ENV_ALIASES.get(name, ()))


def field_for_flag(name: str) -> str:
    """The Settings field behind a pydantic error location (a field or one of its env names)."""
    for field in Settings.model_fields:
        if name == field or name.upper() in env_names(field):
            return field
    return name


def default_text(name: str, field: FieldInfo) -> str:
    if name in DEFAULT_TEXT:
        return DEFAULT_TEXT[name]
    return _with_unit(field.default, UNITS.get(name))


def _with_unit(value: Any, unit: str | None) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if unit == "bytes":
        return f"{value / GIB:g} GiB" if value % GIB == 0 else f"{value / MIB:g} MiB"
    if unit is not None:
        return f"{value:g} {unit}"
    return str(value)


def help_text(name: str, field: FieldInfo) -> str:
    sentence = HELP.get(name, field.description or "")
    return f"{sentence} Default: {default_text(name, field)}."


def markdown_table() -> str:
    """The README's flag table."""
    rows = ["| flag | env | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        env = ", ".join(f"`{e}`" for e in env_names(name))
        sentence = HELP.get(name, field.description or "").replace("|", "\\|")
        rows.append(f"| `{flag_name(name)}` | {env} | {default_text(name, field)} | {sentence} |")
    return "\n".join(rows)
