"""New structured-output grammars compiled off the event loop, a few at a time (the engine
holds one queue: chat, completions and categories requests share it)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from server.engine.structured import StructuredOutput
from server.exceptions import EngineOverloaded

if TYPE_CHECKING:
    from server.engine.engine import AsyncEngine


class GrammarCompiles:
    """New grammars compile on threads of their own: a slow compile (a large schema or choice
    list) must not hold the default pool that prompt templating and media work share. At most
    MAX_WAITING distinct new grammars compile or wait at once; a request for another waits up
    to MAX_QUEUE_S for one of them to end, then is told to retry (503) rather than queue on
    (a burst of 16 new schemas, a quarter of a second each, had 8 of them refused at once).
    Requests for a grammar already compiling wait for that one compile (fifty first requests
    for one schema are one compile, not fifty); a grammar compiled before is a cache lookup
    and is never refused."""

    THREADS = 2
    MAX_WAITING = 8
    MAX_QUEUE_S = 10.0

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(self.THREADS, thread_name_prefix="grammar")
        self.compiling: dict[StructuredOutput, asyncio.Future[None]] = {}

    async def run(self, engine: AsyncEngine, spec: StructuredOutput) -> None:
        spec = engine.salted(spec)  # (here: the compile thread does not see the request)
        deadline = time.monotonic() + self.MAX_QUEUE_S
        while not engine.is_grammar_compiled(spec):
            compiling = self.compiling.get(spec) or self._start(engine, spec)
            if compiling is not None:
                await asyncio.shield(compiling)  # one waiter leaving does not cancel the others
                return
            left = deadline - time.monotonic()
            if left <= 0 or not self.compiling:
                raise EngineOverloaded(
                    "Too many new structured-output grammars are compiling; retry shortly.",
                    retry_after_s=5,
                )
            # (whichever ends first frees a place; its own errors are its requests')
            await asyncio.wait(
                set(self.compiling.values()), timeout=left, return_when=asyncio.FIRST_COMPLETED
            )

    def _start(self, engine: AsyncEngine, spec: StructuredOutput) -> asyncio.Future[None] | None:
        """The grammar's compile started, or None while MAX_WAITING others are compiling."""
        if len(self.compiling) >= self.MAX_WAITING:
            return None
        compiling = asyncio.get_running_loop().run_in_executor(
            self.pool, engine.compile_grammar, spec
        )
        self.compiling[spec] = compiling
        compiling.add_done_callback(lambda _: self.compiling.pop(spec, None))
        # (its error read here too: the requests waiting on it may all have gone)
        compiling.add_done_callback(lambda done: done.cancelled() or done.exception())
        return compiling

    def close(self) -> None:
        """Its threads go (a compile still running ends there; nothing waits for it)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
