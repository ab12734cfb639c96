"""How much GPU memory the KV cache may take, measured rather than guessed (vLLM's method).

After the weights are loaded, the worst-case step is run once: the last chunk of
max_num_batched_tokens tokens of a prompt as long as the context (so attention gathers the
longest context there is) through the real runner path (embeddings, paged attention, MLPs,
lm_head), and the vision tower on an image of that many tokens. The KV cache gets

    total GPU memory * --gpu-memory-utilization
      - the peak torch allocated during that step (weights included; the step's own temporary
        KV cache left out, the real one is what is being sized)
      - memory torch does not manage (CUDA context, other processes)
      - --encoder-cache-memory (the vision-tower outputs kept for reuse fill it later, on the
        same card)

`worst_case_step` runs on any device, so CI exercises it on the CPU; only the measurement is
CUDA's.
"""

from __future__ import annotations

import gc
import logging
import math

import torch

from server.config import EngineConfig
from server.engine.block_manager import BlockManager, num_blocks_for
from server.engine.inputs import ModelInputs
from server.engine.kv_cache import kv_cache_shape
from server.engine.loader import LoadedModel
from server.engine.sampling import SamplingParams
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.exceptions import ModelLoadError

logger = logging.getLogger(__name__)

# Without --kv-cache-memory on a CPU: this much RAM for the KV cache.
AUTO_KV_CPU_GIB = 4.0


def worst_case_step(loaded: LoadedModel, config: EngineConfig, max_seq_len: int) -> int:
    """The last chunk (max_num_batched_tokens tokens) of a max_seq_len-token prompt, then the
    vision tower on an image of as many tokens (at most what the processor allows for one
    image). Returns the bytes of the temporary KV cache it used."""
    from server.engine.runner import ModelRunner

    chunk = min(config.max_num_batched_tokens, max_seq_len)
    blocks = BlockManager(num_blocks_for(max_seq_len, config.block_size), config.block_size, False)
    runner = ModelRunner(
        loaded,
        blocks.num_blocks,
        config.block_size,
        encoder_cache_bytes=0,
        fused_decoder=config.fused_decoder,
    )
    ids = torch.zeros((1, max_seq_len), dtype=torch.long)
    seq = Sequence("profile", ModelInputs({"input_ids": ids}, max_seq_len, 0), SamplingParams(), 1)
    blocks.allocate(seq)
    seq.num_computed_tokens = max_seq_len - chunk  # as if the rest were cached already
    batch = ScheduledBatch()
    batch.add(seq, chunk)
    runner.run(batch, [seq])
    blocks.free_blocks(seq)
    cache = runner.kv_cache
    kv_bytes = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    del runner, cache
    _vision_step(loaded, min(chunk, _max_image_tokens(loaded)))
    return kv_bytes


def _vision_step(loaded: LoadedModel, num_tokens: int) -> None:
    visual = loaded.model.model.visual
    merge = loaded.model.config.vision_config.spatial_merge_size
    proj = visual.patch_embed.proj
    patch_dim = proj.in_channels * math.prod(proj.kernel_size)
    side = max(1, math.isqrt(num_tokens)) * merge  # patches per side of a square image
    pixels = torch.zeros((side * side, patch_dim), dtype=loaded.dtype, device=loaded.device)
    grid = torch.tensor([[1, side, side]], device=loaded.device)
    with torch.inference_mode():
        loaded.model.model.get_image_features(pixels, grid, return_dict=True)


def _max_image_tokens(loaded: LoadedModel) -> int:
    processor = loaded.processor.image_processor
    max_pixels = (getattr(processor, "size", None) or {}).get("longest_edge") or getattr(
        processor, "max_pixels", 12_845_056
    )
    pixels_per_token = (processor.patch_size * processor.merge_size) ** 2
    return max(1, int(max_pixels) // pixels_per_token)


def kv_budget_bytes(loaded: LoadedModel, config: EngineConfig, max_seq_len: int) -> float:
    """Bytes the KV cache may take on the loaded model's CUDA device (see the module doc)."""
    device = loaded.device
    # An engine dropped before this one may still hold its KV cache: its runner and decode
    # graphs refer to each other, so only the cycle collector frees them.
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    temporary_kv = worst_case_step(loaded, config, max_seq_len)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - temporary_kv
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    not_torch = total - free - torch.cuda.memory_reserved(device)
    encoder_cache = config.encoder_cache_memory_gib * 2**30
    budget = total * config.gpu_memory_utilization - peak - not_torch - encoder_cache
    logger.info(
        "memory profile: %.2f GiB total x %.2f utilisation - %.2f GiB peak of a %d-token step "
        "(weights included) - %.2f GiB outside torch - %.2f GiB encoder cache = %.2f GiB for "
        "the KV cache",
        total / 2**30,
        config.gpu_memory_utilization,
        peak / 2**30,
        config.max_num_batched_tokens,
        not_torch / 2**30,
        encoder_cache / 2**30,
        budget / 2**30,
    )
    return budget


def kv_cache_blocks(loaded: LoadedModel, config: EngineConfig, max_seq_len: int) -> int:
    """How many KV blocks the budget holds: --kv-cache-memory when given; on CUDA what
    --gpu-memory-utilization leaves after the measured peak of a worst-case step and the
    encoder cache; on a CPU a
    fixed amount of RAM, no more than max_num_seqs full contexts."""
    bytes_per_token = kv_cache_shape(loaded.model).bytes_per_token(loaded.dtype)
    bytes_per_block = bytes_per_token * config.block_size
    if config.kv_cache_memory_gib > 0:
        budget = config.kv_cache_memory_gib * 2**30
    elif loaded.device.type == "cuda":
        budget = kv_budget_bytes(loaded, config, max_seq_len)
    else:
        most_needed = config.max_num_seqs * (max_seq_len + config.block_size) * bytes_per_token
        budget = min(AUTO_KV_CPU_GIB * 2**30, most_needed)
    num_blocks = int(budget // bytes_per_block)
    if num_blocks < 1:
        raise ModelLoadError(
            f"The KV cache budget ({budget / 2**30:.2f} GiB) cannot hold one block of "
            f"{config.block_size} tokens: raise --gpu-memory-utilization or --kv-cache-memory "
            "(or lower --encoder-cache-memory)."
        )
    logger.info(
        "KV cache: %d blocks of %d tokens (%d tokens), %.2f GiB; prefix caching %s",
        num_blocks,
        config.block_size,
        num_blocks * config.block_size,
        num_blocks * bytes_per_block / 2**30,
        "on" if config.enable_prefix_caching else "off",
    )
    return num_blocks
