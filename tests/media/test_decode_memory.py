"""The decode memory budget: images decode together only while their shares fit, in order,
and a share comes back when its thread ends (not when its request goes away)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.media.decode_memory import DecodeMemory
from server.media.image import DECODE_BYTES_PER_PIXEL, decoded_bytes, header_size
from tests.helpers import make_image

pytestmark = pytest.mark.anyio


def blocked(gate: threading.Event, started: list[str], name: str):
    def decode() -> str:
        started.append(name)
        gate.wait(10)
        return name

    return decode


async def until(condition) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


async def decoding(
    memory: DecodeMemory, share: int, gate: threading.Event, started: list[str], name: str
) -> asyncio.Task:
    """A decode of this share, once its thread has started."""
    task = asyncio.create_task(memory.run(share, blocked(gate, started, name)))
    await until(lambda: name in started)
    return task


async def test_a_share_that_does_not_fit_waits_for_the_others() -> None:
    memory, gate, started = DecodeMemory(100), threading.Event(), []
    first = await decoding(memory, 60, gate, started, "first")
    second = asyncio.create_task(memory.run(60, blocked(gate, started, "second")))
    small = asyncio.create_task(memory.run(10, blocked(gate, started, "small")))
    await asyncio.sleep(0.1)
    assert started == ["first"]  # in order: the small one does not pass the waiting one
    gate.set()
    assert [await first, await second, await small] == ["first", "second", "small"]
    assert memory.free == 100


async def test_a_share_above_the_budget_decodes_alone() -> None:
    memory, gate, started = DecodeMemory(100), threading.Event(), []
    huge = await decoding(memory, 10**9, gate, started, "huge")
    assert memory.free == 0
    gate.set()
    assert await huge == "huge" and memory.free == 100


async def test_a_request_that_goes_away_gives_its_share_back_when_its_thread_ends() -> None:
    memory, gate, started = DecodeMemory(100), threading.Event(), []
    running = await decoding(memory, 80, gate, started, "running")
    waiting = asyncio.create_task(memory.run(50, blocked(gate, started, "waiting")))
    behind = asyncio.create_task(memory.run(20, blocked(gate, started, "behind")))
    await asyncio.sleep(0.05)
    waiting.cancel()  # never started: nothing taken, and the one behind it may go
    running.cancel()  # its thread goes on: its share is still in use
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await until(lambda: "behind" in started)
    assert memory.free == 0  # 80 of the running thread's, 20 of behind's
    gate.set()
    assert await behind == "behind"
    await until(lambda: memory.free == 100)
    assert started == ["running", "behind"]


def test_the_share_is_reckoned_from_the_header() -> None:
    png = make_image(320, 240, fmt="PNG")
    assert header_size(png) == (320, 240) and header_size(b"not an image") is None
    assert decoded_bytes((320, 240)) == 320 * 240 * DECODE_BYTES_PER_PIXEL + 320 * 32
    assert decoded_bytes(None) == 0


async def test_freed_decode_memory_goes_back_to_the_system(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """glibc keeps what a decode freed for reuse unless trimmed: this box's C library is glibc,
    so the trim must be found (elsewhere it is skipped), and every decode, one that fails
    too, trims in its own thread (each thread frees into an arena of its own) once it ends."""
    from server.media import decode_memory

    assert decode_memory.MALLOC_TRIM is not None
    decode_memory.return_freed_memory()  # (the real one: callable as declared)
    events: list[tuple[str, str]] = []

    def trim(pad: int) -> int:
        events.append(("trim", threading.current_thread().name))
        return 1

    def decode(fail: bool) -> str:
        events.append(("decode", threading.current_thread().name))
        if fail:
            raise ValueError("truncated image")
        return "pixels"

    monkeypatch.setattr(decode_memory, "MALLOC_TRIM", trim)
    memory = DecodeMemory(100)
    assert await memory.run(10, lambda: decode(False)) == "pixels"
    with pytest.raises(ValueError):
        await memory.run(10, lambda: decode(True))
    assert [what for what, _ in events] == ["decode", "trim"] * 2
    assert all(thread.startswith("image-decode") for _, thread in events)


async def test_a_decode_cancelled_before_its_thread_started_gives_its_share_back() -> None:
    """Its job is cancelled in the pool (its thread never runs it): the share comes back then,
    not never (a budget that leaked so would end by holding every image request)."""
    from concurrent.futures import ThreadPoolExecutor

    memory, gate, started = DecodeMemory(100), threading.Event(), []
    memory._pool = ThreadPoolExecutor(1)  # one thread: the second decode waits in its queue
    first = await decoding(memory, 10, gate, started, "first")
    queued = asyncio.create_task(memory.run(10, blocked(gate, started, "queued")))
    await until(lambda: memory.free == 80)  # both shares taken, one thread busy
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert memory.free == 90
    gate.set()
    assert await first == "first"
    await until(lambda: memory.free == 100)
    assert started == ["first"]
