"""The KV cache: one preallocated buffer per layer, one slot per running sequence.

    keys[layer], values[layer]: [num_slots, num_kv_heads, max_seq_len, head_dim]

Running sequences always occupy slots 0..n-1 (when one leaves, the last one moves into its
slot), so a decode step attends over the view `[:n, :, :longest]` without gathering or padding
copies. HF's attention layers only call `cache.update(keys, values, layer_idx)`; `StepCache` is
that object for one forward pass: it writes the new keys/values at each sequence's position and
hands back the view to attend over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


class KVCache:
    def __init__(
        self,
        shape: KVCacheShape,
        num_slots: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.shape = shape
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        size = (num_slots, shape.num_kv_heads, max_seq_len, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.values = [
            torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)
        ]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy one sequence's first `length` positions from slot src to slot dst."""
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[dst, :, :length] = layer[src, :, :length]

    def step(self, first_slot: int, positions: torch.Tensor, kv_len: int) -> StepCache:
        """A cache view for one forward over slots first_slot.. (one row per slot).

        positions[b] is where row b's first new token goes; kv_len how many positions the
        attention reads (the longest row's length after this step)."""
        return StepCache(self, first_slot, positions, kv_len)


class StepCache:
    """What HF's attention layers see during one forward pass (they only call update)."""

    def __init__(self, cache: KVCache, first_slot: int, positions: torch.Tensor, kv_len: int):
        self.cache = cache
        self.first_slot = first_slot
        self.positions = positions
        self.kv_len = kv_len

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, num_new, _ = keys.shape
        rows = slice(self.first_slot, self.first_slot + batch)
        key_buffer, value_buffer = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        if num_new == 1:  # decode: one token per row, each at its own position
            slots = torch.arange(self.first_slot, self.first_slot + batch, device=keys.device)
            key_buffer[slots, :, self.positions] = keys[:, :, 0]
            value_buffer[slots, :, self.positions] = values[:, :, 0]
        else:  # prefill: rows are written from the same position (they are padded alike)
            start = int(self.positions[0])
            key_buffer[rows, :, start : start + num_new] = keys
            value_buffer[rows, :, start : start + num_new] = values
        return key_buffer[rows, :, : self.kv_len], value_buffer[rows, :, : self.kv_len]
