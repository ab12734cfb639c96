"""Text completions (POST /v1/completions): prompts as text or token ids, no chat template,
no media; each prompt's n choices are sequences of their own (see choices.add_choices)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import Any

import torch

from server.engine.engine import AsyncEngine
from server.engine.inputs import THINK_CLOSE, THINK_OPEN, ModelInputs, Truncation
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence, SequenceOutput
from server.exceptions import InvalidRequest, ServerError
from server.pipelines.chat import compile_grammar
from server.pipelines.choices import add_choices
from server.pipelines.finish import raise_for_finish
from server.pipelines.logprobs import TokenTexts
from server.pipelines.reasoning import single_token_id

PARAM = "prompt"


@dataclass(frozen=True)
class PromptOptions:
    """How a request's prompts become tokens, and where its constraint came from."""

    grammar_param: str = "response_format"  # for a constraint's errors
    truncation: Truncation | None = None  # vLLM's truncate_prompt_tokens
    add_special_tokens: bool | None = None  # the tokenizer's default (Qwen's add none)


class TextCompletions:
    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer: Any,
        media_token_ids: tuple[int, ...],
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.media_token_ids = frozenset(media_token_ids)
        self.token_texts = TokenTexts(tokenizer)
        self.token_id_texts = self.token_texts.as_token_ids()
        # "<think>" and "</think>", where the tokenizer has them as tokens (thinking ones)
        think = (single_token_id(tokenizer, THINK_OPEN), single_token_id(tokenizer, THINK_CLOSE))
        self.think_ids = think if None not in think else None

    async def start(
        self,
        request_id: str,
        prompts: list[str | list[int]],
        sampling: SamplingParams,
        n: int = 1,
        options: PromptOptions = PromptOptions(),
    ) -> list[Sequence]:
        """Every prompt's n choices, prompt by prompt (choice k of prompt p: p * n + k)."""
        self.engine.check_capacity()  # refuse early, before tokenizing
        sampling = self.engine.limits.with_bad_word_ids(sampling)  # once, not per prompt and choice
        if sampling.structured is not None:
            await compile_grammar(self.engine, sampling.structured, options.grammar_param)
        inputs = await asyncio.to_thread(lambda: [self._inputs(p, options) for p in prompts])
        inputs = [self.engine.limits.truncated(x, options.truncation, sampling) for x in inputs]
        samplings = [self._for_prompt(x, sampling) for x in inputs]
        try:
            if n == 1:  # all in one batch
                requests = [
                    (f"{request_id}-{i}", x, s)
                    for i, (x, s) in enumerate(zip(inputs, samplings, strict=True))
                ]
                return self.engine.add_requests(requests)
            return await self._add_choices(request_id, inputs, samplings, n)
        except ServerError as exc:  # the engine names chat's field and says "messages"
            if exc.param == "messages":
                exc.param = PARAM
            if exc.code == "context_length_exceeded":
                exc.message = exc.message.replace(" or the size of the images", "")
                exc.message = exc.message.replace("messages", "prompt")
            raise

    def _for_prompt(self, inputs: ModelInputs, sampling: SamplingParams) -> SamplingParams:
        """A raw prompt that ends inside a thinking checkpoint's reasoning (an open "<think>"):
        its grammar waits for the model's "</think>", as vLLM's reasoning parser has it."""
        if sampling.structured is None or self.think_ids is None:
            return sampling
        ids, (open_id, close_id) = inputs.token_ids, self.think_ids
        last_open = max((i for i, t in enumerate(ids) if t == open_id), default=-1)
        if last_open <= max((i for i, t in enumerate(ids) if t == close_id), default=-1):
            return sampling
        return replace(sampling, think_end_token_id=close_id)

    async def _add_choices(
        self,
        request_id: str,
        inputs: list[ModelInputs],
        samplings: list[SamplingParams],
        n: int,
    ) -> list[Sequence]:
        groups = await asyncio.gather(
            *(
                add_choices(self.engine, f"{request_id}-{i}", x, s, n)
                for i, (x, s) in enumerate(zip(inputs, samplings, strict=True))
            ),
            return_exceptions=True,
        )
        failed = [g for g in groups if isinstance(g, BaseException)]
        if failed:  # the other prompts' choices are not worth running alone
            for group in groups:
                for seq in group if isinstance(group, list) else []:
                    self.engine.abort(seq.request_id)
            raise failed[0]
        return [seq for group in groups for seq in group]  # type: ignore[union-attr]

    def prompt_text(self, prompt: str | list[int], seq: Sequence, cut: bool = False) -> str:
        """What echo shows of a choice's prompt: the text sent, or its tokens' (token ids, or
        a prompt truncate_prompt_tokens may have cut)."""
        if isinstance(prompt, str) and not cut:
            return prompt
        return self.tokenizer.decode(seq.inputs.token_ids)

    def _inputs(self, prompt: str | list[int], options: PromptOptions) -> ModelInputs:
        if isinstance(prompt, str):
            # (a prompt to cut may be longer: it is asked for)
            self.engine.limits.check_prompt_text(prompt, PARAM, whole=options.truncation is None)
            special = options.add_special_tokens
            ids = self.tokenizer.encode(prompt, add_special_tokens=special is not False)
        else:
            ids = list(prompt)
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

    async def outputs(self, seq: Sequence) -> AsyncGenerator[SequenceOutput, None]:
        async for output in self.engine.stream(seq):
            raise_for_finish(output)
            yield output

    async def text(self, seq: Sequence) -> str:
        return "".join([output.text_delta async for output in self.outputs(seq)])
