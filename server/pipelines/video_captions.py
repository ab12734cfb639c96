"""Captions mode (seed 000): every planned frame is captioned, all frames in one batched engine
call, and the question is then answered over the timestamped captions."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from server.engine.engine import AsyncEngine
from server.engine.inputs import InputBuilder, ModelInputs
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence
from server.media.video import DecodedVideo
from server.pipelines.finish import ProgressCallback, collect_all, raise_for_finish

CAPTION_PROMPT = "Describe this video frame in detail."

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameCaption:
    timestamp: float
    caption: str
    video_index: int = 0  # which of the request's videos (in the order they were sent)


@dataclass(frozen=True)
class CaptionUsage:
    num_prompt_tokens: int
    num_image_tokens: int
    num_completion_tokens: int
    num_cached_tokens: int = 0


class FrameCaptioner:
    def __init__(self, engine: AsyncEngine, input_builder: InputBuilder):
        self.engine = engine
        self.input_builder = input_builder

    async def caption(
        self,
        request_id: str,
        video: DecodedVideo,
        sampling: SamplingParams,
        caption_tokens: int,
        on_progress: ProgressCallback | None = None,
    ) -> tuple[list[FrameCaption], CaptionUsage]:
        started = time.monotonic()
        inputs = await asyncio.to_thread(self._frame_inputs, video)
        # The captions become prompt text: special tokens in them would be read as control
        # tokens (an image placeholder with no image), so they are always left out. What the
        # request asks of its answer (a format, logprobs, allowed or banned tokens, a length)
        # is not asked of the captions: only how to sample.
        frame_sampling = replace(
            sampling,
            max_tokens=caption_tokens,
            stop=(),
            stop_token_ids=(),
            skip_special_tokens=True,
            structured=None,
            logprobs=None,
            prompt_logprobs=None,
            logit_bias=(),
            allowed_token_ids=(),
            bad_words=(),
            bad_word_ids=(),
            min_tokens=0,
            ignore_eos=False,
            include_stop_str_in_output=False,
            thinking_token_budget=None,
        )
        seqs = self.engine.add_requests(
            [(f"{request_id}-frame{i}", frame, frame_sampling) for i, frame in enumerate(inputs)]
        )
        texts = await collect_all(self.engine, seqs, self._collect, on_progress)
        texts = await asyncio.to_thread(bounded, self.engine.tokenizer, texts, caption_tokens)
        captions = [
            FrameCaption(round(t, 3), text.strip())
            for t, text in zip(video.plan.timestamps, texts, strict=True)
        ]
        usage = CaptionUsage(
            sum(s.inputs.num_prompt_tokens for s in seqs),
            sum(s.inputs.num_image_tokens for s in seqs),
            sum(s.num_completion_tokens for s in seqs),
            sum(s.num_cached_tokens for s in seqs),
        )
        # One line for the video, not one per frame.
        logger.info(
            "captioned %d frames: %d prompt + %d completion tokens in %.2fs",
            len(seqs),
            usage.num_prompt_tokens,
            usage.num_completion_tokens,
            time.monotonic() - started,
        )
        return captions, usage

    def _frame_inputs(self, video: DecodedVideo) -> list[ModelInputs]:
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}],
            }
        ]
        return [
            self.input_builder.build(messages, [Image.fromarray(frame)], think=False)
            for frame in video.frames
        ]

    async def _collect(self, seq: Sequence) -> str:
        pieces = []
        async for output in self.engine.stream(seq):
            raise_for_finish(output)
            pieces.append(output.text_delta)
        return "".join(pieces)


def bounded(tokenizer: Any, texts: list[str], num_tokens: int) -> list[str]:
    """Each text cut to `num_tokens` tokens as a prompt reads it. The frame plan counts
    caption_tokens per caption; a caption's text tokenized again can take more tokens than
    wrote it (bytes that were not UTF-8 became U+FFFD), and the captions must still fit."""

    cut = []
    for text in texts:
        ids, keep = tokenizer.encode(text, add_special_tokens=False), num_tokens
        while len(ids) > num_tokens:  # (a cut text can tokenize longer again: cut more)
            text = tokenizer.decode(ids[:keep]).rstrip("\ufffd") if keep > 0 else ""
            ids, keep = tokenizer.encode(text, add_special_tokens=False), keep - 1
        cut.append(text)
    return cut


def captions_text(captions: list[FrameCaption], duration_s: float) -> str:
    lines = [f"[{c.timestamp:.2f} s] {c.caption}" for c in captions]
    return (
        f"A video of {duration_s:.1f} seconds, described frame by frame "
        "(time: description):\n" + "\n".join(lines) + "\n"
    )
