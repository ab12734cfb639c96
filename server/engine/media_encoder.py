"""MediaEncoder: the vision tower's outputs for the prompts being prefilled.

Images and videos go through the vision tower once, when the first chunk that holds their tokens
is prefilled (or not at all: the encoder cache has them), one call per kind for every item the
step needs; their embeddings are held until the prompt's last media token is prefilled. Each
item's embeddings are [1 + DeepStack layers, tokens, hidden]: Qwen3-VL's vision features of
several ViT layers travel with them, to be added at the same tokens of its first text layers.
"""

from __future__ import annotations

from typing import Any

import torch

from server.engine.encoder_cache import EncoderCache
from server.engine.inputs import PIXELS, MediaItem
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.engine.transfer import to_device

# A prompt chunk's media tokens: (row in the step, sequence, item, the item's tokens).
Span = tuple[int, Sequence, MediaItem, slice]


class MediaEncoder:
    def __init__(self, model: Any, device: torch.device, cache_bytes: int):
        self.model = model
        self.device = device
        self.cache = EncoderCache(cache_bytes)
        # Vision-tower outputs of prompts still being prefilled: request id -> item -> embeds.
        self.held: dict[str, dict[MediaItem, torch.Tensor]] = {}
        vision = model.config.vision_config
        self.has_deepstack = bool(getattr(vision, "deepstack_visual_indexes", None))

    def release(self, request_id: str) -> None:
        self.held.pop(request_id, None)

    def pieces(self, spans: list[Span]) -> list[tuple[int, torch.Tensor]]:
        """(row, embeddings) of the step's media tokens (after encode)."""
        return [(row, self.held[seq.request_id][item][:, part]) for row, seq, item, part in spans]

    def mask(self, spans: list[Span], num_tokens: int) -> torch.Tensor | None:
        """[1, step tokens] on the device: the media tokens' rows (for DeepStack)."""
        if not spans or not self.has_deepstack:
            return None
        mask = torch.zeros(num_tokens, dtype=torch.bool)
        for row, _, _, part in spans:
            mask[row : row + part.stop - part.start] = True
        return to_device(mask[None], self.device)

    def deepstack_inputs(
        self, pieces: list[tuple[int, torch.Tensor]], mask: torch.Tensor | None
    ) -> dict[str, Any]:
        """Qwen3-VL's DeepStack: vision features of several ViT layers, added to the first text
        layers' outputs at the media tokens of this step (a chunk gets its own tokens')."""
        if mask is None:  # no media, or a family without it
            return {}
        features = torch.cat([media[1:] for _, media in pieces], dim=1)  # rows in order
        return {"visual_pos_masks": mask, "deepstack_visual_embeds": list(features)}

    def encode(self, batch: ScheduledBatch) -> None:
        """Vision-tower outputs for every media item the step's chunks need: from the encoder
        cache, else from one vision-tower call per kind for all of them."""
        missing: dict[str, list[tuple[Sequence, MediaItem]]] = {}
        for seq, num in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num
            held = self.held.setdefault(seq.request_id, {})
            for item in seq.inputs.media:
                if item in held or not item.overlaps(start, end):
                    continue
                key = cache_key(seq, item)
                cached = self.cache.get(key)
                if cached is not None:
                    held[item] = cached
                else:
                    missing.setdefault(key, []).append((seq, item))
        for kind in PIXELS:
            wanted = [(key, users) for key, users in missing.items() if users[0][1].kind == kind]
            if not wanted:
                continue
            embeds = self._vision_tower(kind, [users[0] for _, users in wanted])
            for (key, users), item_embeds in zip(wanted, embeds, strict=True):
                self.cache.put(key, item_embeds)
                for seq, item in users:
                    self.held[seq.request_id][item] = item_embeds

    def _vision_tower(
        self, kind: str, items: list[tuple[Sequence, MediaItem]]
    ) -> list[torch.Tensor]:
        pixels = torch.cat(
            [
                s.inputs.tensors[PIXELS[kind]][m.patch_start : m.patch_start + m.num_patches]
                for s, m in items
            ]
        )
        # A plain copy: pinned memory is cached for good once allocated, and a video's pixels
        # are hundreds of MB (HF's vision tower waits for the device anyway).
        pixels = pixels.to(self.device)
        grids = torch.tensor([m.grid for _, m in items])
        features = (
            self.model.model.get_image_features
            if kind == "image"
            else self.model.model.get_video_features
        )
        output = features(pixels, to_device(grids, self.device), return_dict=True)
        layers = [output.pooler_output, *(getattr(output, "deepstack_features", None) or [])]
        # Per item [1 + DeepStack layers, tokens, hidden], its own memory (a view of one
        # batched output would keep all of it alive, and the encoder cache would count only
        # the view).
        return [torch.stack([layer[i] for layer in layers]) for i in range(len(items))]

    def drop_prefilled(self, batch: ScheduledBatch) -> None:
        for seq, num in zip(batch.seqs, batch.num_new_tokens, strict=True):
            media_end = max((item.end for item in seq.inputs.media), default=0)
            if seq.num_computed_tokens + num >= media_end:
                self.held.pop(seq.request_id, None)


def spans(seq: Sequence, start: int, end: int) -> list[tuple[int, MediaItem, slice]]:
    """(offset in the chunk, item, the item's tokens) of the media among tokens [start, end)."""
    out = []
    for item in seq.inputs.media:
        first, last = max(start, item.start), min(end, item.end)
        if first < last:
            out.append((first - start, item, slice(first - item.start, last - item.start)))
    return out


def cache_key(seq: Sequence, item: MediaItem) -> str:
    """The encoder cache's key of a sequence's item: its content key, under the request's
    cache_salt when it has one (a cached image is found only by requests with the same salt)."""
    salt = seq.sampling.cache_salt
    return item.key if salt is None else f"{salt}\x00{item.key}"
