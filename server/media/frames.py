"""Frame planning: which frames of a video to read, and at what resolution, so that the
answer fits the model's context. Pure functions; no decoding here.

Two ways to use a video (see pipelines):

native    the frames go to the model as one video input. Frames are grouped in temporal patches
          of FRAME_FACTOR (2), and each patch of h x w pixels costs (h/s) * (w/s) tokens, s the
          side of one visual token (28 px for Qwen2-VL and 2.5-VL, 32 for Qwen3-VL, which also
          writes a timestamp before each patch: TokenBudget.per_patch_tokens), so video tokens =
          N/2 * ((h/s) * (w/s) + per_patch_tokens). Resolution is lowered first (down to
          VIDEO_MIN_TOKENS tokens a patch), then the frame count.
captions  every frame is captioned on its own (about caption_tokens each), and the question is
          answered over the timestamped captions: N * caption_tokens + prompt + answer must fit.
frames    every frame is analysed as a request of its own (media categories): as many frames as
          the ceilings allow, each frame + prompt + answer fitting the context by itself.

Always at most MAX_FRAMES (60) frames and at most the requested / server fps; a request's fps,
max_frames and max_pixels can only lower the server's ceilings, never raise them; its min_pixels
enlarges smaller frames (qwen-vl-utils' meaning), within the pixel ceiling. Either one under the
processor's least video frame is taken as given, as Qwen's processor reads it (request_least).
Frames are spread uniformly: frame i is taken at the middle of the i-th of N equal segments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

VideoMode = Literal["native", "captions", "frames"]

MAX_FRAMES = 60  # the Animus contract: at most 60 frames per video
# Qwen's processors refuse an image or frame longer than this times its width (or the reverse)
MAX_ASPECT_RATIO = 200
FRAME_FACTOR = 2  # Qwen2-VL's temporal patch: native frame counts are even
TOKEN_SIDE = 28  # Qwen2-VL's: 14-pixel patches merged 2 x 2 (Qwen3-VL: 16 x 2 = 32)
PIXELS_PER_TOKEN = TOKEN_SIDE * TOKEN_SIDE
# In tokens per frame (times the family's pixels per token): Qwen2-VL's video processor defaults.
VIDEO_MIN_TOKENS = 128
VIDEO_MAX_TOKENS = 768
CAPTION_FRAME_MAX_TOKENS = 256  # a captioned frame is a "low detail" image
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKENS * PIXELS_PER_TOKEN
CAPTION_FRAME_MAX_PIXELS = CAPTION_FRAME_MAX_TOKENS * PIXELS_PER_TOKEN
DEFAULT_FPS = 2.0  # sample at most 2 frames per second of video (qwen-vl-utils' default)
DEFAULT_CAPTION_TOKENS = 256
VISION_WRAPPER_TOKENS = 2  # <|vision_start|> ... <|vision_end|>
# Captions mode: each caption's line ("[12.34 s] ...\n") and the header around them, for a
# video under 100 s; Qwen's tokenizers write each digit as a token, so longer ones take more
# (caption_tokens_around).
CAPTION_LINE_TOKENS = 12
CAPTIONS_HEADER_TOKENS = 24


def caption_tokens_around(duration_s: float) -> tuple[int, int]:
    """(tokens of each caption's line beyond the caption, of the header): the times' digits
    past 99.99 s added (a day-long video's "[86399.50 s]" took 16, and its prompt passed the
    context it was planned for: a context_length_exceeded naming the request's messages)."""
    extra = max(len(f"{duration_s:.2f}") - len("12.34"), 0)
    return CAPTION_LINE_TOKENS + extra, CAPTIONS_HEADER_TOKENS + extra


class PlanError(ValueError):
    """The video cannot be planned within the limits (the message says why)."""


class NoRoom(PlanError):
    """Not even the smallest plan fits the context beside the prompt and the answer."""


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float
    fps: float
    num_frames: int
    width: int  # as displayed: a phone's portrait video, stored sideways, is taller than wide
    height: int
    rotation: int = 0  # degrees counter-clockwise the stored frames are turned for display
    header_duration_s: float = 0.0  # what the container's header claims (0: nothing)


@dataclass(frozen=True)
class FrameRequest:
    """Per-request wishes; each only lowers the server's ceiling."""

    mode: VideoMode = "native"
    fps: float | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    # qwen-vl-utils' total_pixels: all a native video's frames together, read as it reads it (a
    # ceiling on each frame of total_pixels / frames x FRAME_FACTOR, never under 1.05 times
    # the least frame)
    total_pixels: int | None = None
    use_scenes: bool = False  # one frame per detected scene (media/scenes.py), within the budget


@dataclass(frozen=True)
class TokenBudget:
    context_length: int
    prompt_tokens: int  # the text of the prompt, without the video
    max_tokens: int  # the answer
    caption_tokens: int = DEFAULT_CAPTION_TOKENS
    token_side: int = TOKEN_SIDE  # pixels along one side of a visual token
    per_patch_tokens: int = 0  # text tokens a native temporal patch adds (Qwen3-VL's timestamp)
    # Pixels of all a native video's frames together that the processor allows (Qwen3-VL's
    # video processor shrinks frames beyond it); 0: a limit per frame only.
    max_video_pixels: int = 0
    # The processors' least frame (video) and image (a captioned or analysed frame): frames are
    # planned no smaller (a video's unless the request's range goes under it: request_least),
    # as the checkpoint's processor would enlarge a smaller one.
    min_video_pixels: int = 0
    min_image_pixels: int = 0

    @property
    def pixels_per_token(self) -> int:
        return self.token_side * self.token_side

    @property
    def video_room(self) -> int:
        """Tokens the video may take: what the prompt and the answer leave, its wrapper out."""
        return self.context_length - self.prompt_tokens - self.max_tokens - VISION_WRAPPER_TOKENS

    def native_tokens(self, num_frames: int, width: int, height: int) -> int:
        """A native video's tokens: its temporal patches' (and Qwen3-VL's timestamps)."""
        per_patch = tokens_per_patch(width, height, self.token_side) + self.per_patch_tokens
        return num_frames // FRAME_FACTOR * per_patch


@dataclass(frozen=True)
class FramePlan:
    frame_indices: tuple[int, ...]
    timestamps: tuple[float, ...]
    width: int  # every frame is resized to width x height (multiples of the token side)
    height: int
    video_tokens: int  # native: tokens of the video input; captions: N * caption_tokens

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """Qwen's resize rule (same as transformers' and qwen-vl-utils'), kept here so the video
    worker process need not import transformers: both sides multiples of `factor`, area within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def uniform_timestamps(duration_s: float, count: int) -> list[float]:
    """The middle of each of `count` equal segments of the video."""
    return [(i + 0.5) * duration_s / count for i in range(count)]


def frame_indices(timestamps: list[float], info: VideoInfo) -> tuple[int, ...]:
    last = max(info.num_frames - 1, 0)
    return tuple(min(last, max(0, int(t * info.fps))) for t in timestamps)


def frame_ceiling(info: VideoInfo, request: FrameRequest, server_fps: float) -> int:
    """At most MAX_FRAMES, the request's max_frames, fps x duration and the frames there are."""
    fps = min(request.fps or server_fps, server_fps)
    by_rate = max(1, math.floor(info.duration_s * fps))
    wished = request.max_frames or MAX_FRAMES
    return max(1, min(MAX_FRAMES, wished, by_rate, max(info.num_frames, 1)))


def request_least(request: FrameRequest, least: int) -> int:
    """The processor's least frame, unless the request's range goes under it: as Qwen's
    processor reads a range (vLLM's mm_processor_kwargs), the request's min_pixels replaces
    it and its max_pixels wins over it (1280x720 at max_pixels 50,000 is 280x140 there, not
    enlarged to the 100,352 least). The server's processor is given a one-token minimum for
    videos (engine/inputs.py), so it keeps such frames as planned."""
    asked = (request.min_pixels, request.max_pixels)
    return 0 if any(pixels and pixels < least for pixels in asked) else least


def pixel_range(
    request: FrameRequest, ceiling_tokens: int, side: int, least: int = 0
) -> tuple[int, int]:
    """Frames of VIDEO_MIN_TOKENS to ceiling_tokens; a request's max_pixels lowers both, down
    to `least` (the processor's own minimum where the processor would enlarge a smaller frame
    to it: a plan that counted fewer tokens a frame wrote a longer prompt than it planned),
    and one token at least."""
    ceiling = ceiling_tokens * side * side
    least = min(max(least, side * side), ceiling)
    max_pixels = max(min(request.max_pixels or ceiling, ceiling), least)
    floor = min(VIDEO_MIN_TOKENS * side * side, max_pixels)
    min_pixels = min(max(request.min_pixels or floor, least), max_pixels)
    return min_pixels, max_pixels


def resized(
    info: VideoInfo,
    min_pixels: int,
    max_pixels: int,
    side: int,
    least: int = 0,
    within_max: bool = False,
) -> tuple[int, int]:
    """Qwen's resize of a frame, to a size the processor keeps as it is (it resizes again:
    what it changed, the plan would have counted wrong). Up to min_pixels the sides are
    rounded up, which can pass max_pixels (min_pixels = max_pixels), which the processor would
    shrink: so does this. Under max_pixels they are rounded down, which can leave less than
    `least`, the processor's minimum, which an image's processor enlarges to: so does this
    (a video's, given a one-token minimum, keeps it: within_max, enlarged only where that
    stays within max_pixels, as Qwen's processor resizes a video's frames once, a 640x360
    one at max_pixels 110,000 to 420x224, not 448x252 past the range). And the long side is
    cut back to MAX_ASPECT_RATIO times the short one, which the processor refuses past (a
    2x1000 video, enlarged to the least size, was 28x7084: a 500)."""
    height, width = smart_resize(
        info.height, info.width, factor=side, min_pixels=min_pixels, max_pixels=max_pixels
    )
    if width * height > max_pixels:
        height, width = smart_resize(height, width, side, least, max_pixels)
    if width * height < least:
        enlarged = smart_resize(height, width, side, least, max(max_pixels, least))
        if not within_max or enlarged[0] * enlarged[1] <= max_pixels:
            height, width = enlarged
    longest = MAX_ASPECT_RATIO * min(width, height) // side * side
    return min(width, longest), min(height, longest)


def tokens_per_patch(width: int, height: int, side: int = TOKEN_SIDE) -> int:
    return (width // side) * (height // side)


def plan_frames(
    info: VideoInfo,
    budget: TokenBudget,
    request: FrameRequest,
    server_fps: float = DEFAULT_FPS,
) -> FramePlan:
    if info.duration_s <= 0 or info.num_frames <= 0 or min(info.width, info.height) <= 0:
        raise PlanError("the video has no frames")
    available = budget.video_room
    ceiling = frame_ceiling(info, request, server_fps)
    if request.mode == "captions":
        return _plan_captions(info, budget, request, available, ceiling)
    if request.mode == "frames":
        return _plan_frames(info, budget, request, available, ceiling)
    return _plan_native(info, budget, request, available, ceiling)


def _plan_native(
    info: VideoInfo, budget: TokenBudget, request: FrameRequest, available: int, ceiling: int
) -> FramePlan:
    side, extra = budget.token_side, budget.per_patch_tokens
    count = max(FRAME_FACTOR, ceiling - ceiling % FRAME_FACTOR)
    patches = count // FRAME_FACTOR
    least = budget.min_video_pixels
    if budget.max_video_pixels:  # (Qwen3-VL's least and most are of all frames together)
        least = min(-(-least // count), max(budget.max_video_pixels // count, side * side))
    least = request_least(request, least)
    min_pixels, max_pixels = pixel_range(request, VIDEO_MAX_TOKENS, side, least)
    if budget.max_video_pixels:
        max_pixels = max(min(max_pixels, budget.max_video_pixels // count), side * side)
        min_pixels = min(min_pixels, max_pixels)
    if request.total_pixels:
        share = max(request.total_pixels * FRAME_FACTOR // count, int(min_pixels * 1.05))
        max_pixels = min(max_pixels, share)
        min_pixels = min(min_pixels, max_pixels)
    width, height = resized(info, min_pixels, max_pixels, side, least, within_max=True)
    if patches * (tokens_per_patch(width, height, side) + extra) > available:
        # Lower the resolution first: spread what is available over the patches.
        affordable = max(available // patches - extra, 1) * side * side
        ceiling_pixels = max(min_pixels, min(max_pixels, affordable))
        width, height = resized(info, min_pixels, ceiling_pixels, side, least, within_max=True)
    per_patch = tokens_per_patch(width, height, side) + extra
    if patches * per_patch > available:
        # Then fewer frames at the lowest resolution.
        patches = available // per_patch
        if patches < 1:
            raise NoRoom(
                "the video does not fit the model's context even at the lowest resolution; "
                "shorten the prompt or max_tokens"
            )
        count = patches * FRAME_FACTOR
    return _uniform(info, count, width, height, patches * per_patch)


def _plan_captions(
    info: VideoInfo, budget: TokenBudget, request: FrameRequest, available: int, ceiling: int
) -> FramePlan:
    line, header = caption_tokens_around(info.duration_s)
    per_frame = budget.caption_tokens + line
    count = min(ceiling, (available - header) // per_frame)
    if count < 1:
        raise NoRoom("no frame caption fits the model's context; shorten the prompt or max_tokens")
    width, height = _image_frame_size(info, request, budget)
    return _uniform(info, count, width, height, count * per_frame + header)


def _plan_frames(
    info: VideoInfo, budget: TokenBudget, request: FrameRequest, available: int, ceiling: int
) -> FramePlan:
    side = budget.token_side
    width, height = _image_frame_size(info, request, budget)
    if frame_tokens(width, height, side) > available:
        raise NoRoom("a video frame does not fit the model's context next to the prompt")
    return _uniform(info, ceiling, width, height, ceiling * frame_tokens(width, height, side))


def _image_frame_size(
    info: VideoInfo, request: FrameRequest, budget: TokenBudget
) -> tuple[int, int]:
    """Captioned or analysed frames are read as images of "low detail" size."""
    side, least = budget.token_side, budget.min_image_pixels
    min_pixels, max_pixels = pixel_range(request, CAPTION_FRAME_MAX_TOKENS, side, least)
    return resized(info, min_pixels, max_pixels, side, least)


def _uniform(info: VideoInfo, count: int, width: int, height: int, tokens: int) -> FramePlan:
    """count frames spread uniformly over the video, all at width x height."""
    timestamps = uniform_timestamps(info.duration_s, count)
    return FramePlan(frame_indices(timestamps, info), tuple(timestamps), width, height, tokens)


def frame_tokens(width: int, height: int, side: int = TOKEN_SIDE) -> int:
    """Tokens of one frame read as an image (its own request)."""
    return (width // side) * (height // side) + VISION_WRAPPER_TOKENS


def at_timestamps(
    plan: FramePlan, timestamps: list[float], info: VideoInfo, budget: TokenBudget, mode: VideoMode
) -> FramePlan:
    """The same budget and resolution at other timestamps (e.g. one per scene; never more
    than the plan had). Native plans keep an even count by repeating the last frame."""
    timestamps = sorted(timestamps)[: plan.num_frames]
    if mode == "native" and len(timestamps) % FRAME_FACTOR:
        timestamps.append(timestamps[-1])
    side = budget.token_side
    if mode == "native":
        tokens = budget.native_tokens(len(timestamps), plan.width, plan.height)
    elif mode == "frames":
        tokens = len(timestamps) * frame_tokens(plan.width, plan.height, side)
    else:
        line, header = caption_tokens_around(info.duration_s)
        tokens = len(timestamps) * (budget.caption_tokens + line) + header
    return FramePlan(
        frame_indices(timestamps, info), tuple(timestamps), plan.width, plan.height, tokens
    )
