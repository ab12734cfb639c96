"""EncoderCache: vision-tower outputs by media content key, least recently used first out,
bounded in bytes. The same image or video asked about again (a chat re-sending its image
every turn, several questions on one video) skips the vision tower."""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_bytes = 0
        self.num_hits = 0
        self.num_misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        embeds = self.entries.get(key)
        if embeds is None:
            self.num_misses += 1
            return None
        self.entries.move_to_end(key)
        self.num_hits += 1
        return embeds

    def put(self, key: str, embeds: torch.Tensor) -> None:
        size = embeds.numel() * embeds.element_size()
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = embeds
        self.num_bytes += size
        while self.num_bytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.num_bytes -= evicted.numel() * evicted.element_size()
