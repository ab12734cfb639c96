"""Scene detection on generated clips with known cuts, and the pure scene arithmetic."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from server.media.frames import FrameRequest, TokenBudget
from server.media.scenes import (
    SCENE_SAMPLE_FPS,
    Scene,
    merge_to_budget,
    scenes_from_cuts,
    to_hsv,
)
from server.media.video import VideoDecoder
from tests.helpers import make_video


@pytest.mark.anyio
@pytest.mark.parametrize(
    "mode,cuts,middles",
    [
        ("captions", (2.0, 5.0, 7.5), [1.0, 3.5, 6.25, 8.75]),
        ("native", (2.0, 5.0, 7.5), [1.0, 3.5, 6.25, 8.75]),
        # Three scenes in native mode: an even count, so the last frame is taken twice.
        ("native", (3.0, 6.0), [1.5, 4.5, 8.0, 8.0]),
    ],
)
async def test_one_frame_per_scene_within_one_sampling_step(
    mode: str, cuts: tuple[float, ...], middles: list[float]
) -> None:
    decoder = VideoDecoder(num_workers=1, timeout_s=60)
    await decoder.start()
    try:
        decoded = await decoder.decode(
            make_video(seconds=10, fps=12, cuts=cuts),
            TokenBudget(32768, 50, 256),
            FrameRequest(mode, use_scenes=True),  # type: ignore[arg-type]
        )
    finally:
        await decoder.close()
    got = list(decoded.plan.timestamps)
    assert len(got) == len(middles)
    for middle, t in zip(middles, got, strict=True):
        assert abs(middle - t) <= 1 / SCENE_SAMPLE_FPS
    assert len(decoded.frames) == decoded.plan.num_frames


def test_scenes_from_cuts() -> None:
    assert scenes_from_cuts([5.0, 2.0, 0.0, 12.0], 10.0) == [
        Scene(0.0, 2.0),
        Scene(2.0, 5.0),
        Scene(5.0, 10.0),
    ]


def test_merge_shortest_into_shorter_neighbour() -> None:
    scenes = scenes_from_cuts([1.0, 1.5, 6.0, 9.0], 10.0)  # lengths 1, 0.5, 4.5, 3, 1
    merged = merge_to_budget(scenes, 3)
    assert len(merged) == 3
    assert merged[0] == Scene(0.0, 1.5)  # the 0.5 s scene went into the 1 s one
    assert merged[-1] == Scene(6.0, 10.0)
    assert sum(s.length_s for s in merged) == pytest.approx(10.0)
    assert merge_to_budget(scenes, 10) == scenes


def test_hsv_matches_colorsys() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(1, 8, 8, 3), dtype=np.uint8)
    ours = to_hsv(pixels)[0].reshape(-1, 3) / 255.0
    theirs = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in pixels[0].reshape(-1, 3)])
    assert np.allclose(ours, theirs, atol=1e-5)


def test_a_scenes_frame_is_never_taken_from_the_scene_before() -> None:
    """Frames far apart are read as the keyframe up to a gap before each (cheap on long
    videos), but a scene's frame must lie in its scene: keyframes 9 s apart put the second
    scene's frame (15 s) at 9 s, in the scene before, and the second scene went unseen."""
    from server.media.video import decode_job

    cuts = (10.0, 20.0, 30.0)
    video = make_video(seconds=40, fps=10, cuts=cuts, keyframe_interval_s=9)
    request = FrameRequest("captions", use_scenes=True)
    decoded = decode_job(video, TokenBudget(32768, 50, 256), request, 2.0)
    times = decoded.plan.timestamps
    assert len(times) == len(cuts) + 1, times
    for k, t in enumerate(times):
        assert 10 * k <= t < 10 * (k + 1), times
