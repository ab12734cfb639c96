"""Attention over the paged KV cache, plugged into HF's Qwen2-VL text model.

One engine step is one flattened batch: every scheduled sequence contributes its new tokens
(one for a decode, a chunk for a prefill) back to back. `StepMetadata` says where each
sequence's queries are in that batch and which cache slots hold its context. The text model
calls the function registered here (ATTENTION_NAME) in place of sdpa; the keys/values of the
step are already in the cache (kv_cache.StepCache.update wrote them).

The implementation here is the plain-torch reference: it gathers each sequence's context
slots and runs sdpa, all one-token queries (decodes) together in one padded call, each prompt
chunk on its own (causal, offset by what is already cached). It is exact and runs anywhere;
it is what CPU runs use and the oracle the Triton decode kernel (triton_attention.py, chosen
with --attention-backend triton) is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention

ATTENTION_NAME = "vlm_paged"


@dataclass
class StepMetadata:
    query_start: list[int]  # [num_seqs + 1]: the sequences' queries in the flattened step
    seq_lens: list[int]  # context length of each sequence after this step
    slot_mapping: torch.Tensor  # [num_tokens]: the cache slot of each new token
    # Reference path: all decodes in one padded call, each prefill chunk alone.
    decode_rows: torch.Tensor | None  # [num_decodes] rows of the step that are decodes
    decode_slots: torch.Tensor | None  # [num_decodes, longest] cache slots (padding: slot 0)
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, longest] real context positions
    prefills: list[tuple[int, int, torch.Tensor]]  # (first row, end row, context slots)
    # The Triton decode kernel (--attention-backend triton) reads block tables directly.
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, most blocks] int32
    decode_seq_lens: torch.Tensor | None = None  # [num_decodes] int32
    block_size: int = 0

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        num_new_tokens: list[int],
        seq_lens: list[int],
        block_size: int,
        device: torch.device,
        use_kernel: bool = False,
    ) -> StepMetadata:
        query_start = [0]
        for num in num_new_tokens:
            query_start.append(query_start[-1] + num)
        slots = [
            context_slots(table, length, block_size)
            for table, length in zip(block_tables, seq_lens, strict=True)
        ]
        decodes = [i for i, num in enumerate(num_new_tokens) if num == 1]
        decode_rows = decode_slots = decode_mask = tables = lengths = None
        if decodes and use_kernel:
            widest = max(len(block_tables[i]) for i in decodes)
            tables = torch.zeros((len(decodes), widest), dtype=torch.int32)
            for row, i in enumerate(decodes):
                tables[row, : len(block_tables[i])] = torch.tensor(block_tables[i])
            tables = tables.to(device)
            lengths = torch.tensor([seq_lens[i] for i in decodes], dtype=torch.int32).to(device)
            decode_rows = torch.tensor([query_start[i] for i in decodes]).to(device)
        elif decodes:
            longest = max(seq_lens[i] for i in decodes)
            decode_slots = torch.zeros((len(decodes), longest), dtype=torch.long)
            decode_mask = torch.zeros((len(decodes), 1, 1, longest), dtype=torch.bool)
            for row, i in enumerate(decodes):
                decode_slots[row, : seq_lens[i]] = slots[i]
                decode_mask[row, ..., : seq_lens[i]] = True
            decode_rows = torch.tensor([query_start[i] for i in decodes]).to(device)
            decode_slots, decode_mask = decode_slots.to(device), decode_mask.to(device)
        prefills = [
            (query_start[i], query_start[i + 1], slots[i].to(device))
            for i, num in enumerate(num_new_tokens)
            if num > 1
        ]
        slot_mapping = torch.cat(
            [
                s[length - num :]
                for s, length, num in zip(slots, seq_lens, num_new_tokens, strict=True)
            ]
        ).to(device)
        return cls(
            query_start,
            seq_lens,
            slot_mapping,
            decode_rows,
            decode_slots,
            decode_mask,
            prefills,
            tables,
            lengths,
            block_size,
        )


def context_slots(block_table: list[int], length: int, block_size: int) -> torch.Tensor:
    """The cache slots of a sequence's first `length` tokens."""
    positions = torch.arange(length)
    table = torch.tensor(block_table, dtype=torch.long)
    return table[positions // block_size] * block_size + positions % block_size


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: StepMetadata,
    scaling: float | None,
) -> torch.Tensor:
    """query [num_heads, num_tokens, head_dim]; caches [num_slots, num_kv_heads, head_dim];
    returns [num_tokens, num_heads, head_dim]."""
    out = query.new_empty(query.shape[1], query.shape[0], query.shape[2])
    if meta.decode_block_tables is not None:
        from server.engine.triton_attention import decode_attention

        out[meta.decode_rows] = decode_attention(
            query[:, meta.decode_rows].transpose(0, 1).contiguous(),
            key_cache,
            value_cache,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            meta.block_size,
            scaling if scaling is not None else query.shape[-1] ** -0.5,
        )
    elif meta.decode_rows is not None:
        keys = key_cache[meta.decode_slots].transpose(1, 2)  # [decodes, kv_heads, longest, dim]
        values = value_cache[meta.decode_slots].transpose(1, 2)
        queries = (
            query[:, meta.decode_rows].transpose(0, 1).unsqueeze(2)
        )  # [decodes, heads, 1, dim]
        attended = scaled_dot_product_attention(
            queries, keys, values, attn_mask=meta.decode_mask, scale=scaling, enable_gqa=True
        )
        out[meta.decode_rows] = attended[:, :, 0]
    for start, end, slots in meta.prefills:
        keys = key_cache[slots].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, context, dim]
        values = value_cache[slots].transpose(0, 1).unsqueeze(0)
        out[start:end] = _chunk_attention(query[:, start:end], keys, values, scaling)
    return out


def _chunk_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """A prompt chunk's queries [heads, n, dim] over its whole context (cached tokens, then
    the chunk): query j sits at position context - n + j and sees keys up to there.

    sdpa's fused kernels take `is_causal` but skip no work for an explicit mask (which costs
    2x on the CPU), so a chunk whose cached part is no longer than itself is padded in front
    with dummy queries to a plain causal square; a short chunk over a long cache (a question
    after a cached video) is cheap either way and takes the mask."""
    num_queries, context = queries.shape[1], keys.shape[2]
    offset = context - num_queries
    mask = None
    if 0 < offset <= num_queries:
        queries = torch.cat(
            [queries.new_zeros(queries.shape[0], offset, queries.shape[2]), queries], 1
        )
    elif offset > 0:
        key_pos = torch.arange(context, device=queries.device)
        query_pos = torch.arange(offset, context, device=queries.device)
        mask = key_pos[None, :] <= query_pos[:, None]
    attended = scaled_dot_product_attention(
        queries.unsqueeze(0),
        keys,
        values,
        attn_mask=mask,
        is_causal=mask is None,
        scale=scaling,
        enable_gqa=True,
    )
    return attended[0, :, -num_queries:].transpose(0, 1)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged_metadata: StepMetadata | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """HF's attention-function signature; key/value are the layer's whole paged buffers.
    Outside an engine step (HF's own generate on the same model, in tests) it is plain sdpa."""
    if paged_metadata is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    out = paged_attention(query[0], key, value, paged_metadata, scaling)
    return out.unsqueeze(0), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
