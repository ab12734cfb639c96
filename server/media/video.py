"""Video decoding in worker processes: probe, plan, read only the planned frames, resize.

FFmpeg's decoders crash and hang on hostile files (decord#229), so decoding never runs in the server
process: a small pool of spawned worker processes does it, each job with a deadline. A worker
that dies or overruns is killed and replaced, and only its request gets a 4xx.

Inside a worker: PyAV opens the container first (cheap: headers only) to check the format and
read duration, fps, frame count and size; the planner picks the frames; PyAV reads those, in one
pass that seeks past a keyframe only where that saves decoding (as decord's `get_batch` did), and
scales each as it is converted. Its decoder refuses a frame above 8K by the frame's own size: a
stream may change size mid-way (a 192 KB H.264 file with a 320x240 header and 8000x8000 frames
took decord 5-9 s and 374 MB, with 8 reference frames 1.3 GB). Peak memory is the encoded bytes
plus the planned frames, whatever the video's length.
"""

from __future__ import annotations

import asyncio
import bisect
import io
import logging
import multiprocessing
import multiprocessing.connection
import signal
from dataclasses import dataclass, field, replace
from multiprocessing.process import BaseProcess

import numpy as np

from server.media import scenes
from server.media.decode_memory import return_freed_memory
from server.media.frames import (
    DEFAULT_FPS,
    FramePlan,
    FrameRequest,
    NoRoom,
    PlanError,
    TokenBudget,
    VideoInfo,
    at_timestamps,
    plan_frames,
)

logger = logging.getLogger(__name__)

# Planned frames this far apart (seconds) are read as the keyframe at or before each timestamp
# (distinct keyframes, each less than one gap early), for a fraction of the decoding work.
KEYFRAME_SNAP_MIN_GAP_S = 5.0
# Containers we read: mp4/mov/3gp (H.264, H.265...), matroska/webm (VP8/VP9/AV1...), avi,
# MPEG transport and program streams (.ts, .mts/.m2ts from camcorders, .mpg, a DVD's .vob),
# flv, asf (.wmv) and ogg (.ogv): the ones Gemini takes too. FFmpeg's demuxers run in the
# decode workers, as its decoders do.
ALLOWED_CONTAINERS = (
    "mp4",
    "mov",
    "matroska",
    "webm",
    "avi",
    "mpegts",
    "mpeg",
    "flv",
    "asf",
    "ogg",
)
# Containers whose duration FFmpeg estimates (they hold none): see _measured_duration.
ESTIMATED_DURATIONS = {"mpeg", "mpegts"}
CONTAINER_NAMES = "mp4, mov, 3gp, mkv, webm, avi, ts/mts/m2ts, mpg, vob, flv, wmv, ogv"
# A video whose frames are larger (DCI 8K) is refused before a frame is decoded: a 424 KB
# file of 12000x12000 frames took a decode worker 1.5 GB. A frame that is larger by its own
# size (MJPEG's frames each have one; H.264, VP9... may change size mid-stream) is refused by
# the decoder (FFmpeg's max_pixels).
MAX_FRAME_PIXELS = 8192 * 4320
ATTACHED_PIC = 0x0400  # FFmpeg's AV_DISPOSITION_ATTACHED_PIC: a stream that is cover art
UNDECODABLE = (
    "the video's frames could not be decoded: the file is damaged or cut short (or a frame is "
    "larger than 8K)"
)
# Packets the decoder refuses (bytes damaged in transfer or storage, a file cut mid-packet) are
# skipped, as players skip them; a video with more than this share of the packets read refused
# is refused itself (what is left of it would be a few frames shown again and again).
MAX_REFUSED_SHARE = 0.25


class VideoDecodeError(Exception):
    """The bytes are not a video we can read; the message is safe to show to the client."""


class VideoNoRoom(VideoDecodeError):
    """The video is readable, but not even its smallest plan fits the context."""


def plan_error(exc: PlanError) -> VideoDecodeError:
    """The planner's refusal as the decoders' error (VideoNoRoom: the context's fault)."""
    return (VideoNoRoom if isinstance(exc, NoRoom) else VideoDecodeError)(str(exc))


@dataclass(frozen=True)
class DecodedVideo:
    info: VideoInfo
    plan: FramePlan
    frames: np.ndarray  # [num_frames, height, width, 3] uint8, already resized
    backend: str
    refused_packets: int = 0  # damaged packets skipped (see MAX_REFUSED_SHARE)


# -- in the worker process ------------------------------------------------------------------

VideoSource = bytes | str  # the encoded bytes, or a path the worker reads itself


def _open(source: VideoSource):
    """A path is handed to the decoders as is (they read it in pieces, so memory does not grow
    with the file); bytes are wrapped in a file-like object."""
    return source if isinstance(source, str) else io.BytesIO(source)


def _probe(data: VideoSource) -> VideoInfo:
    import av

    try:
        with av.open(_open(data), mode="r") as container:
            names = set(container.format.name.split(","))
            if not names & set(ALLOWED_CONTAINERS):
                # (not the demuxer's name: "jpeg_pipe" means nothing to a client)
                raise VideoDecodeError(
                    f"it is not a video in a container this server reads ({CONTAINER_NAMES})"
                )
            if not container.streams.video:
                # (moov, an MP4's index, is written at its end unless made for streaming)
                cut = " (or it was cut short: an MP4 keeps its index at its end)"
                mp4 = bool(names & {"mp4", "mov"})
                raise VideoDecodeError("the file has no video stream" + (cut if mp4 else ""))
            stream = _main_stream(container)
            if stream is None:  # (an audio file's cover)
                raise VideoDecodeError("the file has no video stream (only a cover picture)")
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            duration = (
                float(stream.duration * stream.time_base)
                if stream.duration
                else (container.duration or 0) / 1_000_000
            )
            width, height = stream.codec_context.width, stream.codec_context.height
            pixel_shape = _pixel_aspect(stream)
            rotation = _rotation(container, stream)
            header = duration
            estimated = bool(names & ESTIMATED_DURATIONS)
            duration = _measured_duration(container, stream, duration, fps, estimated)
            duration = round(duration, 6)  # (1.9999999999999998 s planned 3 frames, not 4)
            num_frames = stream.frames or int(duration * fps)
            if duration < header:  # (cut short: its header counts frames it does not hold)
                num_frames = min(num_frames, max(1, round(duration * fps)))
    except VideoDecodeError:
        raise
    except Exception:
        raise VideoDecodeError("the data is not a readable video") from None
    if fps <= 0 or duration <= 0 or num_frames <= 0 or min(width, height) <= 0:
        raise VideoDecodeError("the video has no decodable frames")
    if width * height > MAX_FRAME_PIXELS:
        raise VideoDecodeError(
            f"its frames are {width}x{height}, above {MAX_FRAME_PIXELS} pixels (8K)"
        )
    width = max(1, round(width * pixel_shape))  # (as shown: the frames are scaled to it)
    if rotation % 180:
        width, height = height, width
    return VideoInfo(duration, fps, num_frames, width, height, rotation, max(header, 0.0))


def _pixel_aspect(stream) -> float:
    """How wide a stored pixel is shown, for its height, as ffmpeg guesses it (the container's
    word first, then the codec's): a DVD's 720x480 at 32:27 is shown 853x480, an HDV camera's
    1440x1080 at 4:3 is 1920x1080. Frames are read at that shape, not squeezed; 1 where none
    is given, or beyond 4:1 either way (no real video's: a damaged header's)."""
    for ratio in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        if ratio and 0.25 <= ratio <= 4:
            return float(ratio)
    return 1.0


def _main_stream(container):  # noqa: ANN202 (a PyAV stream, or None)
    """The video stream to read, bounded (_bounded): as ffmpeg picks one, the largest picture,
    never cover art (a file's first stream may be a 64x64 cover before a 10 s video, a dash
    camera's a small copy of the full one); the first of equals. None: only cover art."""
    streams = [
        s  # (a damaged FLV's demuxer may add a stream with no codec at all)
        for s in container.streams.video
        if not s.disposition & ATTACHED_PIC and s.codec_context is not None
    ]
    if not streams:
        return None
    return _bounded(max(streams, key=lambda s: s.codec_context.width * s.codec_context.height))


def _bounded(stream):
    """The stream, its decoder told to refuse a frame above MAX_FRAME_PIXELS by the frame's
    own size, not the header's."""
    stream.codec_context.options = {"max_pixels": str(MAX_FRAME_PIXELS)}
    return stream


def _measured_duration(
    container, stream, claimed: float, fps: float, estimated: bool = False
) -> float:
    """The stream's duration by its last packets' own times (seeked to its last keyframe and
    demuxed, not decoded: a few ms where the file has an index; a webm without cues is read
    to its end), where the container's header claims more by over a frame and a percent: a
    file claiming 60 s that holds 4 s was sampled at 60 timestamps, 56 of them the last
    frame again. Only ever lowered (a bogus last timestamp must not stretch the plan past
    the frames); the header's where the packets have no times. A header with no duration at
    all (a recording written as it went: a browser's or OBS's webm) is read to its end, and so
    is a file with no packet where its index puts the last keyframe (an MP4 cut short: its
    index, written first for streaming, lists packets past the file's end). `estimated`: the
    header's duration is FFmpeg's guess (MPEG streams have none): the packets' is taken also
    where it is longer, by up to a quarter and a second (a 2 s .mpg was guessed 1.75 s)."""
    if fps <= 0:  # (refused by the caller: no decodable frames)
        return claimed
    try:
        end = 0.0
        if claimed > 0:
            end = _last_packet_end(container, stream, from_s=claimed + 3600)
        if end <= 0:
            end = _last_packet_end(container, stream, from_s=0.0)
    except Exception:  # (a stream that cannot seek: the header's word)
        return claimed
    measured = end - _start_s(stream)
    if claimed <= 0 < measured or (estimated and claimed < measured <= claimed * 1.25 + 1):
        return measured
    if measured <= 0 or claimed - measured <= 1.5 / fps + 0.01 * claimed:
        return claimed
    return measured


def _last_packet_end(container, stream, from_s: float) -> float:
    """When the stream's last timed packet ends, demuxed from the keyframe at or before
    `from_s` (stream seconds) to the end of the file; 0 where none has a time."""
    base = stream.time_base
    container.seek(int(from_s / base), stream=stream, backward=True)
    return max(
        (
            float((packet.pts + (packet.duration or 0)) * base)
            for packet in container.demux(stream)
            if packet.pts is not None
        ),
        default=0.0,
    )


def _rotation(container, stream) -> int:
    """How the frames are turned for display (a phone's portrait video is stored sideways,
    with a display matrix): 0, 90, 180 or 270 degrees counter-clockwise. Read off the first
    frame (PyAV has it there): PyAV's frames come as stored and are turned here (_upright)."""
    try:
        frame = next(_decoded(container, stream, _Damage()), None)
        degrees = getattr(frame, "rotation", 0) or 0  # (PyAV from 14.1)
    except Exception:
        return 0
    return round(degrees / 90) % 4 * 90


def _upright(frame, size: tuple[int, int] | None, rotation: int) -> np.ndarray:
    """A PyAV frame as displayed, scaled to size (width, height, as displayed) on the way."""
    turns = rotation // 90
    if size is not None and turns % 2:
        size = (size[1], size[0])  # (the stored frame's sides)
    scale = {"width": size[0], "height": size[1]} if size else {}
    array = frame.to_ndarray(format="rgb24", **scale)
    return np.ascontiguousarray(np.rot90(array, turns)) if turns else array


def _read_pyav(
    data: VideoSource,
    timestamps: list[float],
    size: tuple[int, int] | None = None,
    rotation: int = 0,
    damage: _Damage | None = None,
) -> tuple[np.ndarray, list[float]]:
    """(frames, their times): for each timestamp (in order), the frame shown then, the last to
    start at or before it (the first frame, where none does), by the frames' own times, which
    a variable frame rate spaces unevenly; where that is the frame the timestamp before read,
    the next one if it starts before the next timestamp (a gap's length on, for the last);
    size (width, height, as displayed): each scaled as
    it is converted. One pass: decoding runs on from one planned frame to the next, and seeks
    only where a keyframe lies between them (decoding from there is less work)."""
    frames, times = [], []
    walk = _FrameWalk(data, damage if damage is not None else _Damage())
    try:
        start = walk.start
        keyframes = _keyframe_times(walk.container, walk.stream)
        for i, target in enumerate(timestamps):
            at = start + target  # (the stream's own clock: a recording may start at 10 s)
            shown = walk.current
            if shown is None or shown.time is None or at < shown.time:
                walk.seek(at)  # (no times to go by, or back: as the first read)
            elif bisect.bisect_right(keyframes, at) > bisect.bisect_right(keyframes, shown.time):
                walk.seek(at)  # (a keyframe after the shown frame, at or before the target)
            chosen = walk.shown_at(at)
            if chosen is None:
                raise VideoDecodeError(
                    UNDECODABLE if walk.damage.refused else "a planned frame could not be decoded"
                )
            if i > 0 and (chosen is shown or _time_of(chosen, start, target) <= times[-1]):
                # A variable frame rate held the last frame past this time too (or a stream's
                # first frame comes after it): the next one instead, where it comes before
                # the next planned time (not the same frame read, captioned and paid for
                # twice).
                step = timestamps[i + 1] - target if i + 1 < len(timestamps) else None
                following = at + (step if step is not None else target - timestamps[i - 1])
                following_frame = walk.take_next(before=following)
                walk.damage.repeats += following_frame is None
                chosen = following_frame or chosen
            frames.append(_upright(chosen, size, rotation))
            times.append(_time_of(chosen, start, target))
    finally:
        walk.close()
    return np.stack(frames), times


def _keyframe_times(container, stream) -> list[float]:
    """The stream's keyframes' times, in order, from its packets (demuxed, not decoded: the
    file read once, 0.1-0.15 s for a minute of 720p H.264 on the 2-core test machine); []
    where its packets have no times."""
    base = stream.time_base
    found = [
        float(packet.pts * base)
        for packet in container.demux(stream)
        if packet.is_keyframe and packet.pts is not None
    ]
    return sorted(found)


@dataclass
class _Damage:
    """What one video's reads met: the packets demuxed and those the decoder refused (each
    once, however often a seek reads it again), and planned frames that were a frame already
    read, for want of another before the next planned time."""

    read: set[tuple[int | None, int | None]] = field(default_factory=set)
    refused: set[tuple[int | None, int | None]] = field(default_factory=set)
    repeats: int = 0

    def check(self, planned: int) -> None:
        """Refuses a video too damaged to be worth reading: a quarter of its packets refused,
        or, damaged, a quarter of its planned frames repeats (a hole the demuxer skipped: the
        frame before it shown again and again)."""
        too_many = len(self.refused) > len(self.read) * MAX_REFUSED_SHARE
        if too_many or (self.refused and self.repeats > planned * MAX_REFUSED_SHARE):
            raise VideoDecodeError(UNDECODABLE)


def _decoded(container, stream, damage: _Damage):  # noqa: ANN202 (PyAV frames)
    """The stream's frames from the demuxer's place on. A packet the decoder refuses is
    skipped, as players skip it: the frames after it are decoded (with a glitch up to the next
    keyframe) and the video is not lost for one bad packet (200 bytes overwritten in the
    middle of an MP4 lost 2 of its 100 frames this way; the whole video was refused)."""
    import av

    for packet in container.demux(stream):
        key = (packet.pos, packet.pts)
        if packet.size:  # (not the empty packet that flushes the decoder at the end)
            damage.read.add(key)
        try:
            yield from packet.decode()
        except av.error.FFmpegError:
            damage.refused.add(key)


class _FrameWalk:
    """A video's frames as decoded from the last seek on: `current`, the last one taken, and
    the next one, decoded but not yet taken (it may be the frame a later timestamp shows)."""

    def __init__(self, data: VideoSource, damage: _Damage):
        self.data, self.damage = data, damage
        self._open()

    def _open(self) -> None:
        import av

        self.container = av.open(_open(self.data), mode="r")
        self.stream = _main_stream(self.container)
        self.start = _start_s(self.stream)
        rate = float(self.stream.average_rate or self.stream.guessed_rate or 0)
        self.slack = 1.5 / rate if rate > 0 else 0.1  # (a frame and a half)
        self.frames = _decoded(self.container, self.stream, self.damage)
        self.current = self.upcoming = None

    def close(self) -> None:
        self.container.close()

    def seek(self, at: float) -> None:
        """To a keyframe at or before `at` (stream seconds). Where the container's seek lands
        past it (MPEG-TS and -PS seek by estimated byte offsets, then on to a keyframe: a seek
        to 0.2 s gave the frame at 3.7 s; FLV's index put one past the last frame), it seeks
        again from 1, 2, 4... s earlier until one lands at or before it, and where even the
        start does not, reads from the first frame."""
        back = 0.0
        while True:
            to = max(at - back, self.start)
            self.container.seek(int(to / self.stream.time_base), stream=self.stream, backward=True)
            self.frames = _decoded(self.container, self.stream, self.damage)
            self.current, self.upcoming = None, next(self.frames, None)
            landed = self.upcoming  # (None: past every frame)
            if landed is not None and (landed.time is None or landed.time <= at + self.slack):
                return
            if to <= self.start:
                self.close()
                self._open()
                return
            back = max(2 * back, 1.0)

    def shown_at(self, at: float):  # noqa: ANN201 (a PyAV frame, or None)
        """The frame on screen at `at`: frames are taken while the next starts at or before
        it; the first one after a seek is taken whatever its time (or if it has none)."""
        while True:
            if self.upcoming is None:
                self.upcoming = next(self.frames, None)
                if self.upcoming is None:  # (the stream's end: the last frame stays shown)
                    return self.current
            later = self.upcoming.time is None or self.upcoming.time > at
            if self.current is not None and later:
                return self.current
            self.current, self.upcoming = self.upcoming, None
            if later:  # (the first frame after the seek, past `at` or without a time)
                return self.current

    def take_next(self, before: float):  # noqa: ANN201 (a PyAV frame, or None)
        """The frame after the current one, taken if it starts before `before`; None where
        there is none."""
        if self.upcoming is None:
            self.upcoming = next(self.frames, None)
        following = self.upcoming
        if following is None or (following.time is not None and following.time >= before):
            return None
        self.current, self.upcoming = following, None
        return following


def _start_s(stream) -> float:
    """When the stream starts on its own clock (0 but for recordings cut from a longer one):
    a frame's time from the start of the video is its own time less this."""
    return float(stream.start_time * stream.time_base) if stream.start_time else 0.0


def _time_of(frame, start: float, planned: float) -> float:
    """The frame's time from the start of the video (the planned one where it has none)."""
    return max(float(frame.time) - start, 0.0) if frame.time is not None else planned


def _read_keyframes(
    data: VideoSource,
    timestamps: list[float],
    size: tuple[int, int],
    max_shift_s: float,
    rotation: int = 0,
    damage: _Damage | None = None,
) -> tuple[np.ndarray, list[float]]:
    """For each timestamp, the keyframe at or before it, decoding keyframes only (the decoder
    skips every other frame): for sparse plans on long videos, N decodes instead of everything
    between them. Where that keyframe would repeat the previous one or lie a whole gap early,
    that one frame is decoded exactly instead. Returns the frames and their actual times."""
    import av

    frames, times = [], []
    damage = damage if damage is not None else _Damage()
    with av.open(_open(data), mode="r") as container:
        stream = _main_stream(container)
        start = _start_s(stream)
        for target in timestamps:
            at = start + target  # (the stream's own clock)
            frame = _first_frame_from(container, stream, at, damage, keyframes_only=True)
            if frame.time is not None and frame.time - at > max_shift_s / 2:
                raise _SeekedPast  # (read exactly instead: see _FrameWalk.seek)
            too_far = frame.time is None or at - frame.time > max_shift_s
            if too_far or (times and _time_of(frame, start, target) <= times[-1]):
                frame = _first_frame_from(container, stream, at, damage, keyframes_only=False)
            # Scaled as it is converted: a full-size copy of each frame is never kept.
            frames.append(_upright(frame, size, rotation))
            times.append(_time_of(frame, start, target))
    return np.stack(frames), times


class _SeekedPast(Exception):
    """The container's seek landed well past its target (see _FrameWalk)."""


def _first_frame_from(  # noqa: ANN202 (a PyAV frame)
    container, stream, target: float, damage: _Damage, keyframes_only: bool
):
    """keyframes_only: the keyframe at or before target; else the first frame at or after it."""
    stream.codec_context.skip_frame = "NONKEY" if keyframes_only else "DEFAULT"
    container.seek(int(target / stream.time_base), stream=stream, backward=True)
    chosen = None
    for frame in _decoded(container, stream, damage):
        chosen = frame
        if keyframes_only or frame.time is None or frame.time >= target:
            break
    if chosen is None:
        raise VideoDecodeError("a planned frame could not be decoded")
    return chosen


def decode_job(
    data: VideoSource, budget: TokenBudget, request: FrameRequest, max_fps: float
) -> DecodedVideo:
    """Probe, plan and decode; runs in a worker process."""
    info = _probe(data)
    try:
        plan = plan_frames(info, budget, request, server_fps=max_fps)
    except PlanError as exc:
        raise plan_error(exc) from None
    if request.use_scenes:
        plan = _plan_scenes(data, info, plan, budget, request)
    gap = info.duration_s / plan.num_frames
    size = (plan.width, plan.height)
    # (not a scene's frame: a keyframe up to a gap early can lie in the scene before it, and
    # the scene go unseen)
    if gap >= KEYFRAME_SNAP_MIN_GAP_S and not request.use_scenes:
        damage = _Damage()
        try:
            frames, times = _read_keyframes(
                data, list(plan.timestamps), size, gap, info.rotation, damage
            )
            damage.check(plan.num_frames)
            plan = replace(plan, timestamps=tuple(times))
            return DecodedVideo(info, plan, frames, "pyav-keyframes", len(damage.refused))
        except Exception:
            pass  # an odd stream: read the exact frames below
    damage = _Damage()
    frames, backend, times = _read_frames(data, list(plan.timestamps), size, info, damage)
    damage.check(plan.num_frames)
    plan = replace(plan, timestamps=tuple(times))
    return DecodedVideo(info, plan, frames, backend, len(damage.refused))


def _read_frames(
    data: VideoSource,
    timestamps: list[float],
    size: tuple[int, int],
    info: VideoInfo,
    damage: _Damage | None = None,
) -> tuple[np.ndarray, str, list[float]]:
    """(frames, backend, their times), read by PyAV (see _read_pyav)."""
    try:
        frames, times = _read_pyav(data, timestamps, size, info.rotation, damage)
    except VideoDecodeError:
        raise
    except Exception:
        raise VideoDecodeError(UNDECODABLE) from None
    return frames, "pyav", times


def _plan_scenes(
    data: VideoSource, info: VideoInfo, plan: FramePlan, budget: TokenBudget, request: FrameRequest
) -> FramePlan:
    """One frame per scene (the middle of it), scenes found on a cheap low-resolution pass."""
    times = scenes.sample_times(info.duration_s)
    low, _, _ = _read_frames(data, times, scenes.SCENE_SAMPLE_SIZE, info)
    cuts = scenes.detect_cuts(low, times)
    found = scenes.merge_to_budget(scenes.scenes_from_cuts(cuts, info.duration_s), plan.num_frames)
    return at_timestamps(plan, [s.middle_s for s in found], info, budget, request.mode)


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    # Ctrl-C reaches the terminal's whole process group: the server drains first and then
    # closes its workers itself, so a worker must finish the video it is decoding.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send("ready")  # (from here on a Ctrl-C leaves it be: the server waits for this)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        try:
            answer: tuple[str, object] = ("ok", decode_job(*job))
        except VideoNoRoom as exc:
            answer = ("no_room", str(exc))
        except VideoDecodeError as exc:
            answer = ("error", str(exc))
        except Exception:
            answer = ("error", "the video could not be decoded")
        conn.send(answer)
        # The video and its frames are freed now: hand glibc's kept pages back (measured on a
        # 3 s test clip, 2,000 decodes through a one-worker pool: the worker at 106-109 MiB
        # without, 96-100 MiB with; in one process, 4,000 decodes: 87 -> 103 MiB without,
        # 83 -> 88 MiB with; ~2 ms a call).
        del job, answer
        return_freed_memory()


# -- in the server ---------------------------------------------------------------------------


WORKER_START_TIMEOUT_S = 60.0


class _Worker:
    def __init__(self, context: multiprocessing.context.BaseContext):
        self.conn, child = context.Pipe()
        self.process: BaseProcess = context.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        self.jobs = 0  # decoded
        child.close()

    def wait_ready(self) -> None:
        """Until it has started (a Ctrl-C while a spawned worker still imports would kill
        it with a traceback); one that does not start is left dead (respawned when used)."""
        try:
            if self.conn.poll(WORKER_START_TIMEOUT_S):
                self.conn.recv()
                return
        except (EOFError, OSError):
            pass
        logger.warning("a video decode worker did not start")
        self.kill()

    @classmethod
    def started(cls, context: multiprocessing.context.BaseContext) -> _Worker:
        worker = cls(context)
        worker.wait_ready()
        return worker

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.conn.close()


def _exchange(worker: _Worker, job: tuple, timeout_s: float) -> tuple[str, object]:
    worker.conn.send(job)
    if not worker.conn.poll(timeout_s):
        raise TimeoutError
    return worker.conn.recv()


class VideoDecoder:
    """A pool of decode worker processes, each job with a deadline."""

    def __init__(
        self,
        num_workers: int,
        timeout_s: float,
        max_fps: float = DEFAULT_FPS,
        max_jobs_per_worker: int = 0,
    ):
        self.timeout_s = timeout_s
        self.max_fps = max_fps
        # A worker is replaced after this many decodes (0: never), as gunicorn's --max-requests
        # and Celery's max_tasks_per_child do: what a long-lived decoder process keeps growing
        # by (FFmpeg's and the allocator's leftovers, ~1-2 MiB per 1,000 decodes of a test
        # clip, more for odd files) is then bounded whatever the uptime.
        self.max_jobs_per_worker = max_jobs_per_worker
        self.context = multiprocessing.get_context("spawn")  # no torch state, no forked threads
        self.num_workers = num_workers
        self.idle: asyncio.Queue[_Worker] | None = None
        self.replacing: set[asyncio.Task] = set()
        self.backends_seen: set[str] = set()

    async def start(self) -> None:
        self.idle = asyncio.Queue()

        def started_together() -> list[_Worker]:
            workers = [_Worker(self.context) for _ in range(self.num_workers)]
            for worker in workers:
                worker.wait_ready()
            return workers

        workers = await asyncio.to_thread(started_together)
        for worker in workers:
            self.idle.put_nowait(worker)

    async def close(self) -> None:
        await asyncio.gather(*self.replacing, return_exceptions=True)  # (then in the queue)
        while self.idle is not None and not self.idle.empty():
            self.idle.get_nowait().kill()

    def _replace(self, worker: _Worker) -> None:
        """Stops a worker and starts its successor off the request's path (the answer is not
        held back for it); until it is ready the pool has one worker fewer."""

        def swap() -> _Worker:  # (in a thread: killing waits for the process to end)
            worker.kill()
            return _Worker.started(self.context)

        async def replace() -> None:
            assert self.idle is not None
            self.idle.put_nowait(await asyncio.to_thread(swap))

        task = asyncio.create_task(replace())
        self.replacing.add(task)
        task.add_done_callback(self.replacing.discard)

    async def decode(
        self, data: VideoSource, budget: TokenBudget, request: FrameRequest
    ) -> DecodedVideo:
        assert self.idle is not None, "VideoDecoder.start() was not awaited"
        worker = await self.idle.get()
        healthy = cancelled = False
        try:
            if not worker.process.is_alive():  # (died while idle: replaced here)
                worker = await asyncio.to_thread(_Worker.started, self.context)
            job = (data, budget, request, self.max_fps)
            # Sending a big video and receiving 60 frames are pipe copies: off the event loop.
            status, result = await asyncio.to_thread(_exchange, worker, job, self.timeout_s)
            healthy = True
            worker.jobs += 1
        except asyncio.CancelledError:  # (its client went away: routine, not a fault)
            cancelled = True
            raise
        except TimeoutError:
            raise VideoDecodeError(f"decoding took longer than {self.timeout_s:.0f} s") from None
        except (EOFError, OSError):
            raise VideoDecodeError("the decoder crashed on this video") from None
        finally:
            if cancelled:
                logger.info("stopping a video decode worker: its request was cancelled")
            elif not healthy:
                logger.warning("killing a video decode worker (crashed or hung)")
            elif worker.jobs == self.max_jobs_per_worker:
                logger.info("replacing a video decode worker after %d decodes", worker.jobs)
            if healthy and worker.jobs != self.max_jobs_per_worker:
                self.idle.put_nowait(worker)
            else:
                self._replace(worker)
        if status == "no_room":
            raise VideoNoRoom(result)
        if status == "error":
            raise VideoDecodeError(result)
        info = result.info
        if info.header_duration_s > info.duration_s * 1.1 + 1:
            logger.warning(
                "the video holds %.1f s of the %.1f s its header claims (cut short, or damaged "
                "where its container cannot read on): read as far as it goes",
                info.duration_s,
                info.header_duration_s,
            )
        if result.refused_packets:
            logger.warning(
                "the video had %d damaged packets: skipped, as players skip them",
                result.refused_packets,
            )
        if result.backend not in self.backends_seen:
            self.backends_seen.add(result.backend)
            logger.info("video frames are decoded with %s", result.backend)
        return result
