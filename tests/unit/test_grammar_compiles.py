"""The compile queue for new grammars (engine/grammar_compiles.py), on its own: its
compile is the engine's (here a stand-in that takes time and may refuse the grammar, as
xgrammar does), its waiting and refusals asyncio's."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest

from server.engine.grammar_compiles import GrammarCompiles
from server.engine.structured import InvalidSchema, StructuredOutput
from server.exceptions import EngineOverloaded

pytestmark = pytest.mark.anyio


class Compiler:
    """What GrammarCompiles asks of the engine: a compile of 0.2 s, a refusal for 'bad'."""

    def __init__(self) -> None:
        self.done: set[StructuredOutput] = set()

    def salted(self, spec: StructuredOutput) -> StructuredOutput:
        return spec

    def is_grammar_compiled(self, spec: StructuredOutput) -> bool:
        return spec in self.done

    def compile_grammar(self, spec: StructuredOutput) -> None:
        time.sleep(0.2)
        if "bad" in (spec.schema_json or ""):
            raise InvalidSchema("bad one")
        self.done.add(spec)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_burst_waits_for_places_and_past_its_wait_is_refused() -> None:
    compiles, engine = GrammarCompiles(), Compiler()
    compiles.MAX_WAITING = 2
    specs = [StructuredOutput.regex(x) for x in ("bad", "a", "b", "c", "d")]
    results = await asyncio.gather(
        *(compiles.run(engine, s) for s in specs),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    assert isinstance(results[0], InvalidSchema) and results[1:] == [None] * 4
    compiles.MAX_QUEUE_S = 0.05
    specs = [StructuredOutput.regex(f"late{i}") for i in range(4)]
    results = await asyncio.gather(
        *(compiles.run(engine, s) for s in specs),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [type(None)] * 2 + [EngineOverloaded] * 2
    assert not compiles.compiling


async def test_a_failed_compile_nobody_waits_for_any_more_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its one request went (the client hung up) before the compile failed: the error was
    never read, and asyncio logged it with a traceback ("Future exception was never
    retrieved") when the future was collected."""
    compiles, engine = GrammarCompiles(), Compiler()
    task = asyncio.create_task(compiles.run(engine, StructuredOutput.regex("bad")))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await asyncio.sleep(0.3)
        gc.collect()
        await asyncio.sleep(0.05)
    assert not compiles.compiling
    assert "never retrieved" not in caplog.text
