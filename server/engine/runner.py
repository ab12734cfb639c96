"""ModelRunner: the only engine code that touches torch devices.

For now it runs one sequence at a time through `model.generate`; a per-token callback lets the
engine stream tokens and decide when to stop (EOS, stop strings, max_tokens, abort).
The continuous-batching runner replaces the inside of `generate` without changing its surface.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from server.engine.inputs import ModelInputs
from server.engine.loader import LoadedModel
from server.engine.sampling import SamplingParams

TokenCallback = Callable[[int], bool]  # returns True to stop generating


class _PerTokenCallback(StoppingCriteria):
    """generate() calls every stopping criterion after each new token: a cheap per-token hook."""

    def __init__(self, on_token: TokenCallback):
        self.on_token = on_token

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs
    ) -> torch.BoolTensor:
        should_stop = self.on_token(int(input_ids[0, -1]))
        return torch.full(
            (input_ids.shape[0],), should_stop, dtype=torch.bool, device=input_ids.device
        )


class ModelRunner:
    def __init__(self, loaded: LoadedModel):
        self.model = loaded.model
        self.device = loaded.device
        self.eos_token_ids = list(loaded.eos_token_ids)
        self.pad_token_id = loaded.tokenizer.pad_token_id or self.eos_token_ids[0]

    @torch.inference_mode()
    def generate(
        self,
        inputs: ModelInputs,
        sampling: SamplingParams,
        max_tokens: int,
        on_token: TokenCallback,
    ) -> None:
        tensors = {name: t.to(self.device) for name, t in inputs.tensors.items()}
        # A per-request seed makes sampling reproducible; without one, draw a fresh seed so an
        # earlier seeded request does not make later unseeded ones predictable.
        torch.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
        self.model.generate(
            **tensors,
            generation_config=self._generation_config(sampling, max_tokens),
            stopping_criteria=StoppingCriteriaList([_PerTokenCallback(on_token)]),
        )

    def _generation_config(self, sampling: SamplingParams, max_tokens: int) -> GenerationConfig:
        config = GenerationConfig(
            max_new_tokens=max_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            do_sample=not sampling.is_greedy,
        )
        if not sampling.is_greedy:
            config.temperature = sampling.temperature
            config.top_p = sampling.top_p
            config.top_k = sampling.top_k or None
        return config
