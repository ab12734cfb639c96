"""AsyncEngine: the engine surface the pipelines use, and the continuous-batching loop.

`add_request` -> `stream` / `abort`, all called on the event loop. The loop itself runs on one
worker thread: each iteration takes new requests and aborts from the inbox, lets the scheduler
admit what fits, prefills the admitted sequences, runs one decode step for everything that was
running, and post-processes the new tokens (detokenize, stop checks, stream out, free finished
sequences at once). Outputs travel back through each Sequence's asyncio queue.

With async scheduling (`--async-scheduling`) the host does not wait for a step's tokens before
it queues the next step: step t+1 is scheduled and queued while step t's sampling and its copy
to the host are still running, its decodes reading step t's tokens on the device. Step t's
tokens are then read and post-processed while the device computes step t+1; a sequence that
ended with them drops its row of step t+1 (nothing past its end is sampled or kept).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from server.config import EngineConfig
from server.engine import bad_words, profile
from server.engine.block_manager import BlockManager
from server.engine.decoder import FusedDecoder
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.inputs import ModelInputs, Truncation
from server.engine.loader import LoadedModel
from server.engine.prompt_logprobs import PromptScores
from server.engine.runner import ModelRunner
from server.engine.sampler import FAILED, SampledTokens
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import Sequence, SequenceOutput, SequenceStatus
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


# A character becomes at most 3 under NFC (U+1D160) and a character at most 4 UTF-8 bytes.
MAX_BYTES_PER_NORMALIZED_CHAR = 12
# UTF-8 bytes NFC leaves at least of those it is given: 2 of 7 (U+1FBE U+0308 U+0301, 7 bytes,
# compose to U+0390, 2: the least ratio over every composition; Hangul's jamo keep a third).
NFC_LEAST_BYTES = (2, 7)


def _at_least_normalized_bytes(text: str, normalizer: Any) -> int:
    """A lower bound on _normalized_bytes, cheap (no normalizing: NFC over a 30 MB prompt held
    the event loop 1.2 s, tokenizers keeping the GIL): exact for no normalizer or ASCII text
    under NFC (which leaves it as it is), 2/7 of its bytes for other text under NFC, 0
    for a normalizer not known here."""
    if normalizer is not None and type(normalizer).__name__ != "NFC":
        return 0
    size = len(text.encode("utf-8", "surrogatepass"))
    if normalizer is None or text.isascii():
        return size
    kept, given = NFC_LEAST_BYTES
    return size * kept // given


def _normalized_bytes(text: str, normalizer: Any) -> int:
    normalized = text if normalizer is None else normalizer.normalize_str(text)
    return len(normalized.encode("utf-8", "surrogatepass"))


# Room left for the answer when a request gives no max_tokens and the server no default: the
# frames a video gets and truncate_prompt_tokens -1 plan with it (the answer may go on).
PLANNED_ANSWER_TOKENS = 1024
# The least a chat turn takes besides its text: Qwen's templates open and close each message
# with a special token (<|im_start|>role ... <|im_end|>).
TOKENS_PER_TURN = 2


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
        self.max_seq_len = max_seq_len
        self.default_max_tokens = default_max_tokens  # 0: the rest of the context
        # The answer's room a request without max_tokens is planned with (its videos' frames,
        # a prompt truncated to fit): the default, or with none a usual answer's length.
        self.planned_answer_tokens = default_max_tokens or min(
            PLANNED_ANSWER_TOKENS, max_seq_len // 4
        )
        self.async_scheduling = async_scheduling
        self.cache_per_project = cache_per_project
        self.eos_token_ids = frozenset(runner.eos_token_ids)
        # vLLM's stop_reason: None for the tokenizer's end-of-text, the id for the others
        # (generation_config's, which vLLM counts as stop tokens)
        self.primary_eos_id = runner.eos_token_ids[0] if runner.eos_token_ids else None
        # Called (on the engine thread) with every sequence that ends, however it ends.
        self.on_finish: Callable[[Sequence], object] | None = None
        # Called (on the engine thread) with the number of tokens of every step that runs.
        self.on_step: Callable[[int], object] | None = None
        self._inbox: queue.SimpleQueue[Sequence | list[Sequence] | None] = queue.SimpleQueue()
        self.num_batched_adds = 0  # add_requests calls (tests check captions use one)
        self._sequences: dict[str, Sequence] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._num_queued = 0  # accepted but not yet running; guarded by _lock
        self._lock = threading.Lock()
        self._outbox: list[tuple[Sequence, SequenceOutput]] = []  # delivered once per step
        # The last step's results on their way to the host.
        self._in_flight: InFlight | None = None
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
        capacity = num_blocks * config.block_size
        if capacity < max_seq_len and config.max_model_len:
            # Asked for by name: a context the server cannot give is refused now (as vLLM
            # does), not found by the client whose long prompt gets a 400.
            raise ModelLoadError(
                f"--max-model-len {config.max_model_len} is more than the KV cache holds "
                f"({capacity} tokens): raise --gpu-memory-utilization / --kv-cache-memory, or "
                f"lower --max-model-len to {capacity} or less (or leave it out: what fits)."
            )
        if capacity < max_seq_len:
            # A sequence must be able to finish alone, so the context is what the cache holds.
            logger.warning(
                "The KV cache holds %d tokens, less than the context (%d): serving a context of "
                "%d tokens; raise --gpu-memory-utilization / --kv-cache-memory or lower "
                "--max-model-len.",
                capacity,
                max_seq_len,
                capacity,
            )
            max_seq_len = capacity
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
        for seq in list(self._sequences.values()):
            seq.is_aborted = True
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 60)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

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
        blocks, encoder = self.scheduler.blocks, self.runner.encoder_cache
        return {
            "prefix_cache_queried_tokens": blocks.num_queried_tokens,
            "prefix_cache_hit_tokens": blocks.num_hit_tokens,
            "encoder_cache_hits": encoder.num_hits,
            "encoder_cache_misses": encoder.num_misses,
            "preemptions": self.scheduler.num_preemptions,
            "kv_cache_usage": 1 - blocks.num_free_blocks / blocks.num_blocks,
            "kv_cache_blocks": blocks.num_blocks,
            "grammar_cache_bytes": self.runner.grammars.num_bytes,
        }

    @functools.cached_property
    def _longest_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for: a byte-level BPE entry's spelling has a
        character a byte; an added token (<|im_start|>) is its own text."""
        vocab, added = self.tokenizer.get_vocab(), self.tokenizer.get_added_vocab()  # type: ignore[attr-defined]
        return max((len(k.encode()) if k in added else len(k) for k in vocab), default=1)

    def check_prompt_text(self, text: str, param: str, turns: int = 0) -> None:
        """Text that cannot fit the context is refused before it is tokenized (a 20 MB prompt
        took minutes and gigabytes to tokenize, then was refused): the tokens of text, once
        the tokenizer has normalized it (NFC for Qwen), are at least its UTF-8 bytes over the
        most one token stands for; each of a chat's turns (messages) adds its own start and
        end tokens (<|im_start|>, <|im_end|>) to those."""
        markers = max(turns * TOKENS_PER_TURN - 1, 0)  # (a continued last turn has no end)
        if markers > self.max_seq_len:  # (300,000 empty messages: no text, but no room)
            raise InvalidRequest(
                f"The prompt has {turns} messages: more than this model's {self.max_seq_len}-"
                f"token context can hold ({TOKENS_PER_TURN} tokens each at least).",
                param=param,
                code="context_length_exceeded",
            )
        limit = (self.max_seq_len - markers) * self._longest_token_bytes
        if len(text) * MAX_BYTES_PER_NORMALIZED_CHAR <= limit:  # (every prompt of a usual size)
            return
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # (a slow tokenizer: its normalization is unknown, no bound)
            return
        if _at_least_normalized_bytes(text, backend.normalizer) > limit or (
            _normalized_bytes(text, backend.normalizer) > limit
        ):
            raise InvalidRequest(
                f"The prompt's text is {len(text)} characters long: more than this model's "
                f"{self.max_seq_len}-token context can hold, whatever the tokens.",
                param=param,
                code="context_length_exceeded",
            )

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
        if self._num_queued >= self.scheduler.config.max_queued_requests:
            raise EngineOverloaded(
                "The server is at capacity (request queue full); retry shortly.",
                retry_after_s=RETRY_AFTER_S,
            )

    def add_request(
        self, request_id: str, inputs: ModelInputs, sampling: SamplingParams, num_choices: int = 1
    ) -> Sequence:
        """num_choices: n, the request's choices (this its first; add_requests adds the rest)."""
        seq = self._new_sequence(request_id, inputs, sampling)
        seq.num_choices = num_choices  # (before the engine thread can see it end)
        with self._lock:
            self.check_capacity()
            self._num_queued += 1
        self._sequences[request_id] = seq
        self._inbox.put(seq)
        return seq

    def _new_sequence(
        self, request_id: str, inputs: ModelInputs, sampling: SamplingParams
    ) -> Sequence:
        if not self.is_running:
            raise EngineStopped("The engine is not running.")
        if request_id in self._sequences:  # ids key the runner's per-sequence state
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if inputs.num_prompt_tokens < 1:  # nothing to prefill would fail the whole step
            raise InvalidRequest("The prompt is empty.", param="messages", code="invalid_value")
        sampling = self.with_bad_word_ids(sampling)
        self.check_sampling(sampling)
        if self.cache_per_project and (project := current_project()):
            structured = sampling.structured and self.salted(sampling.structured)
            salt = project_salt(project, sampling.cache_salt)
            sampling = replace(sampling, cache_salt=salt, structured=structured)
        seq = Sequence(
            request_id, inputs, sampling, self.max_tokens_for(inputs.num_prompt_tokens, sampling)
        )
        seq.log_id = request_id_var.get()
        seq.project = current_project()
        if sampling.structured is not None:  # compiled by the pipeline just before
            seq.grammar = self.runner.grammars.lookup(sampling.structured)
        return seq

    def truncated(
        self, inputs: ModelInputs, truncation: Truncation | None, sampling: SamplingParams
    ) -> ModelInputs:
        """The prompt as vLLM's truncate_prompt_tokens cuts it."""
        if truncation is None:
            return inputs
        return truncation.apply(inputs, self.kept_prompt_tokens(truncation, sampling))

    def kept_prompt_tokens(self, truncation: Truncation, sampling: SamplingParams) -> int:
        """How many prompt tokens the truncation keeps (room left for max_tokens, or for the
        default a request without one gets)."""
        max_tokens = sampling.max_tokens or self.planned_answer_tokens
        return truncation.kept(self.max_seq_len, max_tokens)

    def with_bad_word_ids(self, sampling: SamplingParams) -> SamplingParams:
        """`sampling` with its bad words' token sequences (a 400 for a word with no tokens)."""
        if not sampling.bad_words or sampling.bad_word_ids:
            return sampling
        try:
            ids = bad_words.token_sequences(sampling.bad_words, self.tokenizer)
        except ValueError as exc:
            raise InvalidRequest(
                f"bad_words must hold words, not only whitespace ({exc}).",
                param="bad_words",
                code="invalid_value",
            ) from exc
        return replace(sampling, bad_word_ids=ids)

    def check_sampling(self, sampling: SamplingParams) -> None:
        """What only the engine can tell about a request's sampling parameters: a priority
        its policy looks at, token ids within the vocabulary, allowed ids that leave a token
        to generate, bad words that can be written down in tokens."""
        sampling = self.with_bad_word_ids(sampling)
        if sampling.priority and (policy := self.scheduler.config.policy) != "priority":
            serves = "first come, first served" if policy == "fcfs" else "API keys in turn"
            raise InvalidRequest(
                "priority needs the server started with --scheduling-policy priority (this "
                f"one serves {serves}).",
                param="priority",
                code="invalid_value",
            )
        vocab = self.runner.vocab_size
        ids = {
            "stop_token_ids": sampling.stop_token_ids,
            "logit_bias": [token for token, _ in sampling.logit_bias],
            "allowed_token_ids": sampling.allowed_token_ids,
        }
        for param, tokens in ids.items():
            if any(t >= vocab for t in tokens):
                raise InvalidRequest(
                    f"{param} must hold token ids below the vocabulary size ({vocab}).",
                    param=param,
                    code="invalid_value",
                )
        for param in ("allowed_token_ids", "bad_words"):
            # The grammar decides which tokens may come; with a list of allowed tokens, or
            # banned ones, that can leave none (a failed request deep into its answer).
            if getattr(sampling, param) and sampling.structured is not None:
                raise InvalidRequest(
                    f"{param} cannot be combined with a structured-output constraint "
                    "(response_format, guided_* / structured_outputs, a forced tool call).",
                    param=param,
                    code="invalid_value",
                )
        allowed = set(sampling.allowed_token_ids)
        banned = set(bad_words.BadWords(sampling.bad_word_ids).always)
        if sampling.min_tokens:  # before min_tokens the enders are banned
            banned |= self.eos_token_ids | set(sampling.stop_token_ids)
        if allowed and allowed <= banned:
            raise InvalidRequest(
                "allowed_token_ids leaves no token to generate: each one is a one-token bad "
                "word, or ends the text (EOS or stop_token_ids), which min_tokens forbids.",
                param="allowed_token_ids",
                code="invalid_value",
            )

    def salted(self, spec: StructuredOutput) -> StructuredOutput:
        """The grammar cache's key for this request: under --cache-per-project its salt
        includes the request's project (call it where the request's context is)."""
        if not self.cache_per_project or not (project := current_project()):
            return spec
        return replace(spec, cache_salt=project_salt(project, spec.cache_salt))

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
        limit = self.scheduler.config.max_queued_requests
        with self._lock:
            # A batch larger than the whole queue (60 frames, a small limit) enters an empty
            # queue: refusing it would refuse that video forever.
            if self._num_queued and self._num_queued + len(seqs) > limit:
                raise EngineOverloaded(
                    "The server is at capacity (request queue full); retry shortly.",
                    retry_after_s=RETRY_AFTER_S,
                )
            self._num_queued += len(seqs)
        for seq in seqs:
            self._sequences[seq.request_id] = seq
        self._inbox.put(seqs)
        self.num_batched_adds += 1
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

    def max_tokens_for(self, num_prompt: int, sampling: SamplingParams) -> int:
        """The completion budget of a prompt this long; a 400 when prompt and max_tokens cannot
        fit the context."""
        room = self.max_seq_len - num_prompt
        if room <= 0:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, "
                f"your messages resulted in {num_prompt} tokens. Please reduce the length of the "
                "messages or the size of the images.",
                param="messages",
                code="context_length_exceeded",
            )
        if sampling.max_tokens is None:
            return min(self.default_max_tokens, room) if self.default_max_tokens else room
        if sampling.max_tokens > room:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, "
                f"you requested {num_prompt + sampling.max_tokens} tokens ({num_prompt} in the "
                f"messages, {sampling.max_tokens} in the completion). Please reduce the length "
                "of the messages or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return sampling.max_tokens

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
            for seq in _as_list(item):
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
        self._mark_admitted(batch.admitted)
        if self.on_step is not None and not batch.is_empty:
            try:
                self.on_step(batch.num_tokens)
            except Exception:  # (metrics) never the engine's trouble
                logger.exception("on_step failed")
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

    def _take_one(self) -> Sequence | list[Sequence] | None | bool:
        """The next inbox item without waiting; False when the inbox is empty."""
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return False

    def _take_inbox(self, block: bool) -> None:
        """Move new requests to the scheduler; when idle, sleep until one (or an abort) comes."""
        item = self._inbox.get() if block else self._take_one()
        while item is not False:
            for seq in _as_list(item):
                params = seq.sampling
                detok = IncrementalDetokenizer(
                    self.tokenizer,
                    params.stop,
                    params.include_stop_str_in_output,
                    params.skip_special_tokens,
                )
                self._detokenizers[seq.request_id] = detok
                self.scheduler.add(seq)
            item = self._take_one()

    def _drop_aborted_and_expired(self) -> None:
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.is_aborted:
                self._finish(seq, "abort")
        for seq in self.scheduler.expire_waiting():
            self._finish(seq, "queue_timeout")

    def _mark_admitted(self, seqs: list[Sequence]) -> None:
        with self._lock:
            self._num_queued -= len(seqs)

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
        for seq, token_id, state in zip(in_flight.seqs, tokens, states, strict=True):
            seq.num_pending_tokens = 0
            if seq.is_finished:  # aborted meanwhile: what was computed past its end is dropped
                continue
            request_id_var.set(seq.log_id)
            if seq.first_token_time is None:
                seq.first_token_time = now
            else:
                seq.inter_token_latencies.append(now - seq.last_token_time)
            seq.last_token_time = now
            if token_id == FAILED:  # its grammar failed: this request alone
                logger.warning("%s: failing the request", state.failure or "its grammar failed")
                self._finish(seq, state.failed_as)
                continue
            seq.output_token_ids.append(token_id)
            if seq.sampling.logprobs is not None:  # the sampler left them on the row's state
                seq.output_logprobs.append(state.logprobs)
            params = seq.sampling
            # ignore_eos goes on past EOS, but not past the end of a grammar (what follows
            # a complete JSON answer would be unconstrained)
            eos = token_id in self.eos_token_ids and (not params.ignore_eos or state.grammar_ended)
            if eos or token_id in params.stop_token_ids:
                if params.include_stop_str_in_output:  # vLLM's: the ending token's text too
                    self._detokenizers[seq.request_id].add_token(token_id)
                reason = None if eos and token_id == self.primary_eos_id else token_id
                self._finish(seq, "stop", stop_reason=reason)
            else:
                self._add_text(seq, token_id)
        self._in_flight = None

    def _add_text(self, seq: Sequence, token_id: int) -> None:
        """Detokenize one token: stop strings, max_tokens, or stream the new text."""
        detok = self._detokenizers[seq.request_id]
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
                self._num_queued -= 1
        seq.status = SequenceStatus.FINISHED
        seq.num_pending_tokens = 0  # a token still on its way is dropped
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.finish_time = time.monotonic()
        if self.on_finish is not None:
            try:
                self.on_finish(seq)
            except Exception:  # (metrics) never the engine's trouble
                logger.exception("on_finish failed")
        self._sequences.pop(seq.request_id, None)
        detok = self._detokenizers.pop(seq.request_id, None)
        text = detok.flush() if detok is not None else ""
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


def _as_list(item: Sequence | list[Sequence] | None) -> list[Sequence]:
    """An inbox item: one sequence, several added together, or None (a wake-up)."""
    if item is None:
        return []
    return item if isinstance(item, list) else [item]


def _put_all(batch: list[tuple[Sequence, SequenceOutput]]) -> None:
    for seq, output in batch:
        seq.outputs.put_nowait(output)


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
