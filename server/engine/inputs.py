"""Chat messages + decoded images / video frames -> the tensors the model takes (the
checkpoint's own chat template and processor, so prompts match training)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass
class ModelInputs:
    """One prompt, ready for the model; tensors stay on the CPU until the runner moves them."""

    tensors: dict[str, torch.Tensor]
    num_prompt_tokens: int
    num_image_tokens: int
    num_video_tokens: int = 0


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
        return ModelInputs(
            tensors=tensors,
            num_prompt_tokens=int(input_ids.shape[1]),
            num_image_tokens=int((input_ids == self.image_token_id).sum()),
            num_video_tokens=int((input_ids == self.video_token_id).sum()),
        )
