"""AsyncEngine: the engine surface the pipelines use.

`add_request` -> `stream`/`generate` (async) and `abort`. Inference runs on one worker thread
so the event loop never blocks; results come back through each Sequence's asyncio queue.
For now the worker runs one sequence at a time, first come first served.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.inputs import ModelInputs
from server.engine.loader import LoadedModel
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence, SequenceOutput, SequenceStatus
from server.exceptions import EngineStopped, InvalidRequest
from server.log import request_id_var

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        context_length: int,
        eos_token_ids: tuple[int, ...],
        default_max_tokens: int,
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos_token_ids = frozenset(eos_token_ids)
        self.default_max_tokens = default_max_tokens
        self._waiting: queue.Queue[Sequence | None] = queue.Queue()
        self._sequences: dict[str, Sequence] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, default_max_tokens: int) -> AsyncEngine:
        return cls(
            ModelRunner(loaded),
            loaded.tokenizer,
            loaded.context_length,
            loaded.eos_token_ids,
            default_max_tokens,
        )

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._worker, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        for seq in list(self._sequences.values()):
            seq.is_aborted = True
        self._waiting.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests --------------------------------------------------------------------------
    def add_request(
        self, request_id: str, inputs: ModelInputs, sampling: SamplingParams
    ) -> Sequence:
        if not self.is_running:
            raise EngineStopped("The engine is not running.")
        seq = Sequence(request_id, inputs, sampling, self._max_tokens(inputs, sampling))
        self._sequences[request_id] = seq
        self._waiting.put(seq)
        return seq

    def abort(self, request_id: str) -> None:
        seq = self._sequences.get(request_id)
        if seq is not None:
            seq.is_aborted = True  # the worker notices before the next token

    async def stream(self, seq: Sequence) -> AsyncIterator[SequenceOutput]:
        """Yields outputs until the sequence finishes; leaving early aborts it."""
        try:
            while True:
                output = await seq.outputs.get()
                yield output
                if output.finished:
                    return
        finally:
            if not seq.is_finished:
                self.abort(seq.request_id)

    def _max_tokens(self, inputs: ModelInputs, sampling: SamplingParams) -> int:
        num_prompt = inputs.num_prompt_tokens
        room = self.context_length - num_prompt
        if room <= 0:
            raise InvalidRequest(
                f"This model's maximum context length is {self.context_length} tokens. However, "
                f"your messages resulted in {num_prompt} tokens. Please reduce the length of the "
                "messages or the size of the images.",
                param="messages",
                code="context_length_exceeded",
            )
        if sampling.max_tokens is None:
            return min(self.default_max_tokens, room)
        if sampling.max_tokens > room:
            raise InvalidRequest(
                f"This model's maximum context length is {self.context_length} tokens. However, "
                f"you requested {num_prompt + sampling.max_tokens} tokens ({num_prompt} in the "
                f"messages, {sampling.max_tokens} in the completion). Please reduce the length "
                "of the messages or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return sampling.max_tokens

    # -- worker thread ---------------------------------------------------------------------
    def _worker(self) -> None:
        while (seq := self._waiting.get()) is not None:
            request_id_var.set(seq.request_id)
            self._run(seq)

    def _run(self, seq: Sequence) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, seq.sampling.stop)
        if seq.is_aborted:
            self._finish(seq, detok, "abort")
            return
        seq.status = SequenceStatus.RUNNING
        try:
            self.runner.generate(
                seq.inputs, seq.sampling, seq.max_tokens, lambda t: self._on_token(seq, detok, t)
            )
        except Exception:
            logger.exception("generation failed")
            self._finish(seq, detok, "error")
            return
        if not seq.is_finished:  # generate stopped on its own length limit
            self._finish(seq, detok, "length")

    def _on_token(self, seq: Sequence, detok: IncrementalDetokenizer, token_id: int) -> bool:
        """Post-processes one generated token; returns True when the sequence is done."""
        if seq.is_aborted:
            self._finish(seq, detok, "abort")
            return True
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        seq.output_token_ids.append(token_id)
        if token_id in self.eos_token_ids:
            self._finish(seq, detok, "stop")
            return True
        if token_id in seq.sampling.stop_token_ids:
            self._finish(seq, detok, "stop", stop_reason=token_id)
            return True
        if (stop := detok.add_token(token_id)) is not None:
            self._finish(seq, detok, "stop", stop_reason=stop)
            return True
        if seq.num_completion_tokens >= seq.max_tokens:
            self._finish(seq, detok, "length")
            return True
        if delta := detok.delta():
            self._emit(seq, SequenceOutput(delta, seq.num_completion_tokens))
        return False

    def _finish(
        self,
        seq: Sequence,
        detok: IncrementalDetokenizer,
        reason: str,
        stop_reason: str | int | None = None,
    ) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.finish_time = time.monotonic()
        self._sequences.pop(seq.request_id, None)
        output = SequenceOutput(detok.flush(), seq.num_completion_tokens, True, reason, stop_reason)
        self._emit(seq, output)
        logger.info(
            "finished: %s, %d prompt + %d completion tokens in %.2fs",
            reason,
            seq.inputs.num_prompt_tokens,
            seq.num_completion_tokens,
            seq.finish_time - seq.arrival_time,
        )

    def _emit(self, seq: Sequence, output: SequenceOutput) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(seq.outputs.put_nowait, output)
