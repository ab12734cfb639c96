"""Video decoding in worker processes: probe, plan, read only the planned frames, resize.

Decoders crash and hang on hostile files (decord#229), so decoding never runs in the server
process: a small pool of spawned worker processes does it, each job with a deadline. A worker
that dies or overruns is killed and replaced, and only its request gets a 4xx.

Inside a worker: PyAV opens the container first (cheap: headers only) to check the format and
read duration, fps, frame count and size; the planner picks the frames; decord reads exactly
those (`get_batch`, seeking, never the whole video) and PyAV is the fallback reader. Peak memory
is the encoded bytes plus the planned frames, whatever the video's length.
"""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import multiprocessing.connection
import signal
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess

import numpy as np

from server.media import scenes
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
# Containers we read: mp4/mov (H.264, H.265...), matroska/webm (VP8/VP9/AV1...), avi.
ALLOWED_CONTAINERS = ("mp4", "mov", "matroska", "webm", "avi")
# A video whose frames are larger (DCI 8K) is refused before a frame is decoded: a 424 KB
# file of 12000x12000 frames took a decode worker 1.5 GB. Where each frame carries its own
# size (MJPEG), PyAV's decoder refuses a larger one (FFmpeg's max_pixels).
MAX_FRAME_PIXELS = 8192 * 4320
UNDECODABLE = "the video's frames could not be decoded (corrupt, or a frame above 8K)"


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
                    "it is not a video in a container this server reads (mp4, mov, mkv, webm, avi)"
                )
            if not container.streams.video:
                raise VideoDecodeError("the file has no video stream")
            stream = _bounded(container.streams.video[0])
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            duration = (
                float(stream.duration * stream.time_base)
                if stream.duration
                else (container.duration or 0) / 1_000_000
            )
            width, height = stream.codec_context.width, stream.codec_context.height
            rotation = _rotation(container, stream)
            duration = _measured_duration(container, stream, duration, fps)
            num_frames = stream.frames or int(duration * fps)
            intra_only = bool(stream.codec_context.codec.intra_only)
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
    if rotation % 180:
        width, height = height, width
    return VideoInfo(duration, fps, num_frames, width, height, rotation, intra_only)


def _bounded(stream):
    """The stream, its decoder told to refuse a frame above MAX_FRAME_PIXELS: the frame's own
    size, which in MJPEG each frame has, not the header's (decord's cannot be told so)."""
    stream.codec_context.options = {"max_pixels": str(MAX_FRAME_PIXELS)}
    return stream


def _measured_duration(container, stream, claimed: float, fps: float) -> float:
    """The stream's duration by its last packets' own times (seeked to its last keyframe and
    demuxed, not decoded: a few ms where the file has an index; a webm without cues is read
    to its end), where the container's header claims more by over a frame and a percent: a
    file claiming 60 s that holds 4 s was sampled at 60 timestamps, 56 of them the last
    frame again. Only ever lowered (a bogus last timestamp must not stretch the plan past
    the frames); the header's where the packets have no times."""
    if fps <= 0:  # (refused by the caller: no decodable frames)
        return claimed
    try:
        base = stream.time_base
        container.seek(int((claimed + 3600) / base), stream=stream, backward=True)
        ends = [
            float((packet.pts + (packet.duration or 0)) * base)
            for packet in container.demux(stream)
            if packet.pts is not None
        ]
    except Exception:  # (a stream that cannot seek: the header's word)
        return claimed
    measured = max(ends, default=0.0) - _start_s(stream)
    if measured <= 0 or claimed - measured <= 1.5 / fps + 0.01 * claimed:
        return claimed
    return measured


def _rotation(container, stream) -> int:
    """How the frames are turned for display (a phone's portrait video is stored sideways,
    with a display matrix): 0, 90, 180 or 270 degrees counter-clockwise. Read off the first
    frame (PyAV has it there); decord turns its frames itself, PyAV's are turned here."""
    try:
        frame = next(container.decode(stream), None)
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


def _decord_reader(data: VideoSource, size: tuple[int, int], gpu: bool = True):
    """A decord reader on the GPU (NVDEC) when this decord was built with CUDA, a GPU is
    there and `gpu` allows it, else on the CPU (the PyPI wheel is CPU-only). Returns
    (reader, "gpu" | "cpu")."""
    import decord

    if gpu and decord.gpu(0).exist:
        try:
            ctx = decord.gpu(0)
            return decord.VideoReader(_open(data), ctx=ctx, width=size[0], height=size[1]), "gpu"
        except Exception:
            pass  # a CPU-only build: fall through
    reader = decord.VideoReader(
        _open(data), ctx=decord.cpu(0), num_threads=1, width=size[0], height=size[1]
    )
    return reader, "cpu"


def _read_decord(
    data: VideoSource, timestamps: list[float], size: tuple[int, int] = (-1, -1), rotation: int = 0
) -> tuple[np.ndarray, str, list[float]]:
    """(frames, "decord-gpu" | "decord-cpu", their times): the frame shown at each timestamp
    (the last to start at or before it), by the frames' own times, which a variable frame
    rate spaces unevenly (index = time x average fps was seconds off, and the time reported
    the planned one); size (width, height, as displayed): decord resizes while decoding (-1:
    as stored). A rotated video is read on the CPU, whose decoder turns its frames (the CUDA
    one does not)."""
    reader, device = _decord_reader(data, size, gpu=rotation == 0)
    last = len(reader) - 1
    starts = reader.get_frame_timestamp(list(range(len(reader))))[:, 0]  # (from the index)
    if _in_order(starts):
        shown = np.searchsorted(starts, np.asarray(timestamps), side="right") - 1
        indices = np.clip(shown, 0, last).tolist()
        times = [float(starts[i]) for i in indices]
    else:  # no frame times in the stream (H.264 in AVI: -9e17 each): by the average rate
        fps = reader.get_avg_fps()
        indices = [min(max(int(t * fps), 0), last) for t in timestamps]
        times = list(timestamps)
    return reader.get_batch(indices).asnumpy(), f"decord-{device}", times


def _in_order(starts: np.ndarray) -> bool:
    """Whether frame start times are ones to read by: finite, from 0, never going back.
    (Negative ones are frames an edit list cuts, which decord's index lists but its batch
    reads skip: by them, every frame read was that many too late.)"""
    return (
        len(starts) > 0
        and bool(np.isfinite(starts).all())
        and starts[0] >= -1e-3
        and bool((np.diff(starts) >= 0).all())
    )


def _read_pyav(
    data: VideoSource,
    timestamps: list[float],
    size: tuple[int, int] | None = None,
    rotation: int = 0,
) -> tuple[np.ndarray, list[float]]:
    """(frames, their times): the frame shown at each timestamp, as _read_decord reads it."""
    import av

    frames, times = [], []
    with av.open(_open(data), mode="r") as container:
        stream = _bounded(container.streams.video[0])
        start = _start_s(stream)
        for target in timestamps:
            at = start + target  # (the stream's own clock: a recording may start at 10 s)
            container.seek(int(at / stream.time_base), stream=stream, backward=True)
            chosen = None
            for frame in container.decode(stream):
                if frame.time is not None and frame.time > at and chosen is not None:
                    break  # (the one before it is on screen at target)
                chosen = frame
                if frame.time is None or frame.time > at:
                    break  # (no times to go by, or the first after the seek is later)
            if chosen is None:
                raise VideoDecodeError("a planned frame could not be decoded")
            frames.append(_upright(chosen, size, rotation))
            times.append(_time_of(chosen, start, target))
    return np.stack(frames), times


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
) -> tuple[np.ndarray, list[float]]:
    """For each timestamp, the keyframe at or before it, decoding keyframes only (the decoder
    skips every other frame): for sparse plans on long videos, N decodes instead of everything
    between them. Where that keyframe would repeat the previous one or lie a whole gap early,
    that one frame is decoded exactly instead. Returns the frames and their actual times."""
    import av

    frames, times = [], []
    with av.open(_open(data), mode="r") as container:
        stream = _bounded(container.streams.video[0])
        start = _start_s(stream)
        for target in timestamps:
            at = start + target  # (the stream's own clock)
            frame = _first_frame_from(container, stream, at, keyframes_only=True)
            too_far = frame.time is None or at - frame.time > max_shift_s
            if too_far or (times and _time_of(frame, start, target) <= times[-1]):
                frame = _first_frame_from(container, stream, at, keyframes_only=False)
            # Scaled as it is converted: a full-size copy of each frame is never kept.
            frames.append(_upright(frame, size, rotation))
            times.append(_time_of(frame, start, target))
    return np.stack(frames), times


def _first_frame_from(container, stream, target: float, keyframes_only: bool):
    """keyframes_only: the keyframe at or before target; else the first frame at or after it."""
    stream.codec_context.skip_frame = "NONKEY" if keyframes_only else "DEFAULT"
    container.seek(int(target / stream.time_base), stream=stream, backward=True)
    chosen = None
    for frame in container.decode(stream):
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
    # (not a scene's frame: a keyframe up to a gap early can lie in the scene before it, and
    # the scene go unseen)
    if gap >= KEYFRAME_SNAP_MIN_GAP_S and not request.use_scenes:
        try:
            size = (plan.width, plan.height)
            frames, times = _read_keyframes(data, list(plan.timestamps), size, gap, info.rotation)
            plan = replace(plan, timestamps=tuple(times))
            return DecodedVideo(info, plan, frames, "pyav-keyframes")
        except Exception:
            pass  # an odd stream: read the exact frames below
    size = (plan.width, plan.height)
    frames, backend, times = _read_frames(data, list(plan.timestamps), size, info)
    return DecodedVideo(info, replace(plan, timestamps=tuple(times)), frames, backend)


def _read_frames(
    data: VideoSource, timestamps: list[float], size: tuple[int, int], info: VideoInfo
) -> tuple[np.ndarray, str, list[float]]:
    """(frames, backend, their times): by decord (it scales while decoding: full-size frames
    never exist in memory), else PyAV; by PyAV alone where each frame carries its own size
    (intra-only, MJPEG), as only PyAV's decoder can be bounded to 8K frames."""
    if not info.intra_only:
        try:
            return _read_decord(data, timestamps, size, info.rotation)
        except Exception:
            pass
    try:
        frames, times = _read_pyav(data, timestamps, size, info.rotation)
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


def _quiet_decoders() -> None:
    """decord's FFmpeg writes its complaints about a broken file straight to stderr (lines
    with no time or request id in the server's log); the job's error says what matters.
    PyAV's FFmpeg logging is off by default."""
    try:
        import decord.logging

        decord.logging.set_level(decord.logging.QUIET)
    except ImportError:  # (PyAV alone)
        pass


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    # Ctrl-C reaches the terminal's whole process group: the server drains first and then
    # closes its workers itself, so a worker must finish the video it is decoding.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _quiet_decoders()
    conn.send("ready")  # (from here on a Ctrl-C leaves it be: the server waits for this)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", decode_job(*job)))
        except VideoNoRoom as exc:
            conn.send(("no_room", str(exc)))
        except VideoDecodeError as exc:
            conn.send(("error", str(exc)))
        except Exception:
            conn.send(("error", "the video could not be decoded"))


# -- in the server ---------------------------------------------------------------------------


WORKER_START_TIMEOUT_S = 60.0


class _Worker:
    def __init__(self, context: multiprocessing.context.BaseContext):
        self.conn, child = context.Pipe()
        self.process: BaseProcess = context.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
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

    def __init__(self, num_workers: int, timeout_s: float, max_fps: float = DEFAULT_FPS):
        self.timeout_s = timeout_s
        self.max_fps = max_fps
        self.context = multiprocessing.get_context("spawn")  # no torch state, no forked threads
        self.num_workers = num_workers
        self.idle: asyncio.Queue[_Worker] | None = None
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
        while self.idle is not None and not self.idle.empty():
            self.idle.get_nowait().kill()

    async def decode(
        self, data: VideoSource, budget: TokenBudget, request: FrameRequest
    ) -> DecodedVideo:
        assert self.idle is not None, "VideoDecoder.start() was not awaited"
        worker = await self.idle.get()
        healthy = cancelled = False
        try:
            if not worker.process.is_alive():  # replaced lazily: the pool never shrinks
                worker = await asyncio.to_thread(_Worker.started, self.context)
            job = (data, budget, request, self.max_fps)
            # Sending a big video and receiving 60 frames are pipe copies: off the event loop.
            status, result = await asyncio.to_thread(_exchange, worker, job, self.timeout_s)
            healthy = True
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
            if not healthy:
                worker.kill()
            self.idle.put_nowait(worker)  # dead or alive: a dead one is respawned when next used
        if status == "no_room":
            raise VideoNoRoom(result)
        if status == "error":
            raise VideoDecodeError(result)
        if result.backend not in self.backends_seen:
            self.backends_seen.add(result.backend)
            logger.info("video frames are decoded with %s", result.backend)
        return result
