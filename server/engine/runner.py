"""ModelRunner: what runs the model. Besides the loader and the memory profile (profile.py), it
is the engine code that touches torch devices (the engine only drops finished rows of a
step's logits before they are sampled).

One step: `forward` queues the scheduled sequences' new tokens (decodes and prompt chunks)
through HF's text model as one flattened batch, attending over the paged KV cache
(attention.py); generated tokens go through FusedDecoder (decoder.py) where the model allows,
and a decode-only step may replay its CUDA graph (cuda_graph.py); `sample` queues the
sampling, whose tokens the host reads later (the step's one transfer). A decode whose token
the host has not read yet (async scheduling: `Sequence.num_pending_tokens`) takes it from the
previous step's sampled ids, on the device. Media embeddings come from MediaEncoder (the
vision tower, the encoder cache, Qwen3-VL's DeepStack features). The multimodal rope is
computed once per prompt (`get_rope_index`) and sliced per chunk; later tokens sit at their
index plus the sequence's rope delta, so chunks, prefix hits and recomputation after a
preemption all see exactly the positions a single prefill would.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import torch

from server.engine import attention, prompt_logprobs
from server.engine.bad_words import BadWords
from server.engine.block_manager import num_blocks_for
from server.engine.cuda_graph import DecodeBuffers, DecodeGraphs, DecodeRow
from server.engine.decoder import FusedDecoder
from server.engine.kv_cache import PagedKVCache, StepCache, kv_cache_shape
from server.engine.loader import LoadedModel, check_attention_backend
from server.engine.media_encoder import MediaEncoder, Span
from server.engine.media_encoder import spans as spans_of
from server.engine.repeated_ngrams import RepeatedNgrams
from server.engine.sampler import (
    SampledTokens,
    SamplingState,
    allowed_tokens,
    make_generator,
    prompt_seen,
    sample_async,
    thinking_end,
    token_bias,
)
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.engine.structured import GrammarCache
from server.engine.transfer import HostCopy, to_device
from server.exceptions import ModelLoadError

logger = logging.getLogger(__name__)

# CUDA graphs over the reference attention only while its largest gather stays this small.
MAX_REFERENCE_GRAPH_GATHER = 512 * 2**20
ROPE_INPUTS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
# The text model's layers get no mask: the paged attention knows each sequence's context.
NO_MASKS = {"full_attention": None, "sliding_attention": None}


def use_decode_kernel(backend: str, loaded: LoadedModel, block_size: int) -> bool:
    """Whether decodes use the Triton kernel; refuses what it cannot serve, at start."""
    if backend != "triton":
        return False
    # (load_model checked it already; a model loaded otherwise, e.g. a benchmark's, here)
    check_attention_backend(backend, loaded.device, loaded.dtype, block_size)
    from server.engine import triton_attention  # (fails now, not at the first decode)

    text = loaded.model.config.text_config
    shape = kv_cache_shape(loaded.model)
    try:
        triton_attention.compile_now(
            text.num_attention_heads,
            shape.num_kv_heads,
            shape.head_dim,
            block_size,
            loaded.dtype,
            loaded.device,
        )
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc)[:300]}"
        hint = ""
        if isinstance(exc, subprocess.CalledProcessError) or re.search(
            r"compiler|Python\.h|\bcc\b|gcc", reason
        ):
            hint = (
                " Triton needs a C compiler and Python's headers (apt-get install gcc python3-dev)."
            )
        raise ModelLoadError(
            f"--attention-backend triton: the decode kernel did not run ({reason}).{hint}"
        ) from exc
    logger.info("decode attention: Triton paged kernel")
    return True


@dataclass
class StepInputs:
    """One eager step's inputs, already on the device."""

    meta: attention.StepMetadata
    token_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [3, tokens]
    sampled_rows: torch.Tensor  # the rows whose logits are sampled
    # (row, row of the last sampled ids) of each token the host has not read yet
    device_tokens: list[tuple[int, int]]
    spans: list[Span]
    media_mask: torch.Tensor | None  # [1, tokens]: media rows, for DeepStack
    scored: list[prompt_logprobs.Scored]
    scoring: tuple[torch.Tensor, torch.Tensor] | None  # prompt logprobs' rows and targets
    generated_only: bool  # every row a generated token's decode (the fused decoder's steps)


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        num_blocks: int,
        block_size: int,
        encoder_cache_bytes: int,
        attention_backend: str = "reference",
        *,
        graph_batch_sizes: tuple[int, int] | None = None,
        fused_decoder: bool = True,
        compile_decoder: bool = False,
        max_grammar_ms_per_token: float = 0.0,
    ):
        """graph_batch_sizes: (max_num_seqs, max_seq_len) to run decode steps through
        DecodeGraphs (captured on CUDA); None: every step eagerly. fused_decoder: steps of
        generated tokens through FusedDecoder (where the model allows), else HF's forward;
        compile_decoder: its layers compiled by torch.compile (compiled here, at start).
        max_grammar_ms_per_token: the CPU a request's grammar may take per token (0: any)."""
        self.model = loaded.model
        self.text_model = loaded.model.model.language_model
        self.device = loaded.device
        self.eos_token_ids = loaded.eos_token_ids
        attention.register()
        self.model.config.text_config._attn_implementation = attention.ATTENTION_NAME
        self.block_size = block_size
        self.use_kernel = use_decode_kernel(attention_backend, loaded, block_size)
        # One block past the scheduler's: the scratch slots of CUDA-graph padding rows.
        self.kv_cache = PagedKVCache(
            kv_cache_shape(self.model), num_blocks + 1, block_size, loaded.dtype, loaded.device
        )
        self.decoder = FusedDecoder.build(self.model) if fused_decoder else None
        self.experts_sync_free = loaded.experts_sync_free
        if compile_decoder:
            self._compile_decoder(scratch_block=num_blocks)
        self.media = MediaEncoder(self.model, self.device, encoder_cache_bytes)
        self.states: dict[str, SamplingState] = {}
        self.vocab_size = self.model.config.text_config.vocab_size
        self.grammars = GrammarCache(
            loaded.tokenizer,
            self.vocab_size,
            loaded.eos_token_ids,
            max_seconds_per_token=max_grammar_ms_per_token / 1000,
        )
        # The last forward's prompt logprobs, on their way to the host until taken.
        self.pending_prompt_logprobs: prompt_logprobs.PromptScores | None = None
        # The last step's sampled ids on the device, and each sampled sequence's row in them.
        self.last_sampled: tuple[torch.Tensor, dict[Sequence, int]] | None = None
        self.graphs = None
        if graph_batch_sizes is not None:
            self.graphs = self._build_graphs(*graph_batch_sizes, scratch_block=num_blocks)

    def _build_graphs(
        self, max_num_seqs: int, max_seq_len: int, scratch_block: int
    ) -> DecodeGraphs | None:
        if not self.experts_sync_free:  # (see LoadedModel.experts_sync_free)
            logger.warning(
                "CUDA graphs are off: on this GPU the experts' grouped products read their row "
                "counts back, which a graph cannot capture"
            )
            return None
        max_blocks = num_blocks_for(max_seq_len, self.block_size)
        graphs = DecodeGraphs(
            self._decode_forward,
            max_num_seqs,
            max_blocks,
            scratch_block,
            self.block_size,
            self.device,
        )
        if self.device.type != "cuda":
            logger.info("CUDA graphs need CUDA: decode steps run eagerly on their padded buffers")
            return graphs
        if not self.use_kernel:
            # The reference attention gathers every row's whole table width, and the largest
            # bucket's gather stays in the graphs' memory pool, which the KV budget (measured
            # before) does not count.
            shape = kv_cache_shape(self.model)
            gather = (
                max_num_seqs
                * max_blocks
                * self.block_size
                * shape.bytes_per_token(self.kv_cache.keys[0].dtype)
                // shape.num_layers
            )
            if gather > MAX_REFERENCE_GRAPH_GATHER:
                logger.warning(
                    "CUDA graphs are off: on the reference attention they would hold %.1f GiB "
                    "(max-num-seqs x max-model-len of keys and values); use "
                    "--attention-backend triton, or lower --max-num-seqs / --max-model-len",
                    gather / 2**30,
                )
                return None
            logger.warning(
                "CUDA graphs on the reference attention gather each decode's whole table width "
                "(%d tokens) every step; --attention-backend triton reads only the context",
                max_blocks * self.block_size,
            )
        free_before, started = torch.cuda.mem_get_info(self.device)[0], time.perf_counter()
        with torch.inference_mode():
            graphs.capture()
        logger.info(
            "decode CUDA graphs for batch sizes %s captured in %.1fs (%.2f GiB)",
            graphs.buckets,
            time.perf_counter() - started,
            (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**30,
        )
        return graphs

    def _compile_decoder(self, scratch_block: int) -> None:
        """Swap in the fused decoder compiled now, not in the first request's decode step (its
        warm_up's steps run on the scratch block), before any graph capture, whose warm-ups
        then find it compiled. Where it cannot be compiled, the decoder stays as it was, with
        the reason logged."""
        eager = self.decoder
        if eager is None:
            logger.warning("--compile-decoder needs the fused decoder: nothing is compiled")
            return
        started = time.perf_counter()
        try:
            self.decoder = eager.compiled()
            scratch = DecodeBuffers.scratch(2, scratch_block, self.block_size, self.device)
            with torch.inference_mode():
                self.decoder.warm_up(lambda num: self._decode_forward(scratch.first(num)))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as exc:  # e.g. no C compiler for Inductor's kernels
            self.decoder = eager
            logger.warning(
                "--compile-decoder: torch.compile failed, decoding with the fused decoder "
                "uncompiled (%s)",
                f"{type(exc).__name__}: {exc}"[:500],
            )
            return
        logger.info("fused decoder compiled in %.1fs", time.perf_counter() - started)

    def bind_thread(self) -> None:
        """Called on the engine thread: CUDA's current device is per thread."""
        if self.device.type == "cuda":
            # An index-less "cuda" would raise here (resolve_device adds the index; this keeps a
            # hand-built device from killing the engine thread).
            torch.cuda.set_device(self.device.index or 0)

    # -- sequence lifecycle ----------------------------------------------------------------
    def release(self, seq: Sequence) -> None:
        self.states.pop(seq.request_id, None)
        self.media.release(seq.request_id)

    def _state(self, seq: Sequence) -> SamplingState:
        """The sequence's sampling state (made at its first sample), its bans for this step."""
        state = self.states.get(seq.request_id)
        if state is None:
            state = self.states[seq.request_id] = self._new_state(seq)
        self._ban_for_this_step(state, seq)
        return state

    def _new_state(self, seq: Sequence) -> SamplingState:
        structured = seq.sampling.structured
        return SamplingState(
            params=seq.sampling,
            generator=make_generator(seq.sampling.seed, self.device),
            prompt_seen=prompt_seen(
                seq.sampling, seq.inputs.token_ids, self.vocab_size, self.device
            ),
            output_token_ids=seq.output_token_ids,
            matcher=self.grammars.matcher(structured, seq.grammar) if structured else None,
            grammar_waits=structured is not None and _in_reasoning(seq),
            grammars=self.grammars,
            bias=token_bias(seq.sampling, self.vocab_size, self.device),
            allowed=allowed_tokens(seq.sampling, self.vocab_size, self.device),
            bad_words=BadWords.of(seq.sampling.bad_word_ids),
            repeated=RepeatedNgrams.of(seq.sampling.no_repeat_ngram_size),
        )

    def _ban_for_this_step(self, state: SamplingState, seq: Sequence) -> None:
        # min_tokens: keep the sequence from ending (EOS, stop tokens) until it is long enough;
        # under a grammar the grammar says when the JSON ends (a ban would leave no token).
        # Nor does a thinking answer end inside its reasoning while its grammar waits: the
        # forced call or schema it must give would never come (17 of 20 forced calls of a
        # random-weight checkpoint ended so, "completed" with no call).
        early = (
            len(seq.output_token_ids) < state.params.min_tokens and state.matcher is None
        ) or state.grammar_waits
        enders = tuple(self.eos_token_ids) + state.params.stop_token_ids if early else ()
        # Bad words: the tokens that would complete one after the answer so far (with async
        # scheduling too: the last step's token is on the host before this step samples).
        words = state.bad_words.banned_next(seq.output_token_ids) if state.bad_words else ()
        if state.repeated is not None:  # (likewise: no n-gram of the answer twice)
            words += state.repeated.banned_next(seq.output_token_ids)
        state.banned_token_ids = enders + words
        state.forced_token_id = thinking_end(state, seq.output_token_ids)

    # -- one step --------------------------------------------------------------------------
    def run(self, batch: ScheduledBatch, sampled: list[Sequence]) -> list[int]:
        """Compute the batch's new tokens; returns the next token of each `sampled` sequence
        (those whose step reaches their last token)."""
        logits = self.forward(batch, sampled)
        scores = self.take_prompt_logprobs()
        tokens = self.sample(logits, sampled).tokens() if sampled else []
        if scores is not None:
            scores.store()
        return tokens

    def idle(self) -> None:
        """Nothing is in flight: let go of the last sample's sequences (finished ones hold
        their prompts' tensors, an image's pixels, until the next step replaced them)."""
        self.last_sampled = None

    def take_prompt_logprobs(self) -> prompt_logprobs.PromptScores | None:
        """The last forward's prompt logprobs (on their way to the host), once."""
        scores, self.pending_prompt_logprobs = self.pending_prompt_logprobs, None
        return scores

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledTokens:
        """Queue the sampling of one token per row of `logits` (the rows of `seqs`); the
        host reads them with `.tokens()`, the next step's decodes on the device."""
        sampled = sample_async(logits, [self._state(s) for s in seqs])
        self.last_sampled = (sampled.ids, {seq: row for row, seq in enumerate(seqs)})
        return sampled

    def _device_token_row(self, seq: Sequence, position: int) -> int | None:
        """The row of the last sampled ids that holds the input token at `position`, when the
        host has not read it yet (async scheduling); None when the host has it."""
        if position < seq.inputs.num_prompt_tokens + seq.num_completion_tokens:
            return None
        assert self.last_sampled is not None and seq.num_pending_tokens == 1, (
            f"token {position} of {seq.request_id} is neither on the host nor in the last sample"
        )
        return self.last_sampled[1][seq]

    def _hand_off(self, token_ids: torch.Tensor, device_tokens: list[tuple[int, int]]) -> None:
        """Tokens the host has not read yet, copied into the step's inputs on the device."""
        if device_tokens:
            assert self.last_sampled is not None
            rows, sources = zip(*device_tokens, strict=True)
            picked = self.last_sampled[0].index_select(0, to_device(sources, self.device))
            token_ids.index_copy_(0, to_device(rows, self.device), picked)

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, sampled: list[Sequence]) -> torch.Tensor | None:
        """Queue the step on the device: the logits of each `sampled` sequence (None when
        none is), with no host sync, so the host can work while the device computes."""
        graph_step = self._graph_decodes(batch)
        if graph_step is not None:  # decodes only, in order: every one is sampled
            decodes, device_tokens = graph_step
            size = self.graphs.fill(decodes)
            self._hand_off(self.graphs.buffers.token_ids, device_tokens)
            return self.graphs.replay(size, len(decodes))
        step = self._prepare(batch, sampled)
        self._hand_off(step.token_ids, step.device_tokens)
        if self.decoder is not None and step.generated_only:
            positions = step.positions[0]  # the same on all three axes
            hidden = self.decoder.hidden(step.token_ids, positions, step.meta, self.kv_cache)
            return self.model.lm_head(hidden[step.sampled_rows]) if sampled else None
        self.media.encode(batch)
        pieces = self.media.pieces(step.spans)
        embeds = self.text_model.embed_tokens(step.token_ids)
        for row, media in pieces:
            embeds[row : row + media.shape[1]] = media[0].to(embeds.dtype)
        deepstack = self.media.deepstack_inputs(pieces, step.media_mask)
        hidden = self._text_forward(embeds, step.positions, step.meta, **deepstack)
        self.media.drop_prefilled(batch)
        if step.scoring is not None:
            packed = prompt_logprobs.compute(hidden, self.model.lm_head, step.scored, *step.scoring)
            self.pending_prompt_logprobs = prompt_logprobs.PromptScores(
                step.scored, HostCopy(packed)
            )
        return self.model.lm_head(hidden[step.sampled_rows]) if sampled else None

    def _prepare(self, batch: ScheduledBatch, sampled: list[Sequence]) -> StepInputs:
        """The step's inputs, on the device before any of its kernels is queued: a copy from
        pageable memory waits for the kernels queued before it, and the host with it."""
        token_ids: list[int] = []
        positions: list[int | torch.Tensor] = []
        spans: list[Span] = []
        seq_lens: list[int] = []
        device_tokens: list[tuple[int, int]] = []
        generated_only = True
        for seq, num in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num
            spans += [
                (len(token_ids) + o, seq, item, part) for o, item, part in spans_of(seq, start, end)
            ]
            token_ids += seq.token_ids(start, end)  # the tokens the host has
            if (source := self._device_token_row(seq, end - 1)) is not None:
                device_tokens.append((len(token_ids), source))
                token_ids.append(0)  # filled on the device (_hand_off)
            if num == 1 and start >= seq.inputs.num_prompt_tokens:  # a generated token
                positions.append(start + seq.rope_delta)  # the same on all three axes
            else:
                positions.append(self._positions(seq, start, end))
                generated_only = False
            seq_lens.append(end)
        meta = attention.StepMetadata.build(
            [s.block_table for s in batch.seqs],
            batch.num_new_tokens,
            seq_lens,
            self.block_size,
            self.device,
            self.use_kernel,
        )
        index = {seq: i for i, seq in enumerate(batch.seqs)}
        rows = [meta.query_start[index[seq] + 1] - 1 for seq in sampled]
        scored = prompt_logprobs.scored_in(batch.seqs, batch.num_new_tokens, meta.query_start)
        return StepInputs(
            meta,
            to_device(token_ids, self.device, torch.long),
            # a decode's position is the same on all three mrope axes
            to_device(attention.join_runs(positions, _same_on_three_axes, dim=1), self.device),
            to_device(rows, self.device, torch.long),
            device_tokens,
            spans,
            self.media.mask(spans, len(token_ids)),
            scored,
            prompt_logprobs.indices(scored, self.device) if scored else None,
            generated_only,
        )

    def _text_forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        meta: attention.StepMetadata,
        **deepstack: Any,
    ) -> torch.Tensor:
        """The text model over one flattened step: embeds [n, hidden], positions [3, n]."""
        return self.text_model(
            inputs_embeds=embeds[None],
            position_ids=positions[:, None],
            past_key_values=StepCache(self.kv_cache, meta.slot_mapping),
            attention_mask=NO_MASKS,
            use_cache=True,
            paged_metadata=meta,
            **deepstack,
        ).last_hidden_state[0]

    def _decode_forward(self, inputs: DecodeBuffers) -> torch.Tensor:
        """A decode-only step from the graphs' static buffers to logits (what is captured)."""
        meta = attention.StepMetadata.for_decodes(
            inputs.rows,
            inputs.slot_mapping,
            inputs.block_tables,
            inputs.seq_lens,
            self.block_size,
            self.use_kernel,
        )
        if self.decoder is not None:
            hidden = self.decoder.hidden(inputs.token_ids, inputs.positions, meta, self.kv_cache)
        else:
            embeds = self.text_model.embed_tokens(inputs.token_ids)
            # A generated token sits at the same position on all three mrope axes.
            positions = inputs.positions.view(1, -1).expand(3, -1)
            hidden = self._text_forward(embeds, positions, meta)
        return self.model.lm_head(hidden)

    def _graph_decodes(
        self, batch: ScheduledBatch
    ) -> tuple[list[DecodeRow], list[tuple[int, int]]] | None:
        """The step as graph inputs when it is generated-token decodes only and fits a bucket,
        with the rows whose token is still on the device (see _prepare)."""
        if self.graphs is None or self.graphs.bucket(len(batch.seqs)) is None:
            return None
        rows, device_tokens = [], []
        for seq, num in zip(batch.seqs, batch.num_new_tokens, strict=True):
            position = seq.num_computed_tokens
            # A generated token's decode; not a 1-token chunk of a prompt, nor of outputs
            # recomputed after a preemption (neither is sampled).
            if num != 1 or position < seq.inputs.num_prompt_tokens or position + 1 < seq.num_tokens:
                return None
            block = seq.block_table[position // self.block_size]
            if (source := self._device_token_row(seq, position)) is not None:
                device_tokens.append((len(rows), source))
            rows.append(
                DecodeRow(
                    0 if source is not None else seq.token_ids(position, position + 1)[0],
                    position + seq.rope_delta,
                    block * self.block_size + position % self.block_size,
                    seq.block_table,
                    position + 1,
                    (seq.serial, seq.num_preemptions),
                )
            )
        return rows, device_tokens

    def _positions(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """[3, end - start] mrope positions of tokens [start, end)."""
        if seq.mrope_positions is None:
            seq.mrope_positions, seq.rope_delta = self._prompt_positions(seq)
        num_prompt = seq.inputs.num_prompt_tokens
        parts = []
        if start < num_prompt:
            parts.append(seq.mrope_positions[:, start : min(end, num_prompt)])
        if end > num_prompt:
            later = torch.arange(max(start, num_prompt), end) + seq.rope_delta
            parts.append(later.view(1, -1).expand(3, -1))
        return torch.cat(parts, dim=1)

    def _prompt_positions(self, seq: Sequence) -> tuple[torch.Tensor, int]:
        tensors = seq.inputs.tensors
        kwargs = {k: tensors[k] for k in ROPE_INPUTS if k in tensors}
        input_ids = torch.tensor([seq.inputs.token_ids])
        token_types = tensors.get("mm_token_type_ids")
        if token_types is None:
            token_types = torch.zeros_like(input_ids)
        positions, deltas = self.model.model.get_rope_index(
            input_ids=input_ids, mm_token_type_ids=token_types, **kwargs
        )
        return positions[:, 0].cpu(), int(deltas.view(-1)[0])


def _same_on_three_axes(positions: list[int]) -> torch.Tensor:
    return torch.tensor(positions).view(1, -1).expand(3, -1)


def _in_reasoning(seq: Sequence) -> bool:
    """Whether the answer is still in its reasoning (one that waits for its end token)."""
    end = seq.sampling.think_end_token_id
    return end is not None and end not in seq.output_token_ids
