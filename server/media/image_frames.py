"""Videos sent as their frames: vLLM's video data URL, `data:video/jpeg;base64,<jpeg>,<jpeg>,...`
(what its `encode_video_url` produces), or DashScope's list of frames (message_params.py makes it
one such URL). The frame planner picks among the given frames as it would among a file's, and only
the planned ones are decoded: JPEG (PNG and WebP too, as a list's frames may be), each at most
MAX_FRAME_PIXELS, decoded at a reduced scale where JPEG allows (draft mode) and resized at
once, so memory stays near the output frames. Blocking: run it in a thread."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
from PIL import Image, UnidentifiedImageError

from server.exceptions import MediaError
from server.media.frames import (
    FRAME_FACTOR,
    FramePlan,
    FrameRequest,
    PlanError,
    TokenBudget,
    VideoInfo,
    frame_ceiling,
    plan_frames,
)
from server.media.image import bomb_size
from server.media.video import MAX_FRAME_PIXELS, DecodedVideo, plan_error

# A URL that does not say its rate (";fps=N"): the frames are taken as one a second.
ASSUMED_FPS = 1.0
FRAME_FORMATS = ["JPEG", "PNG", "WEBP"]
FRAME_TYPES = ("image/jpeg", "image/jpg", "image/png", "image/webp")  # (a frame list's)
NOT_A_FRAME = "is not a JPEG, PNG or WebP image"


def decode_image_frames(
    frames: tuple[bytes, ...],
    budget: TokenBudget,
    request: FrameRequest,
    max_fps: float,
    param: str,
    fps: float | None = None,
) -> DecodedVideo:
    """The frames as a video taken at `fps` (ASSUMED_FPS where the URL did not say), frame i
    at i/fps seconds. The client chose them: a rate above the server's ceiling drops none
    (the frame and token ceilings still hold), as qwen-vl-utils reads a list of frames."""
    # Every frame's header read (cheap), not only the planned ones': a frame that is no JPEG
    # is the request's 400 whichever frames the plan would have taken.
    width, height = [_open(frame, param).size for frame in frames][0]
    fps = fps or ASSUMED_FPS
    max_fps = max(max_fps, fps)
    info = VideoInfo(len(frames) / fps, fps, len(frames), width, height)
    request = replace(request, use_scenes=False)  # (scenes are read from a stream)
    try:
        plan = _every_frame(
            plan_frames(info, budget, request, max_fps), info, budget, request, max_fps
        )
    except PlanError as exc:
        raise plan_error(exc) from None
    plan = replace(plan, timestamps=_own_times(plan.frame_indices, info))
    size = (plan.width, plan.height)
    array = np.stack([_decode(frames[i], size, param) for i in plan.frame_indices])
    return DecodedVideo(info, plan, array, "jpeg-frames")


def _every_frame(
    plan: FramePlan, info: VideoInfo, budget: TokenBudget, request: FrameRequest, max_fps: float
) -> FramePlan:
    """Every one of an odd number of frames the ceilings allow, the last repeated, as Qwen's
    processor pads them, where that fits: the plan's even count left one out (of 3 frames
    the middle one), which the client chose to send."""
    count = info.num_frames
    if request.mode != "native" or count % FRAME_FACTOR == 0 or plan.num_frames != count - 1:
        return plan
    if frame_ceiling(info, request, max_fps) < count:
        return plan
    indices = (*range(count), count - 1)
    tokens = budget.native_tokens(len(indices), plan.width, plan.height)
    if tokens > budget.video_room:
        return plan
    if (
        budget.max_video_pixels
        and len(indices) * plan.width * plan.height > budget.max_video_pixels
    ):
        return plan  # (Qwen3-VL's processor would shrink frames past its total: not planned)
    # total_pixels: frames sized to the even count's share of it are not padded past it (frames
    # at the least size, which the share fell under, are that size whatever the count)
    pixels, total = plan.width * plan.height, (request.total_pixels or 0) * FRAME_FACTOR
    if total and plan.num_frames * pixels <= total < len(indices) * pixels:
        return plan
    return FramePlan(indices, _own_times(indices, info), plan.width, plan.height, tokens)


def _own_times(indices: tuple[int, ...], info: VideoInfo) -> tuple[float, ...]:
    """The frames' own times (as a file's decoded frames report theirs), not the middles of
    the spans they were picked in: Qwen3-VL reads them in its prompt."""
    return tuple(i / info.fps for i in indices)


def _open(data: bytes, param: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=FRAME_FORMATS)
    except Image.DecompressionBombError as exc:  # (Pillow's own limit, met while opening)
        raise _too_large(param, bomb_size(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise MediaError(f"A frame of the video at {param} {NOT_A_FRAME}.", param=param) from None
    if image.width * image.height > MAX_FRAME_PIXELS:
        raise _too_large(param, f"{image.width}x{image.height}")
    return image


def _too_large(param: str, size: str) -> MediaError:
    return MediaError(
        f"A frame of the video at {param} is {size}, above {MAX_FRAME_PIXELS} pixels.",
        param=param,
        code="media_too_large",
    )


def _decode(data: bytes, size: tuple[int, int], param: str) -> np.ndarray:
    image = _open(data, param)
    try:
        image.draft("RGB", size)  # JPEG decodes at 1/2, 1/4 or 1/8 scale when that suffices
        return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BICUBIC))
    except (OSError, ValueError):
        raise MediaError(
            f"A frame of the video at {param} {NOT_A_FRAME} that can be read.", param=param
        ) from None
