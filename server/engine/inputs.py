"""Chat messages + decoded images / video frames -> the tensors the model takes (the
checkpoint's own chat template and processor, so prompts match training)."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class MediaItem:
    """One image or video of a prompt: where its tokens are and what it is.

    `key` is a content hash of the processed pixels and everything that shapes the item's
    embeddings and rope positions (grid, seconds per temporal patch): it keys the encoder
    cache and enters the prefix-cache hash of every KV block that holds the item's tokens, so
    identical placeholder runs of different images never match."""

    kind: str  # "image" | "video"
    index: int  # among the prompt's items of this kind (its row in *_grid_thw)
    start: int  # first placeholder token in the prompt
    num_tokens: int
    patch_start: int  # first row of this item in pixel_values / pixel_values_videos
    num_patches: int
    key: str

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class ModelInputs:
    """One prompt, ready for the model; tensors stay on the CPU until the runner moves them."""

    tensors: dict[str, torch.Tensor]
    num_prompt_tokens: int
    num_image_tokens: int
    num_video_tokens: int = 0
    media: tuple[MediaItem, ...] = ()

    @functools.cached_property
    def token_ids(self) -> list[int]:
        ids = self.tensors.get("input_ids")
        return ids[0].tolist() if ids is not None else [0] * self.num_prompt_tokens


def find_media(
    tensors: dict[str, torch.Tensor], token_ids: dict[str, int]
) -> tuple[MediaItem, ...]:
    """The prompt's media items in prompt order; token_ids maps kind -> placeholder token id."""
    ids = tensors["input_ids"][0]
    items: list[MediaItem] = []
    for kind, pixels_name in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        grids = tensors.get(f"{kind}_grid_thw")
        if grids is None:
            continue
        positions = (ids == token_ids[kind]).nonzero().view(-1).tolist()
        patch_counts = grids.prod(-1).tolist()
        merge = len(positions) and sum(patch_counts) // len(positions)  # patches per token
        pixels = tensors[pixels_name]
        cursor = patch_start = 0
        for index, num_patches in enumerate(patch_counts):
            num_tokens = num_patches // merge
            digest = hashlib.blake2b(digest_size=16)
            digest.update(kind.encode() + str(grids[index].tolist()).encode())
            if kind == "video" and "second_per_grid_ts" in tensors:
                digest.update(str(float(tensors["second_per_grid_ts"][index])).encode())
            patch = pixels[patch_start : patch_start + num_patches].contiguous()
            digest.update(patch.numpy().tobytes())
            items.append(
                MediaItem(
                    kind,
                    index,
                    positions[cursor],
                    num_tokens,
                    patch_start,
                    num_patches,
                    digest.hexdigest(),
                )
            )
            cursor += num_tokens
            patch_start += num_patches
    return tuple(sorted(items, key=lambda item: item.start))


@dataclass(frozen=True)
class VideoFrames:
    """Frames already chosen and resized by the frame planner."""

    frames: np.ndarray  # [num_frames, height, width, 3] uint8
    timestamps: tuple[float, ...]
    duration_s: float


class InputBuilder:
    def __init__(self, processor: Any, image_token_id: int, video_token_id: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id

    def prompt(self, messages: list[dict[str, Any]]) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def count_text_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of the templated prompt with every image and video left out."""
        text_only = [
            {**m, "content": [p for p in m["content"] if p.get("type") == "text"]}
            if isinstance(m["content"], list)
            else m
            for m in messages
        ]
        return len(self.tokenizer(self.prompt(text_only))["input_ids"])

    def build(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        videos: list[VideoFrames] | None = None,
    ) -> ModelInputs:
        """messages use the HF chat format: content is a string or a list of
        {"type": "text" | "image" | "video"} parts, in the order of images and videos."""
        kwargs: dict[str, Any] = {}
        if videos:
            from transformers.video_utils import VideoMetadata

            kwargs["videos"] = [v.frames for v in videos]
            kwargs["video_metadata"] = [
                VideoMetadata(
                    total_num_frames=len(v.frames),
                    fps=len(v.frames) / max(v.duration_s, 1e-6),  # the rate frames were taken at
                    width=v.frames.shape[2],
                    height=v.frames.shape[1],
                    duration=v.duration_s,
                    frames_indices=list(range(len(v.frames))),
                )
                for v in videos
            ]
            # The planner sized the frames already; keep them as they are.
            kwargs["cap_pixels_per_frame"] = False
        encoded = self.processor(
            text=[self.prompt(messages)], images=images or None, return_tensors="pt", **kwargs
        )
        tensors = {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}
        if "second_per_grid_ts" in encoded and "second_per_grid_ts" not in tensors:
            tensors["second_per_grid_ts"] = torch.tensor(encoded["second_per_grid_ts"])
        input_ids = tensors["input_ids"]
        placeholders = {"image": self.image_token_id, "video": self.video_token_id}
        return ModelInputs(
            tensors=tensors,
            num_prompt_tokens=int(input_ids.shape[1]),
            num_image_tokens=int((input_ids == self.image_token_id).sum()),
            num_video_tokens=int((input_ids == self.video_token_id).sum()),
            media=find_media(tensors, placeholders),
        )
