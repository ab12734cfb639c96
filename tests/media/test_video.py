"""Video decoding in worker processes: formats, hostile files, crashes and hangs."""

from __future__ import annotations

import asyncio
import fractions
import io
import os
from dataclasses import replace

import numpy as np
import pytest

from server.media.frames import FrameRequest, TokenBudget, uniform_timestamps
from server.media.video import VideoDecodeError, VideoDecoder
from tests.helpers import make_image, make_video

pytestmark = pytest.mark.anyio

BUDGET = TokenBudget(8192, 50, 256)


@pytest.fixture
async def decoder():
    decoder = VideoDecoder(num_workers=1, timeout_s=30)
    await decoder.start()
    yield decoder
    await decoder.close()


@pytest.mark.parametrize(
    "container,codec",
    [
        *(("mp4", "libx264"), ("webm", "libvpx-vp9"), ("matroska", "libx264"), ("mov", "libx264")),
        *(("mpegts", "libx264"), ("mpeg", "mpeg2video"), ("flv", "libx264"), ("asf", "wmv2")),
        ("ogg", "libvpx"),
    ],
)
async def test_formats(decoder: VideoDecoder, container: str, codec: str) -> None:
    decoded = await decoder.decode(
        make_video(2, 12, container=container, codec=codec), BUDGET, FrameRequest()
    )
    assert decoded.info.duration_s == pytest.approx(2, abs=0.2)
    assert decoded.plan.num_frames == 4  # 2 s at <= 2 fps
    assert decoded.frames.shape == (4, decoded.plan.height, decoded.plan.width, 3)
    assert decoded.frames.dtype == np.uint8


@pytest.mark.parametrize(
    "container,codec", [("mpegts", "libx264"), ("mpeg", "mpeg2video"), ("flv", "libx264")]
)
async def test_containers_whose_seeks_land_past_the_target_give_the_planned_frames(
    decoder: VideoDecoder, container: str, codec: str
) -> None:
    """MPEG-TS and -PS seek by estimated byte offsets and land past the target (a seek to
    0.2 s gave the frame at 3.7 s: 12 of 20 frames were that one); FLV's index put one past
    the last frame ("could not be decoded"). They seek again from earlier."""
    video = make_video(seconds=10, fps=10, container=container, codec=codec)
    decoded = await decoder.decode(video, BUDGET, FrameRequest(max_frames=20))
    planned = uniform_timestamps(decoded.info.duration_s, 20)
    assert decoded.plan.timestamps == pytest.approx(planned, abs=0.11)  # (within a frame)
    assert len({frame.tobytes() for frame in decoded.frames}) == 20


async def test_a_recording_that_starts_mid_way_repeats_only_the_frames_it_must(
    decoder: VideoDecoder,
) -> None:
    """An MPEG-TS cut out of a broadcast starts between keyframes: its first decodable frame
    comes seconds after its start (3.4 s here). The planned times before it can only show
    that frame; the one after them (3.15 s, 0.9 s before the next planned time) showed it
    again too (its repeat went by the frame object, which a seek back had replaced)."""
    video = make_video(seconds=30, fps=10, width=64, height=48, container="mpegts")
    cut = video[: 188 * 3] + video[188 * 100 :]  # (its tables kept, then from mid-way)
    decoded = await decoder.decode(cut, BUDGET, FrameRequest(max_frames=30))
    times = decoded.plan.timestamps
    lead = times.count(times[0])  # (0.45, 1.35 and 2.25 s: before any frame)
    assert lead == 3 and list(times[lead - 1 :]) == sorted(set(times))


async def test_only_planned_frames_are_read(decoder: VideoDecoder) -> None:
    video = make_video(seconds=20, fps=10)
    decoded = await decoder.decode(video, BUDGET, FrameRequest(max_frames=1000, fps=100))
    assert decoded.plan.num_frames <= 60
    assert len(decoded.frames) == decoded.plan.num_frames
    # The bar moves 5 px a frame: frames taken at different times differ.
    assert not np.array_equal(decoded.frames[0], decoded.frames[-1])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        os.urandom(20_000),
        b"hello world " * 100,
        make_image(64, 64),  # an image is not a video
    ],
    ids=["empty", "random", "text", "jpeg"],
)
async def test_not_a_video(decoder: VideoDecoder, data: bytes) -> None:
    with pytest.raises(VideoDecodeError):
        await decoder.decode(data, BUDGET, FrameRequest())


async def test_truncated_video(decoder: VideoDecoder) -> None:
    video = make_video(seconds=4)
    with pytest.raises(VideoDecodeError):
        await decoder.decode(video[: len(video) // 3], BUDGET, FrameRequest())
    # The worker survived (or was replaced): the next video decodes.
    assert (await decoder.decode(video, BUDGET, FrameRequest())).plan.num_frames > 0


def damaged(video: bytes, share: float, seed: int = 1) -> bytes:
    """The video with `share` of its bytes from the middle on overwritten at random (a
    transfer or a disk that damaged them), its header and its end kept."""
    rng = np.random.default_rng(seed)
    data = bytearray(video)
    start, count = len(data) // 3, int(len(data) * share)
    data[start : start + count] = rng.integers(0, 256, count, dtype=np.uint8).tobytes()
    return bytes(data)


@pytest.mark.parametrize(
    "container,codec", [("mp4", "libx264"), ("matroska", "libx264"), ("ogg", "libvpx")]
)
async def test_a_damaged_packet_costs_its_frames_not_the_video(
    decoder: VideoDecoder, container: str, codec: str
) -> None:
    """As a player shows it: one packet's bytes overwritten (200 of 19,000) refused every
    MP4 whole, "could not be decoded"."""
    video = make_video(seconds=10, fps=10, container=container, codec=codec)
    if container != "ogg":
        decoded = await decoder.decode(damaged(video, 0.01), BUDGET, FrameRequest())
        assert decoded.refused_packets > 0
        assert len(decoded.frames) == decoded.plan.num_frames == 20
        assert decoded.plan.timestamps[-1] > 9  # read past the damage, to the end
    # Too damaged, what is left would be a few frames over and over: a third of an MP4's
    # packets; a tenth of an Ogg, whose demuxer skips the bytes it cannot read as packets
    # (a fifth of the packets refused, but 4 s gone: 7 of 20 frames were the one before)
    share = 0.3 if container == "mp4" else 0.1
    with pytest.raises(VideoDecodeError, match="damaged or cut short"):
        await decoder.decode(damaged(video, share), BUDGET, FrameRequest())


async def test_a_web_mp4_cut_short_is_read_as_far_as_it_goes(
    decoder: VideoDecoder, caplog: pytest.LogCaptureFixture
) -> None:
    """Its index comes first and lists every packet, also those past where the file ends (a
    download or upload cut off): planned over the 10 s it claimed, it was refused."""
    video = make_video(seconds=10, fps=10, faststart=True)
    decoded = await decoder.decode(video[: len(video) // 2], BUDGET, FrameRequest())
    assert 3 < decoded.info.duration_s < 6 and decoded.info.num_frames < 60
    assert f"holds {decoded.info.duration_s:.1f} s of the 10.0 s its header claims" in caplog.text
    assert decoded.plan.timestamps[-1] < decoded.info.duration_s
    assert len({frame.tobytes() for frame in decoded.frames}) == len(decoded.frames)
    # an MP4 with its index at its end has none when cut: it says it may be cut short
    with pytest.raises(VideoDecodeError, match="cut short: an MP4 keeps its index at its end"):
        plain = make_video(seconds=10, fps=10)
        await decoder.decode(plain[: len(plain) * 9 // 10], BUDGET, FrameRequest())


async def test_non_square_pixels_are_read_as_shown(decoder: VideoDecoder) -> None:
    """A DVD's or an HDV camera's frames are stored narrower than they are shown (720x480 at
    32:27 is 16:9): they were read squeezed, at the stored shape."""
    video = make_video(width=320, height=240, pixel_aspect=fractions.Fraction(32, 27))
    decoded = await decoder.decode(video, BUDGET, FrameRequest())
    assert (decoded.info.width, decoded.info.height) == (379, 240)
    assert decoded.plan.width / decoded.plan.height == pytest.approx(379 / 240, rel=0.1)
    assert decoded.frames.shape[1:3] == (decoded.plan.height, decoded.plan.width)
    # a header's nonsense (1,000:1) is not taken
    odd = make_video(width=320, height=240, pixel_aspect=fractions.Fraction(1000, 1))
    assert (await decoder.decode(odd, BUDGET, FrameRequest())).info.width == 320


async def test_a_hung_worker_is_killed_and_replaced() -> None:
    decoder = VideoDecoder(num_workers=1, timeout_s=0.001)
    await decoder.start()
    try:
        with pytest.raises(VideoDecodeError, match="longer than"):
            await decoder.decode(make_video(seconds=4), BUDGET, FrameRequest())
        decoder.timeout_s = 30
        assert (await decoder.decode(make_video(), BUDGET, FrameRequest())).plan.num_frames > 0
    finally:
        await decoder.close()


async def test_a_worker_that_dies_is_replaced(decoder: VideoDecoder) -> None:
    assert decoder.idle is not None
    worker = decoder.idle._queue[0]  # type: ignore[attr-defined]
    # Dies between jobs: respawned before the next one, which just works.
    worker.process.kill()
    worker.process.join()
    assert (await decoder.decode(make_video(), BUDGET, FrameRequest())).plan.num_frames > 0
    # Dies during a job (as a segfaulting decoder would): that request gets a 400-able error.
    big = make_video(seconds=30, fps=24, width=640, height=480)
    busy = decoder.idle._queue[0]  # type: ignore[attr-defined]  # the one worker of this pool
    task = asyncio.create_task(decoder.decode(big, BUDGET, FrameRequest(max_frames=60)))
    while decoder.idle.qsize():
        await asyncio.sleep(0.001)
    busy.process.kill()
    with pytest.raises(VideoDecodeError, match="crashed"):
        await task
    assert (await decoder.decode(make_video(), BUDGET, FrameRequest())).plan.num_frames > 0


async def test_a_cancelled_decode_stops_its_worker_quietly(
    decoder: VideoDecoder, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up mid-decode is routine: its worker is stopped (a decode cannot be
    interrupted) with an INFO line, not a warning of a crash (every hang-up logged one), and
    the next video decodes."""
    assert decoder.idle is not None
    big = make_video(seconds=30, fps=24, width=640, height=480)
    task = asyncio.create_task(decoder.decode(big, BUDGET, FrameRequest(max_frames=60)))
    while decoder.idle.qsize():
        await asyncio.sleep(0.001)
    with caplog.at_level("INFO", logger="server.media.video"):
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", "stopping a video decode worker: its request was cancelled") in lines, lines
    assert not [line for line in lines if line[0] == "WARNING"], lines
    assert (await decoder.decode(make_video(), BUDGET, FrameRequest())).plan.num_frames > 0


async def test_a_worker_is_replaced_after_its_quota_of_decodes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--video-decode-worker-max-jobs: after that many decodes a worker is stopped and a fresh
    one started in the background; every decode is answered, and close() leaves no process."""
    decoder = VideoDecoder(num_workers=1, timeout_s=30, max_jobs_per_worker=2)
    await decoder.start()
    assert decoder.idle is not None
    answered_by = []
    try:
        with caplog.at_level("INFO", logger="server.media.video"):
            for _ in range(5):
                worker = await decoder.idle.get()  # (the pool's one worker, or its successor)
                decoder.idle.put_nowait(worker)
                answered_by.append(worker)
                assert (await decoder.decode(make_video(), BUDGET, FrameRequest())).frames.size
    finally:
        await decoder.close()
    first, second, third = answered_by[0], answered_by[2], answered_by[4]
    assert answered_by == [first, first, second, second, third]
    assert len({first.process.pid, second.process.pid, third.process.pid}) == 3
    assert not any(worker.process.is_alive() for worker in answered_by)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines.count(("INFO", "replacing a video decode worker after 2 decodes")) == 2, lines
    assert not [line for line in lines if line[0] == "WARNING"], lines


async def test_a_killed_worker_is_replaced_before_the_next_request(
    decoder: VideoDecoder,
) -> None:
    """A worker killed for a hang is replaced in the background: the next request finds a
    started worker waiting (it does not pay for the start itself)."""
    assert decoder.idle is not None
    decoder.timeout_s = 0.001
    with pytest.raises(VideoDecodeError, match="longer than"):
        await decoder.decode(make_video(seconds=4), BUDGET, FrameRequest())
    decoder.timeout_s = 30
    await asyncio.gather(*decoder.replacing)
    successor = decoder.idle._queue[0]  # type: ignore[attr-defined]
    assert successor.process.is_alive() and successor.jobs == 0


async def test_sparse_plans_read_keyframes_only(decoder: VideoDecoder) -> None:
    video = make_video(seconds=60, fps=12, keyframe_interval_s=2)
    wish = FrameRequest(max_frames=6)  # one frame per 10 s: far apart
    decoded = await decoder.decode(video, BUDGET, wish)
    assert decoded.backend == "pyav-keyframes"
    assert decoded.plan.num_frames == len(decoded.frames) == 6
    planned = [5.0 * (2 * i + 1) for i in range(6)]
    for want, got in zip(planned, decoded.plan.timestamps, strict=True):
        assert want - 2.01 <= got <= want  # the keyframe at or before the planned time


async def test_sparse_keyframes_fall_back_to_exact_frames(decoder: VideoDecoder) -> None:
    video = make_video(seconds=60, fps=12, keyframe_interval_s=30)  # keyframes at 0 and 30 s
    decoded = await decoder.decode(video, BUDGET, FrameRequest(max_frames=6))
    times = decoded.plan.timestamps
    assert len(set(times)) == 6  # never the same keyframe twice
    planned = [5.0 * (2 * i + 1) for i in range(6)]
    for want, got in zip(planned, times, strict=True):
        assert want - 10 <= got <= want + 0.1  # within one gap: keyframe, else the exact frame
    assert times == (0.0, 15.0, 25.0, 30.0, 45.0, 55.0)


def rotated_video(rotation: int, seconds: float = 2.0) -> bytes:
    """320x240 stored, white top-left quadrant, shown turned by `rotation` (a display matrix,
    as phones store portrait videos)."""
    import io

    import av

    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as video:
        stream = video.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.set_display_rotation(rotation)
        frame = np.zeros((240, 320, 3), np.uint8)
        frame[:120, :160] = 255
        for _ in range(int(seconds * 10)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                video.mux(packet)
        for packet in stream.encode():
            video.mux(packet)
    return out.getvalue()


def white_quadrant(frame: np.ndarray) -> str:
    h, w = frame.shape[0] // 2, frame.shape[1] // 2
    quadrants = {"top-left": frame[:h, :w], "top-right": frame[:h, w:]}
    quadrants |= {"bottom-left": frame[h:, :w], "bottom-right": frame[h:, w:]}
    return max(quadrants, key=lambda name: quadrants[name].mean())


@pytest.mark.parametrize(
    ("rotation", "corner"), [(90, "bottom-left"), (-90, "top-right"), (180, "bottom-right")]
)
def test_a_rotated_video_is_read_as_displayed(rotation: int, corner: str) -> None:
    """A phone's portrait video is stored sideways with a display matrix: every reader turns
    its frames upright (decord did, into the stored frame's landscape size; PyAV did not)."""
    from server.media.video import _read_keyframes, _read_pyav, decode_job

    data = rotated_video(rotation)
    decoded = decode_job(data, BUDGET, FrameRequest(), 2.0)
    portrait = rotation % 180 != 0
    assert (decoded.info.width < decoded.info.height) is portrait
    assert (decoded.plan.width < decoded.plan.height) is portrait
    size = (decoded.plan.width, decoded.plan.height)
    times = list(decoded.plan.timestamps)
    readers = {
        decoded.backend: decoded.frames,
        "pyav": _read_pyav(data, times, size, decoded.info.rotation)[0],
        "keyframes": _read_keyframes(data, times, size, 10.0, decoded.info.rotation)[0],
    }
    for name, frames in readers.items():
        assert frames.shape[1:] == (size[1], size[0], 3), name
        assert white_quadrant(frames[0]) == corner, name


def test_a_variable_frame_rate_video_is_read_by_its_frames_own_times() -> None:
    """Frames of uneven durations (a screen recording, a phone's VFR): each planned time reads
    the frame shown then, and reports that frame's time (index = time x average fps read
    another frame and reported the planned time: seconds off)."""
    import io

    import av

    from server.media.video import _read_pyav, decode_job

    durations_ms = [10, 10, 10, 500, 33, 2000] * 10  # 60 frames, 25.6 s
    starts = np.cumsum([0, *durations_ms[:-1]]) / 1000
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as video:
        stream = video.add_stream("libx264", rate=1000)  # (pts in milliseconds)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for i, start in enumerate(starts):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 4, np.uint8), "rgb24")
            frame.pts, frame.time_base = round(start * 1000), fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                video.mux(packet)
        for packet in stream.encode():
            video.mux(packet)
    with av.open(io.BytesIO(out.getvalue())) as container:  # each frame's time and level
        levels = {
            round(f.time, 3): f.to_ndarray(format="rgb24").mean() for f in container.decode(video=0)
        }
    assert sorted(levels) == [round(t, 3) for t in starts]
    decoded = decode_job(out.getvalue(), BUDGET, FrameRequest(max_frames=12), 2.0)
    assert decoded.backend == "pyav"
    # each planned time read apart (a seek each) gives the same frames and times as one pass
    size = (decoded.plan.width, decoded.plan.height)
    planned_times = uniform_timestamps(decoded.info.duration_s, len(decoded.frames))
    for at, frame, time in zip(planned_times, decoded.frames, decoded.plan.timestamps, strict=True):
        alone, (alone_time,) = _read_pyav(out.getvalue(), [at], size)
        assert alone_time == pytest.approx(time, abs=0.002)
        assert np.array_equal(alone[0], frame)
    for frame, time in zip(decoded.frames, decoded.plan.timestamps, strict=True):
        nearest = min(levels, key=lambda t: abs(levels[t] - frame.mean()))
        assert nearest == round(time, 3), (time, nearest)  # the frame of the time it reports
    planned = uniform_timestamps(decoded.info.duration_s, len(decoded.frames))
    for want, time in zip(planned, decoded.plan.timestamps, strict=True):
        shown = max(t for t in starts if t <= want)  # the frame on screen at the planned time
        assert abs(time - shown) < 0.002, (want, time, shown)


def test_h264_in_avi_is_read_at_its_planned_times() -> None:
    """H.264 in AVI (decord said -9e17 s for each frame's time, and read the last frame six
    times): six different frames, at times within the video."""
    from server.media.video import decode_job

    video = make_video(seconds=4, fps=10, container="avi", codec="libx264")
    decoded = decode_job(video, BUDGET, FrameRequest(max_frames=6), 2.0)
    assert decoded.backend == "pyav"
    times = decoded.plan.timestamps
    assert list(times) == sorted(times) and times[0] >= 0 and times[-1] <= 4, times
    # The bar moves 5 px a frame: six different frames, not the last one six times
    assert len({frame.tobytes() for frame in decoded.frames}) == 6


@pytest.mark.parametrize(("first_ms", "shown"), [(-500, [5, 15, 25]), (1500, [0, 10, 20])])
def test_a_cut_or_late_starting_video_reads_the_frames_on_screen(
    first_ms: int, shown: list[int]
) -> None:
    """A trimmed MP4 (an edit list cuts its first frames: decord's index listed them at
    negative times, its batch reads skipped them, so by them every frame read was five late)
    and a recording whose stream starts at 1.5 s (PyAV's times and seeks are the stream's
    own): the frame on screen at each time, from the start of the video."""
    import io

    import av

    from server.media.video import _read_pyav

    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as video:
        stream = video.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for i in range(40):  # frame i is grey level 6 i, 100 ms each
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 6, np.uint8), "rgb24")
            frame.pts, frame.time_base = first_ms + i * 100, fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                video.mux(packet)
        for packet in stream.encode():
            video.mux(packet)
    data, times = out.getvalue(), [0.05, 1.05, 2.05]
    frames, read = _read_pyav(data, times, (64, 64))
    assert [round(float(f.mean()) / 6) for f in frames] == shown
    assert read == pytest.approx([0.0, 1.0, 2.0], abs=0.06), read


def test_an_odd_number_of_jpeg_frames_is_read_whole() -> None:
    """vLLM's frames-as-JPEGs video: of 3 frames the even plan left the middle one out; every
    frame is read, the last repeated as Qwen's processor pads them, where the ceilings and the
    context allow."""
    from server.media.image_frames import decode_image_frames

    frames = tuple(make_image(112, 84, seed=i) for i in range(5))
    for count, request, budget, indices in (
        (3, FrameRequest(), BUDGET, (0, 1, 2, 2)),
        (5, FrameRequest(), BUDGET, (0, 1, 2, 3, 4, 4)),
        (4, FrameRequest(), BUDGET, (0, 1, 2, 3)),
        (3, FrameRequest(max_frames=2), BUDGET, (0, 2)),  # (its ceiling: two)
        (3, FrameRequest(), TokenBudget(8192, 8192 - 2 - 2 - 130, 2), (0, 2)),  # (no room)
        # total_pixels: the 2 planned frames (392x280) within it, but not 4: not padded; 4
        # within it, or frames at the least size whatever the count (a small total): padded
        (3, FrameRequest(total_pixels=200_000), BUDGET, (0, 2)),
        (3, FrameRequest(total_pixels=250_000), BUDGET, (0, 1, 2, 2)),
        (3, FrameRequest(total_pixels=10_000), BUDGET, (0, 1, 2, 2)),
    ):
        decoded = decode_image_frames(frames[:count], budget, request, 2.0, "p")
        assert decoded.plan.frame_indices == indices, (count, request, budget)
        assert len(decoded.frames) == len(indices)


def test_a_container_that_claims_a_longer_duration_is_read_by_its_frames() -> None:
    """A Matroska file whose header says 60 s holds 4 s of frames: planned over 60 s, 56 of
    its 60 frames were the last frame again. The duration is measured by the last packets'
    times (a header within a frame of them is taken as it is)."""
    import struct

    from server.media.video import _probe, decode_job

    honest = make_video(seconds=4, fps=12, container="matroska")
    lying = bytearray(honest)
    at = lying.find(b"\x44\x89\x88")  # (Segment Info's Duration: an 8-byte float, in ms)
    (ms,) = struct.unpack(">d", lying[at + 3 : at + 11])
    lying[at + 3 : at + 11] = struct.pack(">d", ms * 15)
    import av

    with av.open(io.BytesIO(bytes(lying))) as container:  # (what the header says)
        assert container.duration / 1e6 == pytest.approx(60.0)
    assert _probe(bytes(lying)).duration_s == pytest.approx(4.0, abs=0.1)
    assert _probe(honest) == replace(_probe(bytes(lying)), header_duration_s=4.0)
    decoded = decode_job(bytes(lying), BUDGET, FrameRequest(max_frames=8), 2.0)
    times = decoded.plan.timestamps
    assert len(set(times)) == len(times) == 8 and times[-1] < 4.0, times
    assert len({frame.tobytes() for frame in decoded.frames}) == 8
    for container, codec in (("mp4", "libx264"), ("webm", "libvpx-vp9"), ("avi", "mpeg4")):
        video = make_video(seconds=6, fps=10, container=container, codec=codec)
        assert _probe(video).duration_s == pytest.approx(6.0, abs=0.11), container


def test_frames_past_8k_are_refused_before_any_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """(A 424 KB file of 12000x12000 frames took a decode worker 1.5 GB; the bound is shown
    here lowered below a small video's frames.)"""
    from server.media import video as video_module
    from server.media.video import VideoDecodeError, _probe

    small = make_video(seconds=1, width=160, height=120)
    assert _probe(small).width == 160
    monkeypatch.setattr(video_module, "MAX_FRAME_PIXELS", 160 * 120 - 1)
    with pytest.raises(VideoDecodeError, match=r"its frames are 160x120, above 19199 pixels"):
        _probe(small)


def growing(codec: str, container: str, small: int, large: int, frames: int = 10) -> bytes:
    """A video whose header (from its first frames) says small x small and whose later frames
    are large x large: MJPEG's frames each carry their own size; an H.264 or VP9 stream may
    change size at a keyframe (here a second encoder's packets, its own sequence header in
    band, muxed into the one stream)."""
    import av

    def encoder(side: int, codec_context=None):  # noqa: ANN001, ANN202
        context = codec_context or av.CodecContext.create(codec, "w")
        context.width = context.height = side
        context.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        context.time_base, context.framerate = fractions.Fraction(1, 10), fractions.Fraction(10)
        context.options = {
            "libx264": {"preset": "ultrafast", "threads": "1"},
            "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"},
        }.get(codec, {})
        return context

    def frame(side: int, level: int, pix_fmt: str):  # noqa: ANN202
        image = np.full((side, side, 3), level, np.uint8)
        return av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)

    out = io.BytesIO()
    with av.open(out, "w", format=container) as video:
        stream = video.add_stream(codec, rate=10)
        first = encoder(small, stream.codec_context)
        later = encoder(large)
        for i in range(frames):
            context = first if i < frames // 3 else later
            picture = frame(context.width, 40 * (i % 6), context.pix_fmt)
            picture.pts = i
            for packet in context.encode(picture):
                packet.stream = stream
                video.mux(packet)
            if i == frames // 3 - 1:  # (the small part ends: flush it before the large)
                for packet in first.encode(None):
                    packet.stream = stream
                    video.mux(packet)
        for packet in later.encode(None):
            packet.stream = stream
            video.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize(
    ("codec", "container"), [("mjpeg", "avi"), ("libx264", "mp4"), ("libvpx-vp9", "webm")]
)
def test_a_frame_past_8k_by_its_own_size_is_refused(
    monkeypatch: pytest.MonkeyPatch, codec: str, container: str
) -> None:
    """A 64x64 header, then frames of their own larger size: MJPEG (a 56 MB AVI of 12000x12000
    frames took decord 3.5 s and 523 MB), H.264 (a 192 KB MP4 of 8000x8000 frames took it
    5-9 s and 374 MB, 1.3 GB with 8 reference frames), VP9 (40 KB, 532 MB). PyAV's decoder
    refuses a frame above the bound by its own size (shown lowered below 320x320)."""
    from server.media import video as video_module
    from server.media.video import _probe, decode_job

    data = growing(codec, container, 64, 320)
    assert (_probe(data).width, _probe(data).height) == (64, 64)
    decoded = decode_job(data, BUDGET, FrameRequest(), 2.0)  # (within the bound: read)
    assert decoded.backend == "pyav" and len(decoded.frames) == decoded.plan.num_frames
    monkeypatch.setattr(video_module, "MAX_FRAME_PIXELS", 320 * 320 - 1)
    for request in (FrameRequest(), FrameRequest(use_scenes=True), FrameRequest(max_frames=1)):
        with pytest.raises(VideoDecodeError, match="a frame is larger than 8K"):
            decode_job(data, BUDGET, request, 2.0)
    # frames that all keep within it are read
    assert len(decode_job(growing(codec, container, 64, 64), BUDGET, FrameRequest(), 2.0).frames)


def _encoded(
    out: io.IOBase, container: str, codec: str, streams: list[tuple[int, int, int, int]]
) -> None:
    """Streams of (width, height, fps, frames) muxed into `out`, in that order."""
    import av

    with av.open(out, "w", format=container) as video:
        encoders = []
        for width, height, fps, count in streams:
            stream = video.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            encoders.append((stream, count))
        for stream, count in encoders:
            for i in range(count):
                pixels = np.full((stream.height, stream.width, 3), (i * 9) % 256, np.uint8)
                frame = av.VideoFrame.from_ndarray(pixels, "rgb24")
                for packet in stream.encode(frame):
                    video.mux(packet)
            for packet in stream.encode():
                video.mux(packet)


class _Pipe(io.RawIOBase):
    """A write-only stream that cannot seek: what a browser's MediaRecorder or OBS writes
    its webm to (no duration, no cues in the header)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[no-untyped-def, override]
        self.data += b
        return len(b)


def test_a_webm_recorded_as_it_went_is_read_by_its_packets() -> None:
    """No duration in the header (a live recording): it was refused, "no decodable frames"."""
    from server.media.video import _probe, decode_job

    pipe = _Pipe()
    _encoded(pipe, "webm", "libvpx-vp9", [(96, 64, 10, 40)])
    info = _probe(bytes(pipe.data))
    assert info.duration_s == pytest.approx(4.0, abs=0.15) and info.num_frames == 40
    decoded = decode_job(bytes(pipe.data), BUDGET, FrameRequest(max_frames=8), 2.0)
    assert len(decoded.frames) == 8 and len(set(decoded.plan.timestamps)) == 8


def test_the_main_video_stream_is_read_not_the_first() -> None:
    """As ffmpeg picks: the largest picture (a 64x64 cover first, or a dash camera's small
    copy, was read instead of the video)."""
    from server.media.video import _probe, decode_job

    out = io.BytesIO()
    _encoded(out, "matroska", "libx264", [(64, 64, 1, 1), (160, 96, 10, 50)])
    info = _probe(out.getvalue())
    assert (info.width, info.height, info.num_frames) == (160, 96, 50)
    decoded = decode_job(out.getvalue(), BUDGET, FrameRequest(max_frames=6), 2.0)
    assert len(decoded.frames) == 6 and decoded.plan.timestamps[-1] > 3


def test_a_frame_held_past_two_planned_times_is_not_read_twice() -> None:
    """A variable frame rate (frames 33 ms to 1 s apart): the planned time where the last
    frame is still shown reads the next one, where it comes before the next planned time
    (7 of 23 frames were repeats, each captioned and paid for again)."""
    import av

    from server.media.video import decode_job

    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as video:
        stream = video.add_stream("libx264", rate=1000)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        pts = 0
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 6, np.uint8), "rgb24")
            frame.pts, frame.time_base = pts, fractions.Fraction(1, 1000)
            pts += [33, 100, 500, 16, 1000][i % 5]
            for packet in stream.encode(frame):
                video.mux(packet)
        for packet in stream.encode():
            video.mux(packet)
    decoded = decode_job(out.getvalue(), BUDGET, FrameRequest(max_frames=22), 2.0)
    times = decoded.plan.timestamps
    assert len(times) == 22 and len(set(times)) == 22, times
    assert list(times) == sorted(times)
