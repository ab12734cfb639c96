"""Media categories (Animus /v2/media/categories): structured metadata about an image or video.

The model fills a JSON schema holding exactly the requested keys (categories, participants,
actions and tags as short string arrays, scene as a string), constrained while decoding, so the
result always parses and conforms, even from a random-weight model. A video's planned frames
(one per scene with use_scenes) are each analysed, all in one batched engine call, and merged:
values deduplicated and ordered by how many frames saw them, the most common scene; the
per-frame results are kept as evidence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from server.engine.engine import AsyncEngine
from server.engine.inputs import InputBuilder, ModelInputs
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence
from server.engine.structured import StructuredOutput
from server.exceptions import ServerError
from server.media.fetch import FetchedMedia, is_data_uri
from server.media.frames import FrameRequest, TokenBudget
from server.media.image import judged_kind
from server.media.kind import url_kind
from server.media.video import DecodedVideo
from server.pipelines.chat import compile_grammar
from server.pipelines.finish import (
    FRAMES_DONE,
    MEDIA_READY,
    STARTED,
    ProgressCallback,
    collect_all,
    raise_for_finish,
    report,
    share,
)
from server.pipelines.media_loader import MediaLoader
from server.pipelines.messages import ChatMessage, ImagePart, VideoPart

METADATA_KEYS = ("categories", "participants", "actions", "scene", "tags")
DESCRIPTIONS = {
    "categories": "general content categories",
    "participants": "people or objects present",
    "actions": "activities or motions",
    "scene": "a short description of the setting",
    "tags": "relevant keywords",
}
MAX_ITEMS = 5
# Bounded strings hold no escapes, control characters or surrogates (the server's grammar
# writes their characters so: structured.JSON_CHARACTER). Lengths, not patterns of the same
# characters: against a Qwen-sized vocabulary the patterns' bounded positions took 4.4 s to
# compile for the default keys, the lengths 0.03 s (scripts/bench_grammar_vocab.py).
ITEM = {"type": "string", "minLength": 1, "maxLength": 32}
SCENE = {"type": "string", "minLength": 1, "maxLength": 120}
# Each token adds at least one character, and the schema bounds the JSON to fewer than this.
MAX_JSON_TOKENS = 1024
PARAM = "media_url"

logger = logging.getLogger(__name__)


def categories_schema(keys: tuple[str, ...]) -> dict[str, Any]:
    properties = {
        key: SCENE if key == "scene" else {"type": "array", "items": ITEM, "maxItems": MAX_ITEMS}
        for key in keys
    }
    return {
        "type": "object",
        "properties": properties,
        "required": list(keys),
        "additionalProperties": False,
    }


def prompt_for(keys: tuple[str, ...], what: str) -> str:
    wanted = "; ".join(f"{key}: {DESCRIPTIONS[key]}" for key in keys)
    return f"Analyse this {what}. Answer with JSON holding {wanted}."


def merge_results(results: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Values seen in more frames first (then in order of first appearance), deduplicated
    case-insensitively; the most common scene."""
    merged: dict[str, Any] = {}
    for key in keys:
        if key == "scene":
            scenes = Counter(r[key] for r in results if r.get(key))
            merged[key] = scenes.most_common(1)[0][0] if scenes else ""
            continue
        counts: Counter[str] = Counter()
        first: dict[str, str] = {}
        for result in results:
            for value in dict.fromkeys(v.strip() for v in result.get(key, []) if v.strip()):
                norm = value.lower()
                counts[norm] += 1
                first.setdefault(norm, value)
        order = {norm: i for i, norm in enumerate(first)}
        ranked = sorted(counts, key=lambda n: (-counts[n], order[n]))
        merged[key] = [first[n] for n in ranked]
    return merged


@dataclass(frozen=True)
class CategoriesRequest:
    request_id: str
    media_url: str
    keys: tuple[str, ...]
    frames: FrameRequest = FrameRequest("frames")  # a video's (use_scenes, fps, max_frames)
    priority: int = 0  # the scheduler's (async jobs': --job-priority)


@dataclass
class FrameResult:
    timestamp: float
    result: dict[str, Any]


@dataclass
class CategoriesResult:
    media_type: str  # "image" | "video"
    result: dict[str, Any]
    frames: list[FrameResult] | None = None
    # prompt, image, completion, cached tokens
    usage: list[int] = field(default_factory=lambda: [0, 0, 0, 0])


class IncompleteJson(ServerError):
    def __init__(self) -> None:
        super().__init__("The model's structured answer did not complete; see the server log.")


class CategoriesPipeline:
    def __init__(
        self,
        engine: AsyncEngine,
        input_builder: InputBuilder,
        media: MediaLoader,
    ):
        self.engine = engine
        self.input_builder = input_builder
        self.media = media

    async def run(
        self, request: CategoriesRequest, on_progress: ProgressCallback | None = None
    ) -> CategoriesResult:
        """on_progress(fraction of frames done) is called as frames finish (from the loop)."""
        self.engine.check_capacity()
        report(on_progress, STARTED)
        spec = StructuredOutput.json_schema(categories_schema(request.keys))
        await compile_grammar(self.engine, spec)
        sampling = SamplingParams(
            max_tokens=MAX_JSON_TOKENS, temperature=0.1, structured=spec, priority=request.priority
        )
        kind = url_kind(request.media_url, PARAM)  # (refuses the containers not read here)
        fetched = None
        if kind is not None and is_data_uri(request.media_url):  # as it declares itself
            await self.media.preprocessing.take()
        else:
            fetched = await self._downloaded(request.media_url)
        # Holding a preprocessing slot while the media are decoded and the inputs built; the
        # answers (the engine's work) come after it is given back.
        try:
            if fetched is not None:
                # judged by its first bytes: its name may say neither (a signed CDN link), or
                # be wrong
                kind = judged_kind(await asyncio.to_thread(fetched.head, PARAM, 64), PARAM)
            if kind == "image":
                inputs = await self._image_inputs(request, fetched)
            else:  # (neither: read as a video, its error naming both)
                or_image = kind == "neither"
                video, frame_inputs = await self._video_inputs(request, fetched, or_image)
                report(on_progress, MEDIA_READY)
        finally:
            self.media.preprocessing.give_back()
            if fetched is not None:
                fetched.discard()
        if kind == "image":
            return await self._image(request, sampling, inputs)
        return await self._video(request, sampling, on_progress, video, frame_inputs)

    async def _downloaded(self, url: str) -> FetchedMedia:
        """The media downloaded once (a signed link may not take a second request), returned
        holding a preprocessing slot (MediaLoader.downloading, as a completion's downloads)."""
        fetched = None
        try:
            async with self.media.downloading():
                fetched = await self.media.fetch_unknown(url, PARAM)
        except BaseException:
            if fetched is not None:
                fetched.discard()
            raise
        return fetched

    async def check_for_job(self, media_url: str) -> None:
        """What a job would otherwise find out only when it runs: a URL no fetch could read,
        an image sent inline that cannot be read (a 400 now, as media completions check
        theirs). Media by URL, and videos, are read when it runs."""
        kind = url_kind(media_url, PARAM)  # (first, as the synchronous request checks it)
        self.media.fetcher.check_ahead(media_url, "media", PARAM)
        undeclared = kind is None and is_data_uri(media_url)  # (its bytes say what it is)
        if kind != "image" and not undeclared:
            return
        or_video = FrameRequest() if undeclared else None
        messages = [ChatMessage("user", [ImagePart(media_url, "auto", PARAM, or_video=or_video)])]
        await self.media.check_ahead(messages, self.media.check_counts(messages))

    async def _image_inputs(
        self, request: CategoriesRequest, fetched: FetchedMedia | None
    ) -> ModelInputs:
        part = ImagePart(request.media_url, "auto", PARAM)
        messages = [ChatMessage("user", [part])]
        budget = self.media.check_counts(messages)
        if fetched is not None:
            image = await self.media.fetched_image(part, fetched, budget)
        else:
            (image,) = await self.media.images(messages, budget)
        return await asyncio.to_thread(self._inputs, image, request.keys, "image")

    async def _image(
        self, request: CategoriesRequest, sampling: SamplingParams, inputs: ModelInputs
    ) -> CategoriesResult:
        seq = self.engine.add_request(request.request_id, inputs, sampling)
        result = _ordered(json.loads(await self._collect(seq)), request.keys)
        return CategoriesResult("image", result, usage=_usage([seq]))

    async def _video_inputs(
        self, request: CategoriesRequest, fetched: FetchedMedia | None, or_image: bool
    ) -> tuple[DecodedVideo, list[ModelInputs]]:
        """The video's frames, each the input of a request of its own: up to 60, each with the
        prompt and its JSON answer fitting the context by itself (seed 000: as many as the
        model allows)."""
        part = VideoPart(request.media_url, FrameRequest("frames"), PARAM, or_image)
        budget = self.media.check_counts([ChatMessage("user", [part])])
        prompt = [{"role": "user", "content": self._content(request.keys, "video frame")}]
        prompt_tokens = self.input_builder.count_text_tokens(prompt, think=False)
        tokens = TokenBudget(
            self.engine.max_seq_len,
            prompt_tokens=prompt_tokens,
            max_tokens=MAX_JSON_TOKENS,
            token_side=self.input_builder.token_side,
            min_image_pixels=self.input_builder.min_image_pixels,  # (each frame: an image)
        )
        video = await self.media.video(part, budget, tokens, request.frames, fetched)

        def build_all(frames: np.ndarray) -> list[ModelInputs]:
            return [self._inputs(Image.fromarray(f), request.keys, "video frame") for f in frames]

        return video, await asyncio.to_thread(build_all, video.frames)

    async def _video(
        self,
        request: CategoriesRequest,
        sampling: SamplingParams,
        on_progress: ProgressCallback | None,
        video: DecodedVideo,
        inputs: list[ModelInputs],
    ) -> CategoriesResult:
        started = time.monotonic()
        seqs = self.engine.add_requests(
            [(f"{request.request_id}-frame{i}", x, sampling) for i, x in enumerate(inputs)]
        )
        frames_stage = share(on_progress, MEDIA_READY, FRAMES_DONE - MEDIA_READY)
        texts = await collect_all(self.engine, seqs, self._collect, frames_stage)
        num_prompt, _, num_completion, _ = _usage(seqs)
        # One line for the video, not one per frame.
        logger.info(
            "analysed %d frames: %d prompt + %d completion tokens in %.2fs",
            len(seqs),
            num_prompt,
            num_completion,
            time.monotonic() - started,
        )
        per_frame = [_ordered(json.loads(text), request.keys) for text in texts]
        frames = [
            FrameResult(round(t, 3), r)
            for t, r in zip(video.plan.timestamps, per_frame, strict=True)
        ]
        return CategoriesResult(
            "video", merge_results(per_frame, request.keys), frames, _usage(seqs)
        )

    def _inputs(self, image: Image.Image, keys: tuple[str, ...], what: str) -> ModelInputs:
        content = self._content(keys, what)
        messages = [{"role": "user", "content": content}]
        return self.input_builder.build(messages, [image], think=False)  # the JSON at once

    @staticmethod
    def _content(keys: tuple[str, ...], what: str) -> list[dict[str, str]]:
        return [{"type": "image"}, {"type": "text", "text": prompt_for(keys, what)}]

    async def _collect(self, seq: Sequence) -> str:
        pieces = []
        async for output in self.engine.stream(seq):
            # (our own schema: not the client's fault)
            if output.finish_reason in ("dead_end", "grammar_too_slow"):
                raise IncompleteJson()
            raise_for_finish(output)
            pieces.append(output.text_delta)
        if seq.finish_reason != "stop":
            raise IncompleteJson()
        return "".join(pieces)


def _ordered(result: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The requested keys in their canonical order; values trimmed, blank and repeated ones
    dropped (the schema bounds lengths, but a value of only spaces still means nothing)."""
    cleaned: dict[str, Any] = {}
    for key in keys:
        value = result[key]
        if isinstance(value, str):
            cleaned[key] = value.strip()
        else:
            cleaned[key] = list(dict.fromkeys(v.strip() for v in value if v.strip()))
    return cleaned


def _usage(seqs: list[Sequence]) -> list[int]:
    return [
        sum(s.inputs.num_prompt_tokens for s in seqs),
        sum(s.inputs.num_image_tokens for s in seqs),
        sum(s.num_completion_tokens for s in seqs),
        sum(s.num_cached_tokens for s in seqs),
    ]
