"""ModelRunner: the only engine code that touches torch devices.

It runs the HF Qwen2-VL model's own forward pass on batches the scheduler picks:
- prefill: newly admitted sequences together, right-padded to the longest prompt; their images
  go through the vision tower in one call; each row's keys/values land in its KV slot.
- decode: one token for every running sequence (slots 0..n-1) in one forward.
Qwen2-VL's multimodal rope is computed per sequence (`get_rope_index` at prefill, then
position = cache position + that sequence's rope delta), so text-only and image sequences mix
freely. transformers' own continuous batching cannot do this: it takes token ids only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from server.engine.kv_cache import KVCache, KVCacheShape
from server.engine.loader import LoadedModel
from server.engine.sampler import SamplingState, make_generator, sample
from server.engine.scheduler import SlotMove
from server.engine.sequence import Sequence
from server.engine.structured import GrammarCache

logger = logging.getLogger(__name__)

VISION_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",  # Qwen2.5-VL: seconds per temporal patch of each video
)
ROPE_INPUTS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def kv_cache_shape(model: Any) -> KVCacheShape:
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return KVCacheShape(text.num_hidden_layers, text.num_key_value_heads, head_dim)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_slots: int, max_seq_len: int):
        self.model = loaded.model
        self.device = loaded.device
        self.eos_token_ids = loaded.eos_token_ids
        self.pad_token_id = loaded.tokenizer.pad_token_id or 0
        self.kv_cache = KVCache(
            kv_cache_shape(self.model), num_slots, max_seq_len, loaded.dtype, loaded.device
        )
        self.states: dict[str, SamplingState] = {}
        self.vocab_size = self.model.config.text_config.vocab_size
        self.grammars = GrammarCache(loaded.tokenizer, self.vocab_size, loaded.eos_token_ids)

    def bind_thread(self) -> None:
        """Called on the engine thread: CUDA's current device is per thread."""
        if self.device.type == "cuda":
            # An index-less "cuda" would raise here (resolve_device adds the index; this keeps a
            # hand-built device from killing the engine thread).
            torch.cuda.set_device(self.device.index or 0)

    # -- sequence lifecycle ----------------------------------------------------------------
    def release(self, seq: Sequence) -> None:
        self.states.pop(seq.request_id, None)

    def move_slot(self, move: SlotMove) -> None:
        self.kv_cache.move(move.src, move.dst, min(move.length, self.kv_cache.max_seq_len))

    def _state(self, seq: Sequence) -> SamplingState:
        state = self.states[seq.request_id]
        params = state.params
        # min_tokens: keep the sequence from ending (EOS, stop tokens) until it is long enough.
        early = len(seq.output_token_ids) < params.min_tokens
        state.banned_token_ids = tuple(self.eos_token_ids) + params.stop_token_ids if early else ()
        return state

    # -- forward passes --------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[int]:
        lengths = [s.inputs.num_prompt_tokens for s in seqs]
        longest = max(lengths)
        input_ids = torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long)
        token_types = torch.zeros((len(seqs), longest), dtype=torch.long)
        positions = torch.empty((3, len(seqs), longest), dtype=torch.long)
        for row, seq in enumerate(seqs):
            tensors = seq.inputs.tensors
            input_ids[row, : lengths[row]] = tensors["input_ids"][0]
            if "mm_token_type_ids" in tensors:
                token_types[row, : lengths[row]] = tensors["mm_token_type_ids"][0]
            positions[:, row] = self._prompt_positions(seq, longest)
            structured = seq.sampling.structured
            self.states[seq.request_id] = SamplingState(
                params=seq.sampling,
                generator=make_generator(seq.sampling.seed, self.device),
                prompt_token_ids=tensors["input_ids"][0].to(self.device),
                output_token_ids=seq.output_token_ids,
                matcher=self.grammars.matcher(structured) if structured else None,
                grammars=self.grammars,
            )
        vision = self._vision_inputs(seqs)
        first_slot = seqs[0].slot
        hidden = self._forward(
            input_ids=input_ids.to(self.device),
            mm_token_type_ids=token_types.to(self.device),
            position_ids=positions.to(self.device),
            cache=self.kv_cache.step(first_slot, torch.zeros(len(seqs), dtype=torch.long), longest),
            attention_mask=None,  # right padding + causal: every real query sees only real keys
            **vision,
        )
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model.lm_head(hidden[torch.arange(len(seqs), device=self.device), last])
        return sample(logits, [self._state(s) for s in seqs])

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> list[int]:
        # The token sampled last step is not cached yet: it goes in at position num_tokens - 1.
        cache_positions = torch.tensor([s.num_tokens - 1 for s in seqs], device=self.device)
        rope_deltas = torch.tensor([s.rope_delta for s in seqs], device=self.device)
        kv_len = int(cache_positions.max()) + 1
        input_ids = torch.tensor([[s.output_token_ids[-1]] for s in seqs], device=self.device)
        positions = (cache_positions + rope_deltas).view(1, -1, 1).expand(3, -1, -1)
        # Row b attends to its own cached positions 0..cache_positions[b] only.
        mask = torch.arange(kv_len, device=self.device)[None, :] <= cache_positions[:, None]
        hidden = self._forward(
            input_ids=input_ids,
            position_ids=positions,
            cache=self.kv_cache.step(0, cache_positions, kv_len),
            attention_mask=mask[:, None, None, :],
        )
        logits = self.model.lm_head(hidden[:, -1])
        return sample(logits, [self._state(s) for s in seqs])

    def _forward(self, cache: Any, attention_mask: torch.Tensor | None, **inputs: Any):
        # A prepared mask mapping makes HF skip its own mask construction.
        masks = {"full_attention": attention_mask, "sliding_attention": attention_mask}
        out = self.model.model(
            **inputs, past_key_values=cache, attention_mask=masks, use_cache=True
        )
        return out.last_hidden_state

    def _prompt_positions(self, seq: Sequence, width: int) -> torch.Tensor:
        """[3, width] mrope positions of the prompt (padding continues the count); sets the
        sequence's rope delta for its decode steps."""
        tensors = seq.inputs.tensors
        kwargs = {k: tensors[k] for k in ROPE_INPUTS if k in tensors}
        token_types = tensors.get("mm_token_type_ids")
        if token_types is None:
            token_types = torch.zeros_like(tensors["input_ids"])
        positions, deltas = self.model.model.get_rope_index(
            input_ids=tensors["input_ids"], mm_token_type_ids=token_types, **kwargs
        )
        seq.rope_delta = int(deltas.view(-1)[0])
        length = positions.shape[-1]
        if width > length:
            start = int(positions.max()) + 1
            pad = torch.arange(start, start + width - length).view(1, -1).expand(3, -1)
            return torch.cat([positions[:, 0], pad], dim=1)
        return positions[:, 0]

    def _vision_inputs(self, seqs: list[Sequence]) -> dict[str, torch.Tensor]:
        """Concatenate every sequence's images (and videos) for one vision-tower call."""
        batched: dict[str, torch.Tensor] = {}
        for name in VISION_INPUTS:
            parts = [s.inputs.tensors[name] for s in seqs if name in s.inputs.tensors]
            if parts:
                batched[name] = torch.cat(parts).to(self.device)
        return batched
