"""AsyncEngine: the engine surface the pipelines use, and the continuous-batching loop.

`add_request` -> `stream` / `abort`, all called on the event loop. The loop itself runs on one
worker thread: each iteration takes new requests and aborts from the inbox, lets the scheduler
pick one mixed batch (a token for each running sequence, chunks of the prompts that fit), runs
it through the model, samples the next tokens and post-processes them (detokenize, stop
checks, stream out, free finished sequences at once). Outputs travel back through each
Sequence's asyncio queue.

With async scheduling (`--async-scheduling`) the host does not wait for a step's tokens before
it queues the next step: step t+1 is scheduled and queued while step t's sampling and its copy
to the host are still running, its decodes reading step t's tokens on the device. Step t's
tokens are then read and post-processed while the device computes step t+1; a sequence that
ended with them drops its row of step t+1 (nothing past its end is sampled or kept).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from server.config import EngineConfig
from server.engine import profile
from server.engine.block_manager import BlockManager
from server.engine.decoder import FusedDecoder
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.grammar_compiles import GrammarCompiles
from server.engine.inputs import ModelInputs
from server.engine.loader import LoadedModel
from server.engine.prompt_logprobs import PromptScores
from server.engine.request_limits import RequestLimits
from server.engine.runner import ModelRunner
from server.engine.sampler import FAILED, SampledTokens
from server.engine.sampling import SamplingParams
from server.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from server.engine.sequence import Sequence, SequenceOutput
from server.engine.structured import StructuredOutput
from server.engine.transfer import to_device
from server.exceptions import EngineOverloaded, EngineStopped, InvalidRequest, ModelLoadError
from server.jobs.project import current_project
from server.log import request_id_var

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Seconds a client is told to wait (Retry-After) when the queue is full or timed out.
RETRY_AFTER_S = 1
# The most tokens a reader that fell behind gets in one output (see AsyncEngine.stream): each
# output is formatted in one go, so this bounds how long that holds the event loop. (Measured
# with a client that paused 40 s, then read n=8 top_logprobs=20: /health p99 0.6 s at 64, 0.08 s
# at 16, and more bytes a second.)
MAX_JOINED_TOKENS = 16


def project_salt(project: str, salt: str | None) -> str:
    """A request's cache salt within its project (NUL: no project name or salt holds one)."""
    return f"{project}\0{salt or ''}"


class AsyncEngine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer: object,
        max_seq_len: int,
        default_max_tokens: int,
        async_scheduling: bool = False,
        cache_per_project: bool = False,
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        # What a request may ask (the pipelines check theirs there before adding them).
        self.limits = RequestLimits(
            tokenizer,
            max_seq_len,
            default_max_tokens,
            runner.vocab_size,
            runner.eos_token_ids,
            scheduler.config.policy,
        )
        self.async_scheduling = async_scheduling
        self.cache_per_project = cache_per_project
        self.eos_token_ids = frozenset(runner.eos_token_ids)
        # vLLM's stop_reason: None for the tokenizer's end-of-text, the id for the others
        # (generation_config's, which vLLM counts as stop tokens)
        self.primary_eos_id = runner.eos_token_ids[0] if runner.eos_token_ids else None
        # Called (on the engine thread) with every sequence that ends, however it ends.
        self.on_finish: Callable[[Sequence], object] | None = None
        # Called (on the engine thread) with the sequences that got a token in a step.
        self.on_tokens: Callable[[list[Sequence]], object] | None = None
        # Called (on the engine thread) with the number of tokens of every step that runs.
        self.on_step: Callable[[int], object] | None = None
        # New grammars' compiles, off the event loop, a few at a time (compile_grammar below)
        self.grammar_compiles = GrammarCompiles()
        # New sequences (those added together in one list) and None, a wake-up.
        self._inbox: queue.SimpleQueue[list[Sequence] | None] = queue.SimpleQueue()
        self._sequences: dict[str, Sequence] = {}
        # Accepted but not yet running, in all and by project; guarded by _lock.
        self._num_queued = 0
        self._queued_by_project: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._outbox: list[tuple[Sequence, SequenceOutput]] = []  # delivered once per step
        # The last step's results on their way to the host.
        self._in_flight: InFlight | None = None
        self._preemptions_logged = 0  # (--log-level debug)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def build(cls, loaded: LoadedModel, config: EngineConfig) -> AsyncEngine:
        max_seq_len = min(config.max_model_len or loaded.context_length, loaded.context_length)
        if config.max_model_len > loaded.context_length:  # (past what its positions were for)
            logger.warning(
                "--max-model-len %d is more than the model's context (%d tokens): serving %d.",
                config.max_model_len,
                loaded.context_length,
                loaded.context_length,
            )
        if config.fused_decoder:  # before the memory profile: fusing holds a layer twice
            FusedDecoder.build(loaded.model)
        num_blocks = profile.kv_cache_blocks(loaded, config, max_seq_len)
        max_seq_len = _context_the_cache_holds(num_blocks * config.block_size, max_seq_len, config)
        blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_queued_requests=config.max_queued_requests,
                queue_timeout_s=config.queue_timeout_s,
                policy=config.scheduling_policy,
            ),
            blocks,
        )
        encoder_bytes = int(config.encoder_cache_memory_gib * 2**30)
        runner = ModelRunner(
            loaded,
            num_blocks,
            config.block_size,
            encoder_bytes,
            config.attention_backend,
            graph_batch_sizes=graph_batch_sizes(config, max_seq_len),
            fused_decoder=config.fused_decoder,
            compile_decoder=config.compile_decoder,
            max_grammar_ms_per_token=config.max_grammar_ms_per_token,
        )
        return cls(
            runner,
            scheduler,
            loaded.tokenizer,
            max_seq_len,
            config.default_max_tokens,
            config.async_scheduling,
            config.cache_per_project,
        )

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run_loop, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self.grammar_compiles.close()
        for seq in list(self._sequences.values()):
            seq.is_aborted = True
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 60)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def max_seq_len(self) -> int:
        """The context served (what the KV cache holds, at most the model's)."""
        return self.limits.max_seq_len

    @property
    def num_queued(self) -> int:
        return self._num_queued

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """The queued requests and the preempted ones waiting to run again (vLLM's count)."""
        preempted = sum(1 for seq in list(self.scheduler.waiting) if seq.is_admitted)
        return self._num_queued + preempted

    def stats(self) -> dict[str, float]:
        """Cache and memory figures for /metrics (plain counters; read from any thread)."""
        blocks, encoder = self.scheduler.blocks, self.runner.media.cache
        return {
            "prefix_cache_queried_tokens": blocks.num_queried_tokens,
            "prefix_cache_hit_tokens": blocks.num_hit_tokens,
            "encoder_cache_hits": encoder.num_hits,
            "encoder_cache_misses": encoder.num_misses,
            "preemptions": self.scheduler.num_preemptions,
            "kv_cache_usage": 1 - blocks.num_free_blocks / blocks.num_blocks,
            "kv_cache_blocks": blocks.num_blocks,
            "grammar_cache_bytes": self.runner.grammars.num_bytes,
            "encoder_cache_bytes": encoder.num_bytes,
        }

    def cache_info(self) -> dict[str, str]:
        """The KV cache's configuration (vLLM's cache_config_info labels)."""
        blocks = self.scheduler.blocks
        return {
            "block_size": str(blocks.block_size),
            "num_gpu_blocks": str(blocks.num_blocks),
            "enable_prefix_caching": str(blocks.enable_prefix_caching),
            "cache_dtype": str(self.runner.kv_cache.keys[0].dtype).removeprefix("torch."),
        }

    # -- requests (event loop) -------------------------------------------------------------
    def check_capacity(self) -> None:
        """Room in the queue for this request (its project's), or EngineOverloaded: the
        pipelines ask before their costly work (media, grammars)."""
        with self._lock:
            self._check_room(1, current_project())

    def _check_room(self, count: int, project: str) -> None:
        """Room in the queue for `count` more of `project`'s sequences, or
        EngineOverloaded; under _lock. A batch larger than the whole queue (60 frames, a
        small limit) enters an empty queue: refusing it would refuse that video forever.
        Under "fair" a project holding less than its share of the queue (the limit over the
        projects with sequences queued, its own included) is let in past the limit: one
        project's burst cannot turn every other project away (the queue then holds at most
        twice the limit)."""
        limit = self.scheduler.config.max_queued_requests
        if not self._num_queued or self._num_queued + count <= limit:
            return
        if self.scheduler.config.policy == "fair":
            projects = {p for p, n in self._queued_by_project.items() if n} | {project}
            if (self._queued_by_project[project] + count) * len(projects) <= limit:
                return
        raise _overloaded()

    def add_request(
        self, request_id: str, inputs: ModelInputs, sampling: SamplingParams, num_choices: int = 1
    ) -> Sequence:
        """num_choices: n, the request's choices (this its first; add_requests adds the rest)."""
        seq = self._new_sequence(request_id, inputs, sampling)
        seq.num_choices = num_choices  # (before the engine thread can see it end)
        self._queue([seq])
        return seq

    def _queue(self, seqs: list[Sequence]) -> None:
        """Count sequences as queued if there is room (else EngineOverloaded) and hand them
        to the engine thread, together."""
        with self._lock:
            self._check_room(len(seqs), seqs[0].project)  # (one request's: one project)
            self._count_queued(seqs, 1)
        for seq in seqs:
            self._sequences[seq.request_id] = seq
        self._inbox.put(seqs)

    def _count_queued(self, seqs: list[Sequence], sign: int) -> None:
        """Sequences entering (1) or leaving (-1) the queue; under _lock."""
        self._num_queued += sign * len(seqs)
        for seq in seqs:
            self._queued_by_project[seq.project] += sign

    def _new_sequence(
        self, request_id: str, inputs: ModelInputs, sampling: SamplingParams
    ) -> Sequence:
        if not self.is_running:
            raise EngineStopped("The engine is not running.")
        if request_id in self._sequences:  # ids key the runner's per-sequence state
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if inputs.num_prompt_tokens < 1:  # nothing to prefill would fail the whole step
            raise InvalidRequest("The prompt is empty.", param="messages", code="invalid_value")
        sampling = self.limits.with_bad_word_ids(sampling)
        self.limits.check_sampling(sampling)
        if project := self._cache_project():
            structured = sampling.structured and self.salted(sampling.structured)
            salt = project_salt(project, sampling.cache_salt)
            sampling = replace(sampling, cache_salt=salt, structured=structured)
        seq = Sequence(
            request_id,
            inputs,
            sampling,
            self.limits.max_tokens_for(inputs.num_prompt_tokens, sampling),
        )
        seq.log_id = request_id_var.get()
        seq.project = current_project()
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            sampling.stop,
            sampling.include_stop_str_in_output,
            sampling.skip_special_tokens,
        )
        if sampling.structured is not None:  # compiled by the pipeline just before
            seq.grammar = self.runner.grammars.lookup(sampling.structured)
        return seq

    def salted(self, spec: StructuredOutput) -> StructuredOutput:
        """The grammar cache's key for this request: under --cache-per-project its salt
        includes the request's project (call it where the request's context is)."""
        if not (project := self._cache_project()):
            return spec
        return replace(spec, cache_salt=project_salt(project, spec.cache_salt))

    def _cache_project(self) -> str:
        """The project the request's caches are keyed by ("" unless --cache-per-project)."""
        return current_project() if self.cache_per_project else ""

    def compile_grammar(self, spec: StructuredOutput) -> None:
        """Compile (and cache) a schema's grammar; blocking: call it from a worker thread.
        Raises InvalidSchema for a schema that cannot be compiled."""
        self.runner.grammars.compile(spec)

    def is_grammar_compiled(self, spec: StructuredOutput) -> bool:
        """Whether spec's grammar is cached (a lookup: it is now the most recently used)."""
        return self.runner.grammars.lookup(spec) is not None

    def add_requests(
        self,
        requests: list[tuple[str, ModelInputs, SamplingParams]],
        choices_of: Sequence | None = None,
    ) -> list[Sequence]:
        """Several sequences at once (e.g. every frame of a video): all are validated first,
        then enter the queue together, so the scheduler can prefill them as one batch.
        choices_of: they are that sequence's request's other choices (1, 2, ...)."""
        seqs = [self._new_sequence(*request) for request in requests]
        if choices_of is not None:  # (before the engine thread can see one end)
            for index, seq in enumerate(seqs, start=1):
                seq.choice_index, seq.num_choices = index, choices_of.num_choices
                seq.group_id = choices_of.request_id
        self._queue(seqs)
        return seqs

    def abort(self, request_id: str) -> None:
        seq = self._sequences.get(request_id)
        if seq is not None and not seq.is_finished:
            seq.is_aborted = True  # the loop drops it before its next step
            self._inbox.put(None)  # wake the loop if it is idle

    async def stream(self, seq: Sequence) -> AsyncGenerator[SequenceOutput, None]:
        """Yields outputs until the sequence finishes; leaving early aborts it.

        A reader that fell behind (a slow client) gets what piled up as one output per up to
        MAX_JOINED_TOKENS tokens, and the event loop runs between them: a client that paused,
        then read a backlog of thousands of tokens (with 20 top logprobs each), had it
        formatted in one piece, the server answering no one else for seconds."""
        sent = 0  # the tokens of the outputs yielded so far
        try:
            while True:
                pieces = [await seq.outputs.get()]
                while (
                    not pieces[-1].finished
                    and not seq.outputs.empty()
                    and pieces[-1].num_completion_tokens - sent < MAX_JOINED_TOKENS
                ):
                    pieces.append(seq.outputs.get_nowait())
                output = SequenceOutput.joined(pieces)
                sent = output.num_completion_tokens
                yield output
                if output.finished:
                    return
                if not seq.outputs.empty():
                    await asyncio.sleep(0)  # (a backlog: the others' turn between its pieces)
        finally:
            if not seq.is_finished:
                self.abort(seq.request_id)

    # -- the loop (worker thread) ----------------------------------------------------------
    def _run_loop(self) -> None:
        self.runner.bind_thread()
        while not self._stopping:
            try:
                self._step()
                self._deliver()
            except Exception as exc:
                logger.exception("engine step failed; failing the running sequences")
                in_flight, self._in_flight = self._in_flight, None
                self.runner.take_prompt_logprobs()  # a failed step's, if it got that far
                for seq in [*self.scheduler.running, *(in_flight.seqs if in_flight else [])]:
                    if not seq.is_finished:
                        self._finish(seq, "error")
                if is_fatal_device_error(exc):
                    # A CUDA error poisons the context: stop (health turns 503) rather than
                    # answer every later request with garbage or another error.
                    self._stopping = True
                self._deliver()
        self._stop_in_flight()
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self._finish(seq, "abort")
        while (item := self._take_one()) is not False:
            for seq in item or []:
                self._finish(seq, "abort")
        self._deliver()

    def _step(self) -> None:
        """One step: schedule, queue it on the device, then (while the device computes) read
        the previous step's tokens (`_receive`: with async scheduling, the step before this
        one; else nothing, it was read at the end of its own step), and queue this step's
        sampling for the sequences still going."""
        self._take_inbox(block=not self.scheduler.has_work and self._in_flight is None)
        self._drop_aborted_and_expired()
        batch = self.scheduler.schedule()
        self._started(batch)
        sampled = batch.sampled  # read before commit moves the sequences past this step
        logits = None if batch.is_empty else self.runner.forward(batch, sampled)
        prompt_scores = self.runner.take_prompt_logprobs()
        self._receive()  # a sequence may end here: its row of this step is dropped below
        self.scheduler.commit(batch)
        self._in_flight = self._sample(logits, sampled, prompt_scores)
        if not self.async_scheduling:
            self._receive()

    def _sample(
        self,
        logits: torch.Tensor | None,
        sampled: list[Sequence],
        prompt_scores: PromptScores | None,
    ) -> InFlight | None:
        """Queue the sampling of the sequences still going (their rows of `logits`); returns
        the step's results on their way to the host, for `_receive`."""
        live = [i for i, seq in enumerate(sampled) if not seq.is_finished]
        if logits is None or not live:
            return None if prompt_scores is None else InFlight([], None, prompt_scores)
        if len(live) < len(sampled):
            logits = logits.index_select(0, to_device(live, logits.device))
        seqs = [sampled[i] for i in live]
        tokens = self.runner.sample(logits, seqs)
        for seq in seqs:
            seq.num_pending_tokens = 1
        return InFlight(seqs, tokens, prompt_scores)

    def _stop_in_flight(self) -> None:
        """At shutdown: a prompt scored by the last step keeps its logprobs (its request is
        answered with what it has); the tokens in flight are dropped."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and in_flight.prompt_scores is not None:
            try:
                in_flight.prompt_scores.store()
            except Exception:
                logger.exception("could not read the last step's prompt logprobs")

    def _take_one(self) -> list[Sequence] | None | bool:
        """The next inbox item without waiting; False when the inbox is empty."""
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return False

    def _take_inbox(self, block: bool) -> None:
        """Move new requests to the scheduler; when idle, sleep until one (or an abort) comes."""
        if block:
            self.runner.idle()
        item = self._inbox.get() if block else self._take_one()
        while item is not False:
            for seq in item or []:
                self.scheduler.add(seq)
            item = self._take_one()

    def _drop_aborted_and_expired(self) -> None:
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.is_aborted:
                self._finish(seq, "abort")
        for seq in self.scheduler.expire_waiting():
            self._finish(seq, "queue_timeout")

    def _started(self, batch: ScheduledBatch) -> None:
        """The step's newly admitted sequences are no longer queued; the metrics count it."""
        with self._lock:
            self._count_queued(batch.admitted, -1)
        if logger.isEnabledFor(logging.DEBUG):
            self._log_started(batch)
        if not batch.is_empty:
            _notify(self.on_step, batch.num_tokens)

    def _log_started(self, batch: ScheduledBatch) -> None:
        """--log-level debug: each sequence's admission (its wait, what the prefix cache had),
        under its request's id."""
        for seq in batch.admitted:
            request_id_var.set(seq.log_id)
            logger.debug(
                "admitted: %d prompt tokens (%d from the prefix cache) after %.3fs in the "
                "queue; %d running",
                seq.inputs.num_prompt_tokens,
                seq.num_cached_tokens,
                (seq.scheduled_time or 0.0) - seq.arrival_time,
                len(self.scheduler.running),
            )
        request_id_var.set("-")
        if self.scheduler.num_preemptions > self._preemptions_logged:
            logger.debug(
                "%d running sequence(s) preempted for KV cache room (recomputed later)",
                self.scheduler.num_preemptions - self._preemptions_logged,
            )
            self._preemptions_logged = self.scheduler.num_preemptions

    def _receive(self) -> None:
        """The in-flight step's results, once they are on the host: its prompt logprobs onto
        their sequences, then each token appended, the checks that decide what runs next (EOS,
        stop tokens and strings, max_tokens) and its text."""
        if self._in_flight is None:
            return
        # Cleared only once every token is in: if this raises, the error path fails all of
        # them (one preempted in this step is waiting, not running, and would wait forever).
        in_flight = self._in_flight
        if in_flight.prompt_scores is not None:  # before the first token's output
            in_flight.prompt_scores.store()
        sampled, now = in_flight.tokens, time.monotonic()
        tokens = sampled.tokens() if sampled is not None else []
        states = sampled.states if sampled is not None else []
        arrived: list[Sequence] = []
        for seq, token_id, state in zip(in_flight.seqs, tokens, states, strict=True):
            if seq.is_finished:  # aborted meanwhile: what was computed past its end is dropped
                continue  # (finishing dropped its pending token)
            request_id_var.set(seq.log_id)
            seq.token_arrived(now)
            if token_id == FAILED:  # its grammar failed: this request alone
                logger.warning("%s: failing the request", state.failure or "its grammar failed")
                self._finish(seq, state.failed_as)
                continue
            seq.append_token(token_id, state.logprobs)
            arrived.append(seq)
            params = seq.sampling
            # ignore_eos goes on past EOS, but not past the end of a grammar (what follows
            # a complete JSON answer would be unconstrained)
            eos = token_id in self.eos_token_ids and (not params.ignore_eos or state.grammar_ended)
            if eos or token_id in params.stop_token_ids:
                if params.include_stop_str_in_output:  # vLLM's: the ending token's text too
                    seq.detokenizer.add_token(token_id)
                reason = None if eos and token_id == self.primary_eos_id else token_id
                self._finish(seq, "stop", stop_reason=reason)
            else:
                self._add_text(seq, token_id)
        self._in_flight = None
        if arrived:
            _notify(self.on_tokens, arrived)

    def _add_text(self, seq: Sequence, token_id: int) -> None:
        """Detokenize one token: stop strings, max_tokens, or stream the new text."""
        detok = seq.detokenizer
        # (stop strings, like EOS and stop tokens, wait for min_tokens: vLLM's rule)
        check_stop = len(seq.output_token_ids) > seq.sampling.min_tokens
        if (stop := detok.add_token(token_id, check_stop)) is not None:
            self._finish(seq, "stop", stop_reason=stop)
        elif seq.num_completion_tokens >= seq.max_tokens:
            self._finish(seq, "length")
        elif delta := detok.delta():
            self._emit(seq, SequenceOutput(delta, seq.num_completion_tokens))

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        request_id_var.set(seq.log_id)
        was_queued = not seq.is_admitted and not seq.is_finished
        self.scheduler.remove(seq)
        self.runner.release(seq)
        if was_queued:
            with self._lock:
                self._count_queued([seq], -1)
        text = seq.finish(reason, stop_reason)
        _notify(self.on_finish, seq)
        self._sequences.pop(seq.request_id, None)
        self._emit(seq, SequenceOutput(text, seq.num_completion_tokens, True, reason, stop_reason))
        # Debug: a video's frames are sequences too; requests get their own summary lines.
        logger.debug(
            "finished: %s, %d prompt + %d completion tokens in %.2fs",
            reason,
            seq.inputs.num_prompt_tokens,
            seq.num_completion_tokens,
            seq.finish_time - seq.arrival_time,
        )

    def _emit(self, seq: Sequence, output: SequenceOutput) -> None:
        self._outbox.append((seq, output))

    def _deliver(self) -> None:
        """Hand this step's outputs to the event loop in one wake-up, not one per token."""
        if self._outbox and self._loop is not None:
            batch, self._outbox = self._outbox, []
            self._loop.call_soon_threadsafe(_put_all, batch)


@dataclass
class InFlight:
    """A step's results on their way to the host: its sampled tokens (the sequences they
    belong to) and its prompt logprobs."""

    seqs: list[Sequence]
    tokens: SampledTokens | None
    prompt_scores: PromptScores | None


def _notify(callback: Callable[[Any], object] | None, value: object) -> None:
    """Call an on_step / on_tokens / on_finish callback (metrics): never the engine's failure."""
    if callback is None:
        return
    try:
        callback(value)
    except Exception:
        logger.exception("%s failed", getattr(callback, "__name__", "a callback"))


def _overloaded() -> EngineOverloaded:
    return EngineOverloaded(
        "The server is at capacity (request queue full); retry shortly.",
        retry_after_s=RETRY_AFTER_S,
    )


def _put_all(batch: list[tuple[Sequence, SequenceOutput]]) -> None:
    for seq, output in batch:
        seq.outputs.put_nowait(output)


def _context_the_cache_holds(capacity: int, max_seq_len: int, config: EngineConfig) -> int:
    """The context served with a KV cache of `capacity` tokens: a sequence must be able to
    finish alone."""
    if capacity >= max_seq_len:
        return max_seq_len
    if config.max_model_len:
        # Asked for by name: a context the server cannot give is refused now (as vLLM
        # does), not found by the client whose long prompt gets a 400.
        raise ModelLoadError(
            f"--max-model-len {config.max_model_len} is more than the KV cache holds "
            f"({capacity} tokens): raise --gpu-memory-utilization / --kv-cache-memory, or "
            f"lower --max-model-len to {capacity} or less (or leave it out: what fits)."
        )
    logger.warning(
        "The KV cache holds %d tokens, less than the context (%d): serving a context of "
        "%d tokens; raise --gpu-memory-utilization / --kv-cache-memory or lower "
        "--max-model-len.",
        capacity,
        max_seq_len,
        capacity,
    )
    return capacity


def graph_batch_sizes(config: EngineConfig, max_seq_len: int) -> tuple[int, int] | None:
    """(max_num_seqs, max_seq_len) for decode CUDA graphs, or None: every step eager."""
    if config.enforce_eager:
        return None
    if config.quantization != "none":  # bitsandbytes kernels are not known to be capturable
        logger.info("CUDA graphs are off for bitsandbytes checkpoints: decoding eagerly")
        return None
    return config.max_num_seqs, max_seq_len


def is_fatal_device_error(exc: Exception) -> bool:
    return "CUDA error" in str(exc) or "device-side assert" in str(exc)
