"""The paged KV cache: per layer, one key and one value buffer of fixed-size blocks.

    keys[layer], values[layer]: [num_blocks * block_size, num_kv_heads, head_dim]

Token p of a sequence lives at slot `block_table[p // block_size] * block_size +
p % block_size`. HF's attention layers only call `cache.update(keys, values, layer_idx)`;
`StepCache` is that object for one forward pass: it writes the step's new keys/values into
their slots and hands the whole layer buffer on to the paged attention (attention.py), which
reads each sequence's blocks through its block table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


def kv_cache_shape(model: Any) -> KVCacheShape:
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return KVCacheShape(text.num_hidden_layers, text.num_key_value_heads, head_dim)


class PagedKVCache:
    def __init__(
        self,
        shape: KVCacheShape,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        size = (num_blocks * block_size, shape.num_kv_heads, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.values = [
            torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)
        ]


class StepCache:
    """What HF's attention layers see during one forward pass (they only call update)."""

    def __init__(self, cache: PagedKVCache, slot_mapping: torch.Tensor):
        self.cache = cache
        self.slot_mapping = slot_mapping  # [num_tokens]: where each new token's keys go

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # keys: [1, num_kv_heads, num_tokens, head_dim] for the whole flattened step
        key_buffer, value_buffer = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        key_buffer[self.slot_mapping] = keys[0].transpose(0, 1)
        value_buffer[self.slot_mapping] = values[0].transpose(0, 1)
        return key_buffer, value_buffer
