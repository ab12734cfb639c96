"""Chat completions: load the media, build the prompt, run it through the engine.

Videos are used in one of two ways (per request; see media/frames.py for the budgets):
native (the frames go to the model as a video input) or captions (each frame captioned in one
batched engine call, then the question answered over the timestamped captions)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, TypeVar

from PIL import Image

from server.engine.engine import AsyncEngine
from server.engine.inputs import (
    DEFAULT_TEMPLATE,
    THINK_CLOSE,
    InputBuilder,
    ModelInputs,
    TemplateError,
    TemplateOptions,
    Truncation,
    VideoFrames,
)
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence, SequenceOutput
from server.engine.structured import InvalidSchema, StructuredOutput
from server.exceptions import InvalidRequest, ServerError
from server.media.frames import TokenBudget, VideoMode
from server.media.video import DecodedVideo
from server.metrics import Metrics
from server.pipelines.choices import add_choices
from server.pipelines.finish import (
    FRAMES_DONE,
    MEDIA_READY,
    STARTED,
    ConstraintFailed,
    ProgressCallback,
    raise_for_finish,
    report,
    share,
)
from server.pipelines.logprobs import PromptLogprobs, TokenLogprob, TokenTexts
from server.pipelines.media_loader import MediaBudget, MediaLoader
from server.pipelines.messages import (
    ChatMessage,
    TextPart,
    ToolCall,
    VideoPart,
    parts_of,
    prompt_text,
    to_hf_message,
)
from server.pipelines.reasoning import (
    answer_start,
    count_reasoning_tokens,
    single_token_id,
    split_reasoning,
)
from server.pipelines.tools import CALL_OPEN, Tools, parse_answer, render
from server.pipelines.video_captions import (
    CaptionUsage,
    FrameCaption,
    FrameCaptioner,
    captions_text,
)

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatRequest:
    request_id: str
    messages: list[ChatMessage]
    sampling: SamplingParams
    video_mode: VideoMode = "native"
    use_scenes: bool = False
    n: int = 1  # choices, each its own sequence over the one prefilled prompt
    tools: Tools | None = None
    template: TemplateOptions = DEFAULT_TEMPLATE  # the request's chat-template options
    grammar_param: str = "response_format"  # the field the grammar came from, for its errors
    tools_param: str = "tools"  # where a forced call's schema came from (its errors)
    max_tokens_param: str = "max_tokens"  # the field the answer's length came from (its errors)
    # A constraint a forced tool call leaves aside (the answer is the call): compiled only so
    # that one that cannot be used is still its 400.
    aside: StructuredOutput | None = None
    tokens_as_ids: bool = False  # logprobs' tokens as "token_id:{id}" (vLLM's option)
    return_token_ids: bool = False  # the prompt's and answers' token ids too (vLLM's option)
    return_image_sizes: bool = False  # each image's size as the model read it (ours)
    include_reasoning: bool = True  # false: a thinking checkpoint's reasoning is left out
    truncation: Truncation | None = None  # vLLM's truncate_prompt_tokens (text prompts only)
    received_time: float = field(default_factory=time.monotonic)
    # Async jobs: called with the fraction of video frames captioned (captions mode).
    on_progress: ProgressCallback | None = field(default=None, compare=False)

    @property
    def grammar_field(self) -> str:
        """The field the request's grammar came from (a forced tool call's: tools)."""
        forced = self.tools is not None and self.tools.is_forced
        return self.tools_param if forced else self.grammar_param

    def name_error(self, exc: BaseException) -> None:
        """An error names the field the client sent: a constraint that stopped the answer
        (ConstraintFailed) its own (tools where it stopped inside a call), a length past the
        context max_completion_tokens where that was sent."""
        if isinstance(exc, ConstraintFailed):
            exc.param = self.tools_param if exc.in_call else self.grammar_field
        elif isinstance(exc, InvalidRequest) and exc.param == "max_tokens":
            exc.param = self.max_tokens_param


class TokenCounts(NamedTuple):
    """A request's usage (the order Usage.of takes them in)."""

    num_prompt: int
    num_image: int
    num_video: int
    num_completion: int
    num_cached: int
    num_reasoning: int | None  # None unless the answers started in reasoning


@dataclass
class ChatRun:
    """A started request: its sequences (one per choice), plus what captions mode did."""

    seqs: list[Sequence]
    frames: list[FrameCaption] | None = None
    caption_usage: CaptionUsage = CaptionUsage(0, 0, 0)
    think_close_id: int | None = None  # the tokenizer's "</think>", where it has one

    @property
    def seq(self) -> Sequence:
        return self.seqs[0]

    def usage(self, choice: int | None = None, sent: int | None = None) -> TokenCounts:
        """The request's tokens, captioning included:
        the prompt counted once, the completions of every choice summed (of choice `choice`
        only, where given: vLLM's continuous usage of a chunk, its first `sent` tokens, those
        the stream has sent: the engine may have the next one already); reasoning: None
        unless the answers started in reasoning (a thinking checkpoint's)."""
        inputs, extra = self.seq.inputs, self.caption_usage
        seqs = self.seqs if choice is None else [self.seqs[choice]]
        outputs = [s.output_token_ids for s in seqs]  # (not copied: a stream asks every chunk)
        counts = [len(ids) if sent is None else min(len(ids), sent) for ids in outputs]
        reasoning = None
        if inputs.thinks and self.think_close_id is not None:
            close = self.think_close_id
            pairs = zip(outputs, counts, strict=True)
            reasoning = sum(count_reasoning_tokens(ids[:n], close) for ids, n in pairs)
        return TokenCounts(
            inputs.num_prompt_tokens + extra.num_prompt_tokens,
            inputs.num_image_tokens,
            inputs.num_video_tokens + extra.num_image_tokens,
            sum(counts) + extra.num_completion_tokens,
            self.seq.num_cached_tokens + extra.num_cached_tokens,
            reasoning,
        )


@dataclass
class ChoiceResult:
    index: int
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str
    stop_reason: str | int | None
    logprobs: list[TokenLogprob] | None
    reasoning_content: str | None = None  # thinking checkpoints only
    token_ids: list[int] | None = None  # return_token_ids


@dataclass
class ChatResult:
    choices: list[ChoiceResult]
    run: ChatRun
    prompt_token_ids: list[int] | None = None  # return_token_ids
    prompt_logprobs: list[PromptLogprobs | None] | None = None  # sampling.prompt_logprobs
    image_sizes: list[tuple[int, int]] | None = None  # return_image_sizes

    @property
    def text(self) -> str:
        return self.choices[0].content or ""


class ChatPipeline:
    def __init__(
        self,
        engine: AsyncEngine,
        input_builder: InputBuilder,
        media: MediaLoader,
        caption_tokens: int,
        metrics: Metrics,
    ):
        self.engine = engine
        self.input_builder = input_builder
        self.media = media
        self.captioner = FrameCaptioner(engine, input_builder)
        self.token_texts = TokenTexts(engine.tokenizer)
        self.token_id_texts = self.token_texts.as_token_ids()
        self.think_close_id = single_token_id(engine.tokenizer, THINK_CLOSE)
        self.caption_tokens = caption_tokens
        self.metrics = metrics

    async def start(self, request: ChatRequest) -> ChatRun:
        """Everything that can fail because of the request happens here, before any output."""
        try:
            return await self._start(request)
        except ServerError as exc:
            request.name_error(exc)
            raise

    async def _start(self, request: ChatRequest) -> ChatRun:
        # Bad words tokenized once for the request, not again for each choice.
        request = replace(request, sampling=self.engine.limits.with_bad_word_ids(request.sampling))
        budget = self.check_fields(request)  # a bad request is a 400 even on a full server
        self.engine.check_capacity()  # refused before the costly part: grammar, media
        await self.compile_structured(request)
        request = replace(request, messages=self.rendered(request))
        report(request.on_progress, STARTED)  # (a job's: an image's too, not only videos')
        # (downloaded checked the videos it judged against their limit; images only fell)
        messages = await self.media.downloaded(request.messages)
        request = replace(request, messages=messages)
        try:  # (holding a preprocessing slot)
            images = await self.media.images(request.messages, budget)
            videos = await self._videos(request, images, budget)
            captioned = bool(videos) and request.video_mode == "captions"
            if not captioned:
                inputs = await self._native_inputs(request, images, videos)
        finally:
            self.media.preprocessing.give_back()
            self.media.forget(request.messages)
        # Outside the preprocessing slots, the engine's work: a video's captions (two /v2
        # requests captioning long videos held both slots, and an inline image waited 7 s),
        # and the queueing (n choices wait for the first's prefill, long when the batch is
        # full: eight such requests held every slot, whatever the scheduling policy).
        if captioned:
            run = await self._captioned(request, images, videos)
        else:
            if videos:  # one line per video request, as captions mode writes
                _log_native(videos, inputs, request.received_time)
            run = ChatRun(await self._add(request, inputs), think_close_id=self.think_close_id)
        for seq in run.seqs:
            seq.received_time = request.received_time
        return run

    async def check(self, request: ChatRequest) -> MediaBudget:
        """The checks that need no media: an async job runs them before it is accepted, so a
        request that can never succeed is a 400 at once rather than a failed job later."""
        budget = self.check_fields(request)
        await self.compile_structured(request)
        return budget

    def check_fields(self, request: ChatRequest) -> MediaBudget:
        """check's cheap part: sampling, the text's length, the number of media."""
        self.engine.limits.check_sampling(request.sampling)
        self._check_text(request, whole=request.truncation is None)  # (a prompt to cut: longer)
        return self.media.check_counts(request.messages)

    def _check_text(self, request: ChatRequest, whole: bool) -> None:
        # As the template gets it: the tools' definitions and the calls' arguments too.
        rendered = self.rendered(request)
        text = prompt_text(rendered)
        self.engine.limits.check_prompt_text(text, "messages", len(rendered), whole=whole)

    async def compile_structured(self, request: ChatRequest) -> None:
        """The request's grammar (a 400 if it cannot be one), compiled ahead into the cache."""
        if (structured := request.sampling.structured) is not None:
            await compile_grammar(self.engine, structured, request.grammar_field)
        if request.aside is not None:
            await compile_grammar(self.engine, request.aside, request.grammar_param)

    async def check_for_job(self, request: ChatRequest) -> None:
        """check, and what a job would otherwise find out only when it runs: text (and
        max_tokens) that alone overflow the context, whatever the media add; images sent
        inline or by file id that cannot be read."""
        budget = await self.check(request)
        hf_messages = [to_hf_message(m) for m in self.rendered(request)]
        text_tokens = await _templated(
            self.input_builder.count_text_tokens, hf_messages, True, request.template
        )
        if (truncation := request.truncation) is not None:  # the prompt will be cut to fit
            kept = self.engine.limits.kept_prompt_tokens(truncation, request.sampling)
            text_tokens = min(text_tokens, kept)
        self.engine.limits.max_tokens_for(text_tokens, request.sampling)
        await self.media.check_ahead(request.messages, budget)

    async def prompt(self, request: ChatRequest, whole: bool = False) -> ModelInputs:
        """The prompt the request would run, built but not run (vLLM's /tokenize): its media
        fetched and decoded as for an answer (videos read natively, as /v1 reads them). whole
        false: counted, perhaps to be cut, it may be CONTEXTS_TOKENIZED contexts long; true:
        one past the context is refused as an answer's is, before its images are decoded."""
        self._check_text(request, whole=whole)
        budget = self.media.check_counts(request.messages)
        messages = self.rendered(request)
        messages = await self.media.downloaded(messages)
        request = replace(request, messages=messages, video_mode="native")
        try:  # (holding a preprocessing slot)
            images = await self.media.images(request.messages, budget, whole=whole)
            videos = await self._videos(request, images, budget)
            inputs = await self._native_inputs(request, images, videos)
        finally:
            self.media.preprocessing.give_back()
            self.media.forget(request.messages)
        return self.engine.limits.truncated(inputs, request.truncation, request.sampling)

    async def _videos(
        self, request: ChatRequest, images: list[Image.Image], budget: MediaBudget
    ) -> list[DecodedVideo]:
        """The request's videos, fetched and decoded within their share of the context."""
        video_parts = parts_of(request.messages, VideoPart)
        if not video_parts:
            return []
        tokens = await self._video_budget(request, images, len(video_parts))
        wishes = {"mode": request.video_mode, "use_scenes": request.use_scenes}
        videos = []
        for k, part in enumerate(video_parts):
            videos.append(
                await self.media.video(part, budget, tokens, replace(part.frames, **wishes))
            )
            report(request.on_progress, MEDIA_READY * (k + 1) / len(video_parts))
        return videos

    async def _native_inputs(
        self, request: ChatRequest, images: list[Image.Image], videos: list[DecodedVideo]
    ) -> ModelInputs:
        """The prompt with its videos as the model's video input."""
        frames = [VideoFrames(v.frames, v.plan.timestamps, v.info.duration_s) for v in videos]
        hf_messages = [to_hf_message(m) for m in request.messages]
        return await _templated(
            self.input_builder.build,
            hf_messages,
            images,
            frames,
            True,  # (a thinking checkpoint reasons first; a grammar waits for the end)
            request.template,
        )

    async def _captioned(
        self, request: ChatRequest, images: list[Image.Image], videos: list[DecodedVideo]
    ) -> ChatRun:
        all_captions: list[FrameCaption] = []
        usage = CaptionUsage(0, 0, 0, 0)
        texts = []
        total = sum(len(v.frames) for v in videos)
        frames_stage = FRAMES_DONE - MEDIA_READY
        for k, video in enumerate(videos):
            start = MEDIA_READY + frames_stage * len(all_captions) / total
            captions, used = await self.captioner.caption(
                f"{request.request_id}-video{k}",
                video,
                request.sampling,
                self.caption_tokens,
                share(request.on_progress, start, frames_stage * len(video.frames) / total),
            )
            all_captions += [replace(caption, video_index=k) for caption in captions]
            texts.append(captions_text(captions, video.info.duration_s))
            usage = CaptionUsage(
                *(a + b for a, b in zip(_fields(usage), _fields(used), strict=True))
            )
        messages = _replace_videos(request.messages, texts)
        hf_messages = [to_hf_message(m) for m in messages]
        inputs = await _templated(
            self.input_builder.build, hf_messages, images, None, True, request.template
        )
        return ChatRun(await self._add(request, inputs), all_captions, usage, self.think_close_id)

    async def _video_budget(
        self, request: ChatRequest, images: list[Image.Image], num_videos: int
    ) -> TokenBudget:
        """What the videos may use: the context minus the text, the images and the answer,
        shared equally between the videos."""
        hf_messages = [to_hf_message(m) for m in request.messages]
        text_tokens = await _templated(
            self.input_builder.count_text_tokens, hf_messages, True, request.template
        )
        side = self.input_builder.token_side
        image_tokens = sum((img.width // side) * (img.height // side) + 2 for img in images)
        # max_tokens that leave no room whatever the videos: that 400 (naming max_tokens), as
        # without videos and for jobs, not the planner's "the video does not fit"
        self.engine.limits.max_tokens_for(text_tokens + image_tokens, request.sampling)
        max_tokens = request.sampling.max_tokens or self.engine.limits.planned_answer_tokens
        fixed = text_tokens + image_tokens + max_tokens
        share = max(self.engine.max_seq_len - fixed, 0) // num_videos
        return TokenBudget(
            fixed + share,
            text_tokens + image_tokens,
            max_tokens,
            self.caption_tokens,
            side,
            self.input_builder.per_patch_tokens,
            self.input_builder.max_video_pixels,
            self.input_builder.min_video_pixels,
            self.input_builder.min_image_pixels,
        )

    async def _add(self, request: ChatRequest, inputs: ModelInputs) -> list[Sequence]:
        sampling = request.sampling
        inputs = self.engine.limits.truncated(inputs, request.truncation, sampling)
        wants_end = sampling.thinking_token_budget is not None or sampling.structured is not None
        if wants_end and inputs.thinks:
            # the budget counts reasoning tokens, a grammar shapes what follows them: only an
            # answer that starts in reasoning has either wait for its end
            sampling = replace(sampling, think_end_token_id=self.think_close_id)
        return await add_choices(self.engine, request.request_id, inputs, sampling, request.n)

    async def outputs(self, seq: Sequence) -> AsyncGenerator[SequenceOutput, None]:
        first = True
        # Under a format with tools beside it: whether a call has begun (its errors name tools).
        structured = seq.sampling.structured
        watching = structured is not None and structured.calls is not None
        tail, called = "", False
        async for output in self.engine.stream(seq):
            if watching and not called:
                tail += output.text_delta
                called, tail = CALL_OPEN in tail, tail[-len(CALL_OPEN) :]
            try:
                raise_for_finish(output)
            except ConstraintFailed as exc:
                exc.in_call = called
                raise
            if first and seq.num_completion_tokens:
                self.metrics.time_to_first_token.observe(time.monotonic() - seq.received_time)
                first = False
            yield output

    async def complete(self, request: ChatRequest) -> ChatResult:
        run = await self.start(request)
        try:
            texts = await asyncio.gather(*(self._text(seq) for seq in run.seqs))
        except BaseException as exc:
            for seq in run.seqs:
                self.engine.abort(seq.request_id)
            request.name_error(exc)
            raise
        choices = [
            self._choice(i, seq, text, request)
            for i, (seq, text) in enumerate(zip(run.seqs, texts, strict=True))
        ]
        result = ChatResult(choices, run)
        if request.return_token_ids:
            result.prompt_token_ids = run.seq.inputs.token_ids
        if request.return_image_sizes:
            result.image_sizes = list(run.seq.inputs.image_sizes)
        if request.sampling.prompt_logprobs is not None:
            result.prompt_logprobs = self.texts(request).prompt_logprobs(run.seq)
        return result

    async def _text(self, seq: Sequence) -> str:
        return "".join([output.text_delta async for output in self.outputs(seq)])

    def rendered(self, request: ChatRequest) -> list[ChatMessage]:
        """The request's messages as the template gets them (tools, calls and results as
        text; see pipelines/tools.py)."""
        return render(request.messages, request.tools, self.input_builder.default_system)

    def texts(self, request: ChatRequest) -> TokenTexts:
        """How the request's logprobs show tokens."""
        return self.token_id_texts if request.tokens_as_ids else self.token_texts

    def _choice(self, index: int, seq: Sequence, text: str, request: ChatRequest) -> ChoiceResult:
        reasoning = None
        if seq.inputs.thinks:
            reasoning, text = split_reasoning(text)
            reasoning = reasoning if request.include_reasoning else None
        answer = parse_answer(text, request.tools)
        finish_reason = seq.finish_reason or "stop"
        if request.tools is not None:
            finish_reason = request.tools.finish_reason(finish_reason, bool(answer.tool_calls))
        # reasoning left out: its tokens' logprobs and ids too, "</think>" included
        start = 0
        if seq.inputs.thinks and not request.include_reasoning and self.think_close_id:
            start = answer_start(seq.output_token_ids, self.think_close_id)
        logprobs = None
        if seq.sampling.logprobs is not None:
            logprobs = self.texts(request).logprobs(seq, start, seq.num_completion_tokens)
        return ChoiceResult(
            index,
            answer.content,
            answer.tool_calls,
            finish_reason,
            seq.stop_reason,
            logprobs,
            reasoning,
            list(seq.output_token_ids[start:]) if request.return_token_ids else None,
        )


def _log_native(videos: list[DecodedVideo], inputs: ModelInputs, received_time: float) -> None:
    logger.info(
        "read %d video frames natively: %d video tokens of %d prompt tokens in %.2fs",
        sum(len(video.frames) for video in videos),
        inputs.num_video_tokens,
        inputs.num_prompt_tokens,
        time.monotonic() - received_time,
    )


async def _templated(render: Callable[..., T], *args: Any) -> T:
    """Runs a prompt-rendering call off the event loop; a prefill the template cannot
    continue (continue_final_message) is the request's fault: a 400."""
    try:
        return await asyncio.to_thread(render, *args)
    except TemplateError as exc:
        raise InvalidRequest(
            f"The messages cannot be rendered as asked: {exc}",
            param=exc.param,
            code="invalid_value",
        ) from None


async def compile_grammar(
    engine: AsyncEngine, spec: StructuredOutput, param: str = "response_format"
) -> None:
    """Compiling can take seconds for a new schema: off the event loop, before queueing.
    param: where the schema came from (response_format, or the tools of a forced choice)."""
    try:
        await engine.grammar_compiles.run(engine, spec)
    except InvalidSchema as exc:
        raise InvalidRequest(
            f"{param}: the constraint (JSON schema, regex or grammar) cannot be used: {exc}",
            param=param,
            code="invalid_schema",
        ) from None


def _fields(usage: CaptionUsage) -> tuple[int, int, int, int]:
    return (
        usage.num_prompt_tokens,
        usage.num_image_tokens,
        usage.num_completion_tokens,
        usage.num_cached_tokens,
    )


def _replace_videos(messages: list[ChatMessage], texts: list[str]) -> list[ChatMessage]:
    """Each video part becomes the text of its captions, in order."""
    remaining = iter(texts)
    replaced = []
    for message in messages:
        if isinstance(message.content, str):
            replaced.append(message)
            continue
        parts = [
            TextPart(next(remaining)) if isinstance(p, VideoPart) else p for p in message.content
        ]
        replaced.append(replace(message, content=parts))  # (its calls and reasoning kept)
    return replaced
