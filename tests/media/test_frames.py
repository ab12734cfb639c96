"""The frame planner: invariants over a grid of videos, budgets and requests, plus examples."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from server.media.frames import (
    CAPTION_FRAME_MAX_PIXELS,
    CAPTION_LINE_TOKENS,
    CAPTIONS_HEADER_TOKENS,
    MAX_FRAMES,
    VIDEO_MAX_PIXELS,
    VISION_WRAPPER_TOKENS,
    FrameRequest,
    PlanError,
    TokenBudget,
    VideoInfo,
    caption_tokens_around,
    plan_frames,
)

VIDEOS = [
    VideoInfo(duration, fps, max(1, int(duration * fps)), width, height)
    for duration, fps, (width, height) in itertools.product(
        [0.3, 1, 10, 60, 600, 3600],
        [12, 24, 30, 60],
        [(320, 240), (1280, 720), (1920, 1080), (3840, 2160), (100, 2000), (2, 1000), (4000, 10)],
    )
]
BUDGETS = [
    TokenBudget(context, prompt, answer)
    for context, prompt, answer in [
        (4096, 50, 256),
        (8192, 200, 1024),
        (32768, 100, 512),
        (2048, 100, 1500),
    ]
] + [  # the processors' least frame and image (the tiny checkpoint's: 128 and 4 tokens)
    TokenBudget(8192, 200, 1024, min_video_pixels=128 * 28 * 28, min_image_pixels=4 * 28 * 28),
    TokenBudget(4096, 50, 256, min_video_pixels=4 * 28 * 28, min_image_pixels=64 * 28 * 28),
    # Qwen3-VL's video processor: its least and most are of all frames together
    TokenBudget(8192, 200, 1024, max_video_pixels=786432, min_video_pixels=131072),
]
REQUESTS = [FrameRequest(mode) for mode in ("native", "captions")] + [
    FrameRequest("native", fps=100, max_frames=10_000, max_pixels=10**9),  # greedy client
    FrameRequest("native", fps=0.5, max_frames=8, min_pixels=28 * 28, max_pixels=200_000),
    FrameRequest("captions", max_frames=5),
    FrameRequest("native", max_pixels=784),  # below the processor's least: it wins (one token)
    FrameRequest("captions", max_pixels=1),
    FrameRequest("native", min_pixels=10**9),  # min_pixels = max_pixels: never past it
]


def check_plan(video: VideoInfo, budget: TokenBudget, request: FrameRequest) -> None:
    try:
        plan = plan_frames(video, budget, request)
    except PlanError:
        # Only when even the smallest plan cannot fit.
        room = budget.context_length - budget.prompt_tokens - budget.max_tokens
        if request.mode == "captions":
            smallest = budget.caption_tokens + CAPTION_LINE_TOKENS + CAPTIONS_HEADER_TOKENS
        else:  # one temporal patch at the lowest video resolution (or the request's least)
            smallest = 2 * min(max(request.min_pixels or 0, 128 * 28 * 28), VIDEO_MAX_PIXELS) // 784
        assert room - VISION_WRAPPER_TOKENS < smallest
        return
    n = plan.num_frames
    assert 1 <= n <= MAX_FRAMES
    assert n <= (request.max_frames or MAX_FRAMES)
    assert n <= max(1, int(video.duration_s * min(request.fps or 2.0, 2.0))) or n <= 2
    assert list(plan.frame_indices) == sorted(plan.frame_indices)
    assert all(0 <= i < video.num_frames for i in plan.frame_indices)
    assert all(0 <= t <= video.duration_s for t in plan.timestamps)
    assert plan.width % 28 == 0 and plan.height % 28 == 0
    # (the processor refuses a frame past 200:1, and enlarges one under its least size)
    assert max(plan.width, plan.height) <= 200 * min(plan.width, plan.height)
    least = budget.min_video_pixels if request.mode == "native" else budget.min_image_pixels
    if request.mode == "native" and budget.max_video_pixels:
        least = min(-(-least // n), budget.max_video_pixels // n)
        strip = max(plan.width, plan.height) > 4 * min(plan.width, plan.height)
        assert strip or n * plan.width * plan.height <= budget.max_video_pixels
    asked = (request.min_pixels, request.max_pixels)
    if request.mode == "native" and any(p and p < least for p in asked):
        least = 28 * 28  # (a video's range under the least: as Qwen's processor reads it)
    assert plan.width * plan.height >= least
    used = budget.prompt_tokens + budget.max_tokens + VISION_WRAPPER_TOKENS + plan.video_tokens
    assert used <= budget.context_length
    if request.mode == "native":
        assert n % 2 == 0
        assert plan.video_tokens == n // 2 * (plan.width // 28) * (plan.height // 28)
        assert plan.width * plan.height <= VIDEO_MAX_PIXELS
        if request.max_pixels and max(video.width, video.height) <= 4 * min(
            video.width, video.height
        ):  # (a strip's short side cannot go under one token: its area may pass max_pixels)
            # (down to the processor's least, which its rounding up may pass by a row)
            floor = max(request.min_pixels or 0, budget.min_video_pixels, 28 * 28)
            assert plan.width * plan.height <= max(request.max_pixels, floor * 1.5)
    else:
        line, header = caption_tokens_around(video.duration_s)
        assert plan.video_tokens == n * (budget.caption_tokens + line) + header
        assert plan.width * plan.height <= CAPTION_FRAME_MAX_PIXELS


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: f"{r.mode}-{r.fps}-{r.max_frames}")
def test_plan_invariants(request_: FrameRequest) -> None:
    for video, budget in itertools.product(VIDEOS, BUDGETS):
        check_plan(video, budget, request_)


def test_ten_seconds_at_two_fps() -> None:
    plan = plan_frames(
        VideoInfo(10, 30, 300, 640, 360), TokenBudget(32768, 50, 256), FrameRequest()
    )
    assert plan.num_frames == 20
    assert plan.timestamps[0] == pytest.approx(0.25) and plan.timestamps[-1] == pytest.approx(9.75)
    assert plan.frame_indices[:3] == (7, 22, 37)


def test_long_video_is_capped_at_sixty_frames() -> None:
    plan = plan_frames(
        VideoInfo(600, 30, 18000, 1280, 720),
        TokenBudget(32768, 50, 256),
        FrameRequest(max_frames=500, fps=30),
    )
    assert plan.num_frames == 60


def test_resolution_is_lowered_before_the_frame_count() -> None:
    video = VideoInfo(30, 30, 900, 1920, 1080)
    roomy = plan_frames(video, TokenBudget(200_000, 50, 256), FrameRequest())
    tight = plan_frames(video, TokenBudget(8192, 50, 256), FrameRequest())
    assert roomy.num_frames == tight.num_frames == 60
    assert tight.width * tight.height < roomy.width * roomy.height


def test_captions_count_is_bounded_by_caption_tokens() -> None:
    plan = plan_frames(
        VideoInfo(600, 30, 18000, 1280, 720),
        TokenBudget(4096, 100, 512, caption_tokens=256),
        FrameRequest("captions"),
    )
    room = 4096 - 100 - 512 - VISION_WRAPPER_TOKENS - CAPTIONS_HEADER_TOKENS
    assert plan.num_frames == room // (256 + CAPTION_LINE_TOKENS)


def test_no_room_is_an_error() -> None:
    with pytest.raises(PlanError):
        plan_frames(VideoInfo(10, 30, 300, 640, 360), TokenBudget(1000, 500, 499), FrameRequest())
    with pytest.raises(PlanError):
        plan_frames(VideoInfo(0, 30, 0, 640, 360), TokenBudget(8192, 5, 5), FrameRequest())


def test_smart_resize_matches_qwen() -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as qwen

    from server.media.frames import smart_resize

    for height, width in itertools.product([28, 100, 240, 333, 720, 1080, 2160], repeat=2):
        for min_pixels, max_pixels in [(3136, 12845056), (100352, 602112), (3136, 200704)]:
            assert smart_resize(height, width, 28, min_pixels, max_pixels) == qwen(
                height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels
            )


def test_frames_mode_takes_every_frame_the_ceilings_allow() -> None:
    """Media categories: each frame is a request of its own, so the count is not divided by
    the context (it used to be 7 frames for any video on an 8k context)."""
    budget = TokenBudget(context_length=8192, prompt_tokens=120, max_tokens=1024)
    ten_seconds = plan_frames(VideoInfo(10.0, 24.0, 240, 1280, 720), budget, FrameRequest("frames"))
    ten_minutes = plan_frames(
        VideoInfo(600.0, 24.0, 14400, 1280, 720), budget, FrameRequest("frames")
    )
    assert ten_seconds.num_frames == 20 and ten_minutes.num_frames == 60
    per_frame = ten_minutes.width * ten_minutes.height // (28 * 28) + 2
    assert per_frame + 120 + 1024 <= 8192 and ten_minutes.video_tokens == 60 * per_frame
    with pytest.raises(PlanError):
        plan_frames(
            VideoInfo(10.0, 24.0, 240, 1280, 720),
            TokenBudget(400, 120, 200),
            FrameRequest("frames"),
        )


def test_caption_lines_of_a_long_video_fit_their_plan(tiny_model_dir: Path) -> None:
    """The lines around the captions, as the prompt writes them and Qwen's pre-tokenizer
    splits them (a token a digit), fit what the plan counted for them, however long the
    video (a day-long one's took more, and its prompt passed the context)."""
    from transformers import AutoTokenizer

    from server.pipelines.video_captions import FrameCaption, captions_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for duration in (12.5, 600.0, 86_399.5, 3_000_000.0):
        video = VideoInfo(duration, 1, int(duration), 640, 360)
        plan = plan_frames(video, TokenBudget(4096, 100, 512, 16), FrameRequest("captions"))
        empty = [FrameCaption(t, "") for t in plan.timestamps]
        around = len(tokenizer(captions_text(empty, duration))["input_ids"])
        assert around <= plan.video_tokens - plan.num_frames * 16, duration


@pytest.mark.parametrize("family", ["tiny_model_dir", "tiny25_model_dir", "tiny3_model_dir"])
@pytest.mark.parametrize(
    ("video", "pixels"),
    [
        ((1280, 720, 4), {}),
        ((320, 240, 4), {}),
        ((1280, 720, 4), {"max_pixels": 50_000}),  # under Qwen2-VL's least frame (100,352)
        ((320, 240, 4), {"max_pixels": 50_000}),
        ((1280, 720, 4), {"min_pixels": 3136, "max_pixels": 50_000}),
        ((320, 240, 4), {"min_pixels": 3136, "max_pixels": 50_000}),
        ((320, 240, 4), {"min_pixels": 3136}),  # a minimum of its own, under the checkpoint's
        ((320, 240, 4), {"max_pixels": 784}),
        ((100, 2000, 4), {"max_pixels": 50_000}),
        # above the least frame, but rounded down under it: kept so, never past max_pixels
        ((640, 360, 4), {"max_pixels": 110_000}),
        ((640, 360, 4), {"min_pixels": 100_352, "max_pixels": 100_352}),
        # two frames: under Qwen3-VL's least too (4,096 pixels of all frames together)
        ((320, 240, 1), {"max_pixels": 1500}),
    ],
)
def test_a_videos_pixel_range_gives_the_tokens_qwens_processor_does(
    request: pytest.FixtureRequest, family: str, video: tuple[int, int, int], pixels: dict
) -> None:
    """The planned frames are the processor's: the tokens the plan counts, the ones the
    built prompt has, and those Qwen's processor (what vLLM runs with mm_processor_kwargs)
    makes of the video's own frames with the request's range. A max_pixels under Qwen2-VL's
    least frame (128 tokens) was raised to it: 576 video tokens for HF's 200 (1280x720)."""
    import numpy as np
    from transformers import AutoProcessor

    from server.engine.inputs import InputBuilder, VideoFrames

    processor = AutoProcessor.from_pretrained(request.getfixturevalue(family))
    ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")]
    builder = InputBuilder(processor, *ids)
    width, height, seconds = video
    info = VideoInfo(seconds, 12.0, 12 * seconds, width, height)
    budget = TokenBudget(
        32768,
        100,
        200,
        token_side=builder.token_side,
        per_patch_tokens=builder.per_patch_tokens,
        max_video_pixels=builder.max_video_pixels,
        min_video_pixels=builder.min_video_pixels,
        min_image_pixels=builder.min_image_pixels,
    )
    plan = plan_frames(info, budget, FrameRequest("native", **pixels))
    assert plan.num_frames == 2 * seconds
    frames = np.zeros((plan.num_frames, plan.height, plan.width, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
    inputs = builder.build(messages, [], [VideoFrames(frames, plan.timestamps, seconds)])
    patches = plan.num_frames // 2
    assert inputs.num_video_tokens == plan.video_tokens - patches * builder.per_patch_tokens
    if builder.timestamped_frames:
        return  # (Qwen3-VL's processor takes no per-call min_pixels / max_pixels for videos)
    # Qwen's processor itself, on frames of the video's own size, with the request's range.
    videos = processor.video_processor
    wanted = {
        "shortest_edge": pixels.get("min_pixels", videos.size["shortest_edge"]),
        "longest_edge": pixels.get("max_pixels", videos.size["longest_edge"]),
    }
    original = np.zeros((plan.num_frames, height, width, 3), dtype=np.uint8)
    grid = videos(videos=[original], size=wanted, do_sample_frames=False)["video_grid_thw"]
    assert inputs.num_video_tokens == int(grid.prod()) // videos.merge_size**2


@pytest.mark.parametrize("total", [1_200_000, 400_000])
def test_total_pixels_is_read_as_qwen_vl_utils_reads_it(total: int) -> None:
    """qwen-vl-utils' total_pixels (Qwen3-VL's own video example sends it): each frame at most
    total_pixels / frames x 2 pixels, never under 1.05 times the least frame (Qwen2-VL's
    100,352), resized once as its smart_resize resizes (transformers' own, the reference)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_resize

    least = 128 * 28 * 28
    info = VideoInfo(8.0, 30.0, 240, 1280, 720)
    budget = TokenBudget(32768, 100, 200, min_video_pixels=least)
    plan = plan_frames(info, budget, FrameRequest("native", total_pixels=total))
    assert plan.num_frames == 16
    most = max(min(VIDEO_MAX_PIXELS, total / 16 * 2), int(least * 1.05))
    height, width = hf_resize(720, 1280, factor=28, min_pixels=least, max_pixels=most)
    assert (plan.width, plan.height) == (width, height)
    assert plan.width * plan.height <= most
    whole = plan_frames(info, budget, FrameRequest("native"))
    assert plan.width * plan.height < whole.width * whole.height
