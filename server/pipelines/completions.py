"""Text completions (POST /v1/completions): prompts as text or token ids, no chat template,
no media; each prompt is a sequence of its own, all added to the engine together."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import torch

from server.engine.engine import AsyncEngine
from server.engine.inputs import ModelInputs
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence, SequenceOutput
from server.exceptions import InvalidRequest, ServerError
from server.pipelines.finish import raise_for_finish

PARAM = "prompt"


class TextCompletions:
    def __init__(self, engine: AsyncEngine, tokenizer: Any, media_token_ids: tuple[int, ...]):
        self.engine = engine
        self.tokenizer = tokenizer
        self.media_token_ids = frozenset(media_token_ids)

    async def start(
        self, request_id: str, prompts: list[str | list[int]], sampling: SamplingParams
    ) -> list[Sequence]:
        self.engine.check_capacity()  # refuse early, before tokenizing
        inputs = await asyncio.to_thread(lambda: [self._inputs(p) for p in prompts])
        requests = [(f"{request_id}-{i}", x, sampling) for i, x in enumerate(inputs)]
        try:
            return self.engine.add_requests(requests)
        except ServerError as exc:  # the engine names chat's field
            if exc.param == "messages":
                exc.param = PARAM
            raise

    def _inputs(self, prompt: str | list[int]) -> ModelInputs:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if any(i >= self.engine.runner.vocab_size for i in ids):
            raise InvalidRequest(
                f"prompt token ids must be below the vocabulary size "
                f"({self.engine.runner.vocab_size}).",
                param=PARAM,
                code="invalid_value",
            )
        if self.media_token_ids.intersection(ids):
            raise InvalidRequest(
                "/v1/completions takes text only; send images and videos to /v1/chat/completions.",
                param=PARAM,
                code="unsupported_content",
            )
        return ModelInputs({"input_ids": torch.tensor([ids])}, len(ids), 0)

    async def outputs(self, seq: Sequence) -> AsyncIterator[SequenceOutput]:
        async for output in self.engine.stream(seq):
            raise_for_finish(output)
            yield output

    async def text(self, seq: Sequence) -> str:
        return "".join([output.text_delta async for output in self.outputs(seq)])
