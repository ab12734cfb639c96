"""Videos sent as their frames: vLLM's video data URL, `data:video/jpeg;base64,<jpeg>,<jpeg>,...`
(what its `encode_video_url` produces). The frame planner picks among the given frames as it
would among a file's, and only the planned ones are decoded, with the image decoder's limits
(formats, decompression bombs). Blocking: run it in a thread."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image

from server.media.frames import FrameRequest, PlanError, TokenBudget, VideoInfo, plan_frames
from server.media.image import decode_image
from server.media.video import DecodedVideo, VideoDecodeError

# The URL carries no timing: the frames are taken as one a second.
ASSUMED_FPS = 1.0


def decode_image_frames(
    frames: tuple[bytes, ...],
    budget: TokenBudget,
    request: FrameRequest,
    max_fps: float,
    param: str,
) -> DecodedVideo:
    first = decode_image(frames[0], param=param)
    width, height = first.size
    info = VideoInfo(len(frames) / ASSUMED_FPS, ASSUMED_FPS, len(frames), width, height)
    try:
        # Scene detection reads a video stream; here every frame is already a choice.
        plan = plan_frames(info, budget, replace(request, use_scenes=False), max_fps)
    except PlanError as exc:
        raise VideoDecodeError(str(exc)) from None
    size = (plan.width, plan.height)
    images = [first if i == 0 else decode_image(frames[i], param=param) for i in plan.frame_indices]
    array = np.stack([np.asarray(image.resize(size, Image.Resampling.BICUBIC)) for image in images])
    return DecodedVideo(info, plan, array, "jpeg-frames")
