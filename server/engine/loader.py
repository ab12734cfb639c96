"""Find a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint and put it on the configured device.

`--model` may be a local directory, the name of a folder under `--models-dir`, a Hugging Face hub
id (looked up in models/, then the HF cache, downloaded only when online), or one of
TINY_MODELS (`tiny`, `tiny-qwen2.5-vl`, ...) for a random-weight checkpoint built offline on
first use.
Only safetensors are read and remote code is never trusted.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from server.config import EngineConfig
from server.exceptions import ModelLoadError

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = {
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen3_vl": "qwen3-vl",
    "qwen3_vl_moe": "qwen3-vl-moe",
}
TINY_MODELS = {
    "tiny": "qwen2-vl",
    "tiny-qwen2-vl": "qwen2-vl",
    "tiny-qwen2.5-vl": "qwen2.5-vl",
    "tiny-qwen3-vl": "qwen3-vl",
    "tiny-qwen3-vl-thinking": "qwen3-vl-thinking",
    "tiny-qwen3-vl-moe": "qwen3-vl-moe",
}
# transformers' own "no bound" (tokenization_utils_base.VERY_LARGE_INTEGER)
VERY_LARGE_INTEGER = int(1e30)
# What a checkpoint needs from the hub: configs, tokenizer, template, safetensors weights.
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Keep the vision tower and output head in full precision under bitsandbytes: both are small
# and quantising them costs accuracy far more than it saves memory.
BNB_SKIP_MODULES = ["visual", "lm_head"]


@dataclass
class LoadedModel:
    """A model ready for inference, with the facts the engine needs about it."""

    model: Any
    processor: Any
    path: Path
    family: str
    device: torch.device
    dtype: torch.dtype
    context_length: int
    eos_token_ids: tuple[int, ...]
    image_token_id: int
    video_token_id: int

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def experts_sync_free(self) -> bool:
        """Whether the experts of a mixture of experts run without a host sync, as a CUDA graph
        needs: torch's grouped_mm (transformers' experts) is one kernel a projection on a CPU
        and, in bfloat16, on Hopper and Blackwell datacenter GPUs (compute capability 9.x,
        10.x); on other GPUs it loops over the experts, reading their row counts back twice a
        layer. True for a dense model."""
        if not getattr(self.model.config.text_config, "num_experts", 0):
            return True
        if self.device.type != "cuda":
            return True
        return torch.cuda.get_device_capability(self.device)[0] in (9, 10)


def resolve_model_path(name: str, models_dir: Path) -> Path:
    """Map --model to a checkpoint directory, building the tiny one if asked for. A checkpoint
    already there by that name wins (`make-tiny-model models/tiny` then `--model tiny` serves
    the one the operator built, not a second one)."""
    places = [Path(name).expanduser(), models_dir / name]
    if name in TINY_MODELS:  # (looked for under --models-dir alone: a ./tiny here is not it)
        places = [models_dir / name]
    for candidate in places:
        if (candidate / "config.json").is_file():
            return _rebuilt_if_stale(candidate) if name in TINY_MODELS else candidate
    if name in TINY_MODELS:
        from server.engine.tiny import TinySpec, make_tiny_checkpoint

        path = models_dir / f"tiny-{TINY_MODELS[name]}"
        if (path / "config.json").is_file():
            return _rebuilt_if_stale(path)
        logger.info("building tiny %s checkpoint under %s", TINY_MODELS[name], path)
        try:
            make_tiny_checkpoint(path, TinySpec(family=TINY_MODELS[name]))  # type: ignore[arg-type]
        except OSError as exc:  # (a read-only or full --models-dir)
            reason = (exc.strerror or type(exc).__name__).lower()
            raise ModelLoadError(
                f"--model {name}: cannot build the tiny checkpoint under --models-dir "
                f"'{models_dir}' ({reason}); point --models-dir at a writable directory"
            ) from None
        except ValueError as exc:  # (a directory of that name holds other files)
            raise ModelLoadError(f"--model {name}: {exc}") from None
        return path
    return _from_hub(name, models_dir)


def _rebuilt_if_stale(path: Path) -> Path:
    """A tiny checkpoint an older builder wrote, built again from its own spec (one that
    cannot be is served as it is)."""
    from server.engine.tiny import make_tiny_checkpoint, stale_spec

    if (spec := stale_spec(path)) is not None:
        logger.info("rebuilding the tiny checkpoint at %s (an older builder wrote it)", path)
        try:
            make_tiny_checkpoint(path, spec)
        except (ValueError, OSError) as exc:
            logger.warning("could not rebuild %s, serving it as it is: %s", path, exc)
    return path


def _from_hub(repo_id: str, models_dir: Path) -> Path:
    from huggingface_hub import constants, snapshot_download

    how_to_get = (
        f"On a machine with internet access run `hf download {repo_id} --local-dir "
        f"{models_dir / repo_id}`, copy that folder here, and start again with "
        f"--model {repo_id} (or --model {models_dir / repo_id})."
    )
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS, local_files_only=True)
        )
    except Exception:
        logger.debug("%s not in the Hugging Face cache", repo_id, exc_info=True)
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"Model '{repo_id}' was not found: it is not a directory, not under {models_dir}/ and "
            f"not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it. "
            + how_to_get
        )
    try:
        logger.info("downloading %s from the Hugging Face hub", repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS))
    except Exception as exc:
        raise ModelLoadError(
            f"Model '{repo_id}' was not found locally and could not be downloaded "
            f"({type(exc).__name__}). " + how_to_get
        ) from None


def resolve_device(requested: str) -> torch.device:
    """The device to load on; a CUDA device always carries its index ("cuda" -> "cuda:0"):
    `torch.cuda.set_device` and per-thread binding refuse an index-less device."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {requested} was asked for but no CUDA device is visible")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_attention(
    requested: str, device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> str | dict[str, str]:
    """The vision tower's attention (the text model's is replaced by the runner's paged
    attention, attention.py): sdpa, or flash-attention-2 where long patch sequences make it
    pay."""
    vision = requested
    if requested == "auto":
        has_flash = importlib.util.find_spec("flash_attn") is not None
        half = dtype in (torch.bfloat16, torch.float16)  # flash-attention has no fp32 kernels
        vision = "flash_attention_2" if device.type == "cuda" and has_flash and half else "sdpa"
    if vision == "sdpa":
        return "sdpa"
    if vision == "flash_attention_2":  # asked for: refused before any weight loads
        if importlib.util.find_spec("flash_attn") is None:
            raise ModelLoadError(
                "--attn-implementation flash_attention_2 needs the flash-attn package "
                "(pip install flash-attn, on a CUDA machine); sdpa or auto need nothing"
            )
        if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
            raise ModelLoadError(
                "--attn-implementation flash_attention_2 needs a CUDA device and --dtype "
                "bfloat16 or float16"
            )
    return {"": "sdpa", "text_config": "sdpa", "vision_config": vision}


def check_attention_backend(
    backend: str, device: torch.device, dtype: torch.dtype, block_size: int
) -> None:
    """Refuse what the Triton decode kernel cannot serve before any weight is loaded."""
    if backend != "triton":
        return
    # Tests run the kernel on the CPU through Triton's interpreter.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        raise ModelLoadError("--attention-backend triton needs a CUDA device")
    if device.type == "cuda" and dtype not in (torch.bfloat16, torch.float16):
        raise ModelLoadError("--attention-backend triton needs --dtype bfloat16 or float16")
    if block_size not in (16, 32, 64, 128):  # a power of two (tl.arange), in shared memory
        raise ModelLoadError("--attention-backend triton needs --block-size 16, 32, 64 or 128")


def check_experts_dtype(family: str, device: torch.device, dtype: torch.dtype) -> None:
    """On CUDA, torch's grouped_mm (the experts' products) is one kernel without a host sync
    in bfloat16 only: refuse another dtype before any weight is loaded."""
    if family == "qwen3-vl-moe" and device.type == "cuda" and dtype != torch.bfloat16:
        dtype_name = str(dtype).removeprefix("torch.")
        raise ModelLoadError(
            f"a mixture-of-experts checkpoint runs on CUDA in bfloat16 only (--dtype auto or "
            f"bfloat16, not {dtype_name}): its experts' grouped matrix products need it"
        )


def quantization_config(
    cfg: EngineConfig, device: torch.device, dtype: torch.dtype, family: str = ""
) -> Any:
    if cfg.quantization == "none":
        return None
    if family == "qwen3-vl-moe":
        # bitsandbytes replaces nn.Linear layers; experts are 3-D tensors it leaves as they are.
        raise ModelLoadError(
            f"--quantization {cfg.quantization} cannot shrink a mixture-of-experts checkpoint: "
            "bitsandbytes quantizes linear layers only, and the experts (about 93% of the "
            "weights) would stay in full precision; load it without --quantization"
        )
    # bitsandbytes has a CPU backend that would "work" very slowly; refuse rather than surprise.
    if device.type != "cuda":
        raise ModelLoadError(
            f"--quantization {cfg.quantization} needs a CUDA device (--device cuda)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("--quantization needs bitsandbytes: pip install 'vlm-server[gpu]'")
    from transformers import BitsAndBytesConfig

    skip = [] if cfg.quantize_vision else BNB_SKIP_MODULES
    if cfg.quantization == "bnb-4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _check_checkpoint(path: Path) -> str:
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as exc:  # (JSON, or not UTF-8)
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'} is not a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{path} is a '{model_type}' checkpoint; this server runs "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no .safetensors weights (other formats are not loaded)")
    return SUPPORTED_MODEL_TYPES[model_type]


def _one_line(exc: BaseException, limit: int = 600) -> str:
    """An exception as a start-up error line: its kind where the text alone would not say
    (a ZeroDivisionError's "division by zero"), on one line, cut to `limit` characters (a
    size mismatch lists every weight)."""
    text = " ".join(str(exc).split())
    if "ignore_mismatched_sizes" in text:  # (transformers' own words point at its log)
        return "the weights' shapes do not match config.json (is it another checkpoint's?)"
    if not isinstance(exc, OSError | ValueError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text_model(path: Path, text_config: Any) -> None:
    """A config the engine cannot serve (a hand-edited one, say) is one line at start-up, not
    a traceback from deep inside the engine."""
    for field in ("num_hidden_layers", "max_position_embeddings"):
        value = getattr(text_config, field, None)
        if not isinstance(value, int) or value < 1:
            raise ModelLoadError(
                f"{path / 'config.json'}: the text model's {field} is {value!r}; "
                "it must be a whole number of at least 1"
            )


def load_model(cfg: EngineConfig) -> LoadedModel:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    started = time.perf_counter()
    path = resolve_model_path(cfg.model, cfg.models_dir)
    family = _check_checkpoint(path)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    attention = resolve_attention(cfg.attn_implementation, device, dtype)
    check_experts_dtype(family, device, dtype)
    quant = quantization_config(cfg, device, dtype, family)
    check_attention_backend(cfg.attention_backend, device, dtype, cfg.block_size)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=attention,
            device_map={"": str(device)},
            quantization_config=quant,
            use_safetensors=True,
            trust_remote_code=False,
        )
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
    except SafetensorError as exc:  # a weights file cut short (an interrupted download)
        raise ModelLoadError(
            f"could not load the checkpoint in {path}: a .safetensors file is damaged or "
            f"incomplete ({exc}); download it again"
        ) from exc
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"the weights of {path} do not fit in {device}'s free memory: free the GPU, or "
            "serve a smaller checkpoint or one quantised (--quantization bnb-8bit / bnb-4bit)"
        ) from exc
    except Exception as exc:  # a config.json edited by hand, weights of another size, ...
        raise ModelLoadError(f"could not load the checkpoint in {path}: {_one_line(exc)}") from exc
    _check_text_model(path, model.config.text_config)
    model.eval()
    # The engine bounds every prompt by its context (a 400 that names it); the tokenizer's own
    # bound only logged a warning ("Token indices sequence length is longer than the specified
    # maximum") for a prompt refused anyway.
    processor.tokenizer.model_max_length = VERY_LARGE_INTEGER
    loaded = LoadedModel(
        model=model,
        processor=processor,
        path=path,
        family=family,
        device=device,
        dtype=dtype,
        context_length=model.config.text_config.max_position_embeddings,
        eos_token_ids=_eos_token_ids(model, processor),
        image_token_id=model.config.image_token_id,
        video_token_id=model.config.video_token_id,
    )
    _log_loaded(loaded, attention, cfg.quantization, time.perf_counter() - started)
    if not loaded.experts_sync_free:
        logger.warning(
            "on this GPU (compute capability %d.%d) torch's grouped_mm loops over the experts "
            "and reads their row counts back: two host syncs a layer in every step, and decode "
            "steps without CUDA graphs (Hopper and Blackwell datacenter GPUs have neither)",
            *torch.cuda.get_device_capability(device),
        )
    return loaded


def _eos_token_ids(model: Any, processor: Any) -> tuple[int, ...]:
    """The tokenizer's end-of-text token first, then generation_config's others (vLLM ends
    on both: Qwen2-VL's <|im_end|>, and <|endoftext|> from generation_config)."""
    primary = processor.tokenizer.eos_token_id
    extra = model.generation_config.eos_token_id
    extra = list(extra) if isinstance(extra, list | tuple) else [] if extra is None else [extra]
    ids = ([primary] if primary is not None else []) + extra
    return tuple(dict.fromkeys(int(i) for i in ids))


def _log_loaded(loaded: LoadedModel, attention: object, quantization: str, seconds: float) -> None:
    footprint_mb = loaded.model.get_memory_footprint() / 2**20
    extra = ""
    if loaded.device.type == "cuda":
        extra = f", cuda allocated {torch.cuda.max_memory_allocated(loaded.device) / 2**30:.2f} GiB"
    logger.info(
        "loaded %s (%s) on %s as %s, attention=%s, quantization=%s in %.1fs: weights %.1f MiB%s",
        loaded.path,
        loaded.family,
        loaded.device,
        str(loaded.dtype).removeprefix("torch."),
        attention,
        quantization,
        seconds,
        footprint_mb,
        extra,
    )
