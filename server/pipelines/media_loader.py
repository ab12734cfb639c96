"""Fetch and decode a request's media: images in threads, videos in the decode workers.

Every item has its own byte cap and the request a total budget; a part that cannot be used is
a 4xx naming it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from server.config import MediaLimits
from server.engine.request_limits import CONTEXTS_TOKENIZED
from server.exceptions import InvalidRequest, MediaError, PromptTooLong
from server.media.decode_memory import DecodeMemory
from server.media.fetch import (
    FetchedMedia,
    MediaFetcher,
    Spend,
    data_uri_head,
    is_data_uri,
    too_large,
)
from server.media.frames import FrameRequest, TokenBudget
from server.media.image import (
    AUTO_DETAIL_TOKENS,
    IMAGE_FORMATS,
    decoded_bytes,
    decoded_size,
    header_size,
    judged_kind,
    load_image,
    pixel_range,
    visual_tokens,
)
from server.media.image_frames import decode_image_frames
from server.media.video import DecodedVideo, VideoDecodeError, VideoDecoder, VideoNoRoom
from server.metrics import Metrics
from server.pipelines.messages import ChatMessage, ImagePart, VideoPart, parts_of, with_parts
from server.pipelines.slots import Slots

T = TypeVar("T")
# /v2 image_url downloads judged at once (each may be a video): a sixteen-image request is not
# sixteen downloads in a row, and the request's byte allowance bounds what they take together.
JUDGED_AT_ONCE = 4


class MediaBudget:
    """All media of one request together may not exceed max_bytes (each item has its own cap
    too): many medium items must not add up to an unbounded request."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.spent = 0

    def spend(self, num_bytes: int, param: str) -> None:
        self.spent += num_bytes
        if self.spent > self.max_bytes:
            raise MediaError(
                f"The request's media add up to more than the server's limit of "
                f"{self.max_bytes} bytes (reached at {param}).",
                param=param,
                code="media_budget_exceeded",
            )


class MediaLoader:
    def __init__(
        self,
        fetcher: MediaFetcher,
        decoder: VideoDecoder,
        limits: MediaLimits,
        model_max_pixels: int,
        metrics: Metrics,
        spool_dir: Path,
        token_side: int = 28,
        model_min_pixels: int = 0,
        context_length: int = 0,
        auto_image_tokens: int = AUTO_DETAIL_TOKENS,
    ):
        self.spool_dir = spool_dir  # downloads go to files here, not to memory
        self.fetcher = fetcher
        self.decoder = decoder
        self.limits = limits
        self.model_max_pixels = model_max_pixels
        self.token_side = token_side  # pixels along one side of a visual token (Qwen3-VL: 32)
        self.auto_image_tokens = auto_image_tokens  # detail auto's budget (0: the model's max)
        self.model_min_pixels = model_min_pixels  # the processor's smallest image
        self.context_length = context_length  # tokens (0: images are not counted before)
        self.metrics = metrics
        self.decode_memory = DecodeMemory(limits.image_decode_memory_bytes)
        self.downloads = Slots(limits.max_concurrent_downloads, limits.slot_timeout_s)
        # Decoding and building inputs are bounded in number too (each request's by its caps
        # and timeouts), so a burst cannot spend the CPU preparing requests the engine's queue
        # will then refuse; a download never holds one of these (see downloaded).
        self.preprocessing = Slots(limits.max_concurrent_preprocessing, limits.slot_timeout_s)

    def slots(self) -> dict[str, Slots]:
        """The slots requests wait for before the engine's queue, by name (/health, /metrics)."""
        return {"downloads": self.downloads, "preprocessing": self.preprocessing}

    def check_counts(self, messages: list[ChatMessage]) -> MediaBudget:
        for kind, name, limit in (
            (ImagePart, "images", self.limits.max_images_per_request),
            (VideoPart, "videos", self.limits.max_videos_per_request),
        ):
            _check_count(len(parts_of(messages, kind)), name, limit)
        return MediaBudget(self.limits.max_media_bytes_per_request)

    async def images(
        self, messages: list[ChatMessage], budget: MediaBudget, whole: bool = True
    ) -> list[Image.Image]:
        """Fetched together, then (if their headers' sizes fit the context) decoded together.
        Awaited in order, so that of several bad images the error names the first (not
        whichever failed soonest), and the rest are cancelled. whole false: a prompt only
        counted (or to be shortened), which may hold CONTEXTS_TOKENIZED contexts' images."""
        parts = parts_of(messages, ImagePart)
        fetched = await _in_order([self._fetch_image(part) for part in parts])
        for part, media in zip(parts, fetched, strict=True):  # (in order: the part it names)
            budget.spend(media.size, part.param)
        return await self._decoded(parts, [f.data for f in fetched], whole)

    async def _decoded(
        self, parts: list[ImagePart], datas: list[bytes], whole: bool = True
    ) -> list[Image.Image]:
        """The images' bytes decoded together, once their headers' sizes fit the context."""
        sizes = await asyncio.to_thread(lambda: [header_size(data) for data in datas])
        self._check_tokens(parts, sizes, whole)
        images = await _in_order(
            [
                self._decode(part, data, size)
                for part, data, size in zip(parts, datas, sizes, strict=True)
            ]
        )
        self.metrics.images.inc(len(images))
        return images

    def _check_tokens(
        self, parts: list[ImagePart], sizes: list[tuple[int, int] | None], whole: bool
    ) -> None:
        """Images whose tokens alone overflow the context are refused before any is decoded
        (a few 64-megapixel PNGs took a minute of decoding, then the same 400)."""
        if not self.context_length:
            return
        counts = [
            0 if size is None else visual_tokens(size, self._pixel_range(part), self.token_side)
            for part, size in zip(parts, sizes, strict=True)
        ]
        context = f"this model's {self.context_length}-token context"
        if not whole:  # (counted: as long as a text prompt to count may be)
            context = f"{CONTEXTS_TOKENIZED} times {context}"
        if sum(counts) <= (most := self.context_length * (1 if whole else CONTEXTS_TOKENIZED)):
            return
        for part, count in zip(parts, counts, strict=True):
            if count > most:  # (one that cannot fit by itself: named, and what would help)
                raise PromptTooLong(
                    f"The image at {part.param} alone is {count} tokens, more than {context}: "
                    "send it smaller, or with detail low or auto.",
                    count,
                    most,
                    built=False,
                    param=part.param,
                )
        raise PromptTooLong(
            f"The images alone are {sum(counts)} tokens, more than {context}.",
            sum(counts),
            most,
            built=False,
        )

    async def check_ahead(self, messages: list[ChatMessage], budget: MediaBudget) -> None:
        """For what runs later (a job, a conversation's later responses), what can be refused
        now rather than fail then: media URLs no fetch could read (a scheme not read here, a
        host the rules refuse as written: MediaFetcher.check_ahead), and the images that need
        no download (data: URIs, uploaded files by id), read as a request reads them. Images
        by URL are read when it runs (a download can take long, and what it finds can
        change). The images in a preprocessing slot, as a request reads them (a burst of
        async requests is bounded as a burst of requests is)."""
        for part in [*parts_of(messages, ImagePart), *parts_of(messages, VideoPart)]:
            if part.url:  # (not an uploaded file)
                kind = "video" if isinstance(part, VideoPart) else "image"
                if isinstance(part, ImagePart) and part.or_video is not None:
                    kind = "media"  # (either, as its fetch names it)
                self.fetcher.check_ahead(part.url, kind, part.param)
        inline = [part for part in parts_of(messages, ImagePart) if _is_inline(part)]
        # (an image_url that may be a video, sent as a data: URI naming no type: its bytes say)
        undeclared = [
            part
            for part in parts_of(messages, ImagePart)
            if part.or_video is not None and is_data_uri(part.url)
        ]
        if not inline and not undeclared:
            return
        async with self.preprocessing:
            for part in inline:
                await self._read_image(part, budget)
            for part in undeclared:
                await self._read_if_image(part, budget)

    async def _read_if_image(self, part: ImagePart, budget: MediaBudget) -> None:
        """An inline image_url that may be a video, read if its first bytes are an image's
        (another image format, or an image cut short, is a 400 now); a video is read when it
        runs (not decoded here only to be judged)."""
        if judged_kind(data_uri_head(part.url, part.param), part.param) != "image":
            return
        fetched = await self.fetch_unknown(part.url, part.param)
        try:
            await self.fetched_image(part, fetched, budget)
        finally:
            fetched.discard()

    async def _read_image(self, part: ImagePart, budget: MediaBudget) -> Image.Image:
        fetched = await self._fetch_image(part)
        budget.spend(fetched.size, part.param)
        size = await asyncio.to_thread(header_size, fetched.data)
        return await self._decode(part, fetched.data, size)

    async def fetch_unknown(self, url: str, param: str, spend: Spend | None = None) -> FetchedMedia:
        """Media whose URL names neither an image nor a video (a signed link, a file named
        `clip`), downloaded once (spooled, up to the larger limit): the caller judges it by
        its first bytes, then reads it with fetched_image or video (and discards it)."""
        max_bytes = max(self.limits.max_video_bytes, self.limits.max_image_bytes)
        return await self.fetcher.fetch(
            url,
            max_bytes=max_bytes,
            kind="media",
            param=param,
            spool_dir=self.spool_dir,
            spend=spend,
        )

    async def fetched_image(
        self, part: ImagePart, fetched: FetchedMedia, budget: MediaBudget
    ) -> Image.Image:
        """An image fetch_unknown brought, read as `images` reads one."""
        data = await asyncio.to_thread(
            fetched.content, self.limits.max_image_bytes, "image", part.param
        )
        budget.spend(len(data), part.param)
        (image,) = await self._decoded([part], [data])
        return image

    async def judged(
        self, messages: list[ChatMessage], allowance: MediaBudget | None = None
    ) -> list[ChatMessage]:
        """The image parts that may be videos (or_video: the Animus contract's image_url),
        downloaded once and judged by their first bytes: an image, or else a video. A few at a
        time, the request's media bytes charged as they arrive (each download may be a
        video's size: sixteen unchecked were gigabytes) and its video count checked as each
        is judged. Each carries its download (fetched), which reading it discards; forget
        discards those an error left unread, and an error (a cancel too) here those
        downloaded so far."""
        parts = [part for part in parts_of(messages, ImagePart) if part.or_video is not None]
        if not parts:
            return messages
        allowance = allowance or MediaBudget(self.limits.max_media_bytes_per_request)
        num_videos = len(parts_of(messages, VideoPart))
        downloads: list[FetchedMedia] = []
        at_once = asyncio.Semaphore(JUDGED_AT_ONCE)

        async def judge(part: ImagePart, frames: FrameRequest) -> ImagePart | VideoPart:
            nonlocal num_videos
            async with at_once:
                spend = partial(allowance.spend, param=part.param)
                media = await self.fetch_unknown(part.url, part.param, spend)
                downloads.append(media)  # (before any await: a cancel cannot lose it)
            head = await asyncio.to_thread(media.head, part.param, 64)
            kind = judged_kind(head, part.param)
            if kind == "image":
                return replace(part, or_video=None, fetched=media)
            num_videos += 1
            _check_count(num_videos, "videos", self.limits.max_videos_per_request)
            return VideoPart(part.url, frames, part.param, kind == "neither", media)

        try:
            judged = await _failing_fast([judge(part, part.or_video) for part in parts])
        except BaseException:
            for media in downloads:
                media.discard()
            raise
        by_part = {id(part): made for part, made in zip(parts, judged, strict=True)}
        return with_parts(messages, lambda part: by_part.get(id(part), part))

    async def downloaded(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """The request's media by http(s) URL downloaded (and the parts that may be videos
        judged) before the request takes a preprocessing slot: a host that stalls holds one of
        the download slots, not one of the few that decode (eight stalling URLs kept every
        request waiting, those with inline images too). Returns holding the preprocessing slot
        (the caller gives it back), taken before the download slot is given back: requests
        whose downloads wait on disk for a slot stay as many as the download slots. Each part
        carries its download (fetched, spooled to a file), charged against the request's
        bytes as it arrives; an error (a cancel too) discards them."""
        remote = [
            part
            for part in [*parts_of(messages, ImagePart), *parts_of(messages, VideoPart)]
            if part.fetched is None
            and _is_remote(part.url)
            and getattr(part, "or_video", None) is None
        ]
        judging = any(part.or_video is not None for part in parts_of(messages, ImagePart))
        if not remote and not judging:
            await self.preprocessing.take()
            return messages
        allowance = MediaBudget(self.limits.max_media_bytes_per_request)
        downloads: list[FetchedMedia] = []
        try:
            async with self.downloading():  # (the inline check too: bursts of it bounded)
                await self._check_inline_headers(messages)
                messages = await self.judged(messages, allowance)
                # (the first to fail stops the rest: a 404 is not held behind a slow host)
                downloading = [self._download(p, allowance, downloads) for p in remote]
                fetched = await _failing_fast(downloading)
                by_part = {
                    id(part): replace(part, fetched=f)
                    for part, f in zip(remote, fetched, strict=True)
                }
                messages = with_parts(messages, lambda part: by_part.get(id(part), part))
        except BaseException:  # (those done too: their parts may not be in the messages)
            self.forget(messages)
            for media in downloads:
                media.discard()
            raise
        return messages

    async def _check_inline_headers(self, messages: list[ChatMessage]) -> None:
        """An inline image (data: URI, uploaded file) whose header cannot be read is a 400
        before any download starts, not once a slow host's download has ended. (Read again
        when decoded: this is only its header.)"""
        for part in parts_of(messages, ImagePart):
            if part.fetched is not None or part.or_video is not None or not _is_inline(part):
                continue
            fetched = await self._fetch_image(part)
            if await asyncio.to_thread(header_size, fetched.data) is None:
                await self._decode(part, fetched.data, None)  # (raises, saying why)

    @contextlib.asynccontextmanager
    async def downloading(self) -> AsyncIterator[None]:
        """A download slot while the body downloads, then a preprocessing slot, taken before
        the download slot is given back: the requests whose downloads wait on disk stay as many
        as the download slots. On leaving normally the caller holds the preprocessing slot (and
        gives it back); an error in the body takes none."""
        async with self.downloads:
            yield
            await self.preprocessing.take()

    async def _download(
        self, part: ImagePart | VideoPart, allowance: MediaBudget, downloads: list[FetchedMedia]
    ) -> FetchedMedia:
        is_image = isinstance(part, ImagePart)
        media = await self.fetcher.fetch(
            part.url,
            max_bytes=self.limits.max_image_bytes if is_image else self.limits.max_video_bytes,
            kind="image" if is_image else "video",
            param=part.param,
            spool_dir=self.spool_dir,
            spend=partial(allowance.spend, param=part.param),
        )
        downloads.append(media)  # (before any await: a cancel cannot lose it)
        return media

    @staticmethod
    def forget(messages: list[ChatMessage]) -> None:
        """Discards the downloads its parts still carry (a request that failed, or was
        answered, before reading them all)."""
        for part in [*parts_of(messages, ImagePart), *parts_of(messages, VideoPart)]:
            if part.fetched is not None:
                part.fetched.discard()

    async def _fetch_image(self, part: ImagePart) -> FetchedMedia:
        max_bytes = self.limits.max_image_bytes
        if part.fetched is not None:  # (judged: downloaded already)
            try:
                data = await asyncio.to_thread(part.fetched.content, max_bytes, "image", part.param)
            finally:
                part.fetched.discard()
            fetched = FetchedMedia(data, part.fetched.mime_type, size=len(data))
        elif part.file_id is not None:
            fetched = await self.fetcher.fetch_upload(
                part.file_id, max_bytes=max_bytes, kind="image", param=part.param
            )
        else:
            fetched = await self.fetcher.fetch(
                part.url, max_bytes=max_bytes, kind="image", param=part.param
            )
        return fetched

    def _pixel_range(self, part: ImagePart) -> tuple[int, int]:
        pixels = (part.min_pixels, part.max_pixels)
        return pixel_range(
            part.detail,
            self.model_max_pixels,
            self.token_side,
            self.model_min_pixels,
            pixels,
            self.auto_image_tokens,
        )

    async def _decode(
        self, part: ImagePart, data: bytes, size: tuple[int, int] | None
    ) -> Image.Image:
        pixels = self._pixel_range(part)
        return await self.decode_memory.run(
            decoded_bytes(decoded_size(data, size, pixels, self.token_side)),
            lambda: load_image(data, pixels, param=part.param, side=self.token_side),
        )

    async def video(
        self,
        part: VideoPart,
        budget: MediaBudget,
        tokens: TokenBudget,
        frames: FrameRequest,
        fetched: FetchedMedia | None = None,
    ) -> DecodedVideo:
        """fetched: brought already (fetch_unknown); discarded here either way."""
        fetched = fetched or part.fetched
        if fetched is None:
            fetched = await self.fetcher.fetch(
                part.url,
                max_bytes=self.limits.max_video_bytes,
                kind="video",
                param=part.param,
                spool_dir=self.spool_dir,
            )
        elif fetched.size > self.limits.max_video_bytes:
            fetched.discard()
            raise too_large("video", self.limits.max_video_bytes, part.param)
        try:
            budget.spend(fetched.size, part.param)
            if fetched.image_frames:  # a video sent as its frames (vLLM's JPEG data URL)
                # (in this process, a frame at a time: under the images' decode memory, as an
                # image of its largest frame's size; four requests of 8K frames took 2 GB)
                images = fetched.image_frames
                largest = await asyncio.to_thread(  # (up to 3,600 headers: off the loop)
                    lambda: max(decoded_bytes(header_size(image)) for image in images)
                )
                decoded = await self.decode_memory.run(
                    largest,
                    partial(
                        decode_image_frames,
                        images,
                        tokens,
                        frames,
                        self.decoder.max_fps,
                        part.param,
                        fetched.frames_fps,
                    ),
                )
            else:
                source = str(fetched.path) if fetched.path is not None else fetched.data
                decoded = await self.decoder.decode(source, tokens, frames)
        except VideoNoRoom as exc:  # (readable: the prompt and max_tokens leave no room)
            raise InvalidRequest(
                f"The video at {part.param} cannot be used: {exc}.",
                param=part.param,
                code="context_length_exceeded",
            ) from None
        except VideoDecodeError as exc:
            if part.or_image:  # (judged a video only for not being an image)
                raise MediaError(
                    f"The media at {part.param} is neither an image this server reads "
                    f"({IMAGE_FORMATS}) nor a video it can use: {exc}.",
                    param=part.param,
                ) from None
            raise MediaError(
                f"The video at {part.param} cannot be used: {exc}.", param=part.param
            ) from None
        finally:
            fetched.discard()
        self.metrics.video_frames.inc(decoded.plan.num_frames)
        return decoded


def _is_inline(part: ImagePart) -> bool:
    """An image that needs no download: a data: URI, or an uploaded file by id (not one that
    may be a video: its bytes are judged first)."""
    return part.or_video is None and (part.file_id is not None or is_data_uri(part.url))


def _is_remote(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


def _check_count(count: int, name: str, limit: int) -> None:
    if count > limit:
        raise InvalidRequest(
            f"{count} {name} in one request; this server's limit is {limit} "
            f"(--max-{name}-per-request).",
            param="messages",
            code=f"too_many_{name}",
        )


async def _failing_fast(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run together; the first to fail stops the rest (cancelled, their errors read), and
    its error is raised: the download that went past the request's bytes, or the video past
    its count, not one still waiting on a slow host."""
    if not coroutines:
        return []
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and (error := task.exception()) is not None:
                raise error
        return [task.result() for task in tasks]  # (all done: none failed)
    finally:
        await _stopped(tasks)


async def _in_order(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run together, awaited in order: the first failure (in order) is raised, and the rest
    are cancelled (their errors read, not lost)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return [await task for task in tasks]
    finally:
        await _stopped(tasks)


async def _stopped(tasks: list[asyncio.Future[Any]]) -> None:
    """The unfinished cancelled, and every one's end read (an error not lost as unread)."""
    for task in tasks:
        task.cancel()  # (the finished ones are left as they are)
    await asyncio.gather(*tasks, return_exceptions=True)
