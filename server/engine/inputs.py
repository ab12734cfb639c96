"""Chat messages + decoded images -> the tensors the model takes (chat template + processor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image


@dataclass
class ModelInputs:
    """One prompt, ready for the model; tensors stay on the CPU until the runner moves them."""

    tensors: dict[str, torch.Tensor]
    num_prompt_tokens: int
    num_image_tokens: int

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.tensors["input_ids"][0].tolist()


class InputBuilder:
    """Applies the checkpoint's own chat template and processor, so prompts match training."""

    def __init__(self, processor: Any, image_token_id: int):
        self.processor = processor
        self.image_token_id = image_token_id

    def build(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> ModelInputs:
        """messages use the HF chat format: content is a string or [{"type": "image"|"text"}]."""
        prompt = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        encoded = self.processor(text=[prompt], images=images or None, return_tensors="pt")
        tensors = {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}
        input_ids = tensors["input_ids"]
        return ModelInputs(
            tensors=tensors,
            num_prompt_tokens=int(input_ids.shape[1]),
            num_image_tokens=int((input_ids == self.image_token_id).sum()),
        )
