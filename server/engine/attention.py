"""Attention over the paged KV cache, plugged into HF's Qwen2-VL text model.

One engine step is one flattened batch: every scheduled sequence contributes its new tokens
(one for a decode, a chunk for a prefill) back to back. `StepMetadata` says where each
sequence's queries are in that batch and which cache slots hold its context. The text model
calls the function registered here (ATTENTION_NAME) in place of sdpa; the keys/values of the
step are already in the cache (kv_cache.StepCache.update wrote them).

The implementation here is the plain-torch reference: it gathers each sequence's context
slots and runs sdpa, one-token queries (decodes) together in padded groups, each prompt chunk
on its own (causal, offset by what is already cached). It is exact and runs anywhere;
it is what CPU runs use and the oracle the Triton decode kernel (triton_attention.py, chosen
with --attention-backend triton) is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention

ATTENTION_NAME = "vlm_paged"


# Decodes are gathered in groups of at most this many context tokens (all rows padded to the
# group's longest): a batch of long contexts never materialises all of its KV at once.
MAX_GATHERED_TOKENS = 1 << 18


@dataclass
class DecodeGroup:
    rows: torch.Tensor  # [n] rows of the step that are these decodes
    slots: torch.Tensor  # [n, longest] cache slots of each context (padding: slot 0)
    mask: torch.Tensor  # [n, 1, 1, longest] the real context positions


@dataclass
class StepMetadata:
    query_start: list[int]  # [num_seqs + 1]: the sequences' queries in the flattened step
    seq_lens: list[int]  # context length of each sequence after this step
    slot_mapping: torch.Tensor  # [num_tokens]: the cache slot of each new token
    # Reference path: decodes in padded groups, each prompt chunk alone.
    decode_groups: list[DecodeGroup]
    prefills: list[tuple[int, int, torch.Tensor]]  # (first row, end row, context slots)
    # Decodes read through their block tables: the Triton kernel (--attention-backend
    # triton), or a fixed-width gather (the CUDA-graph step on the reference backend).
    decode_rows: torch.Tensor | None = None  # [num_decodes]
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, most blocks] int32
    decode_seq_lens: torch.Tensor | None = None  # [num_decodes] int32
    block_size: int = 0
    use_kernel: bool = False

    @classmethod
    def for_decodes(
        cls,
        rows: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        use_kernel: bool,
    ) -> StepMetadata:
        """A decode-only step from device tensors alone (what a CUDA graph captures): no
        host-side lists, no shapes that depend on the contexts' lengths."""
        num = rows.shape[0]
        return cls(
            list(range(num + 1)),
            [],
            slot_mapping,
            [],
            [],
            rows,
            block_tables,
            seq_lens,
            block_size,
            use_kernel,
        )

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
        steps = list(zip(block_tables, seq_lens, num_new_tokens, strict=True))
        # Only the new tokens' slots here: a whole context's are made where it is read.
        slot_mapping = torch.cat(
            [slots_of(table, length - num, length, block_size) for table, length, num in steps]
        ).to(device)
        prefills = [
            (query_start[i], query_start[i + 1], slots_of(table, 0, length, block_size).to(device))
            for i, (table, length, num) in enumerate(steps)
            if num > 1
        ]
        meta = cls(query_start, seq_lens, slot_mapping, [], prefills, block_size=block_size)
        decodes = [i for i, num in enumerate(num_new_tokens) if num == 1]
        if decodes and use_kernel:
            widest = max(len(block_tables[i]) for i in decodes)
            tables = torch.zeros((len(decodes), widest), dtype=torch.int32)
            for row, i in enumerate(decodes):
                tables[row, : len(block_tables[i])] = torch.tensor(block_tables[i])
            meta.decode_block_tables = tables.to(device)
            lengths = torch.tensor([seq_lens[i] for i in decodes], dtype=torch.int32)
            meta.decode_seq_lens = lengths.to(device)
            meta.decode_rows = torch.tensor([query_start[i] for i in decodes]).to(device)
            meta.use_kernel = True
        elif decodes:
            contexts = {i: slots_of(block_tables[i], 0, seq_lens[i], block_size) for i in decodes}
            meta.decode_groups = [
                _decode_group([query_start[i] for i in group], [contexts[i] for i in group], device)
                for group in _gather_groups(sorted(decodes, key=seq_lens.__getitem__), seq_lens)
            ]
        return meta


def _gather_groups(decodes: list[int], seq_lens: list[int]) -> list[list[int]]:
    """Decodes (shortest first) in groups whose padded gather stays under the cap."""
    groups: list[list[int]] = [[]]
    for i in decodes:
        if groups[-1] and (len(groups[-1]) + 1) * seq_lens[i] > MAX_GATHERED_TOKENS:
            groups.append([])
        groups[-1].append(i)
    return groups


def _decode_group(
    rows: list[int], contexts: list[torch.Tensor], device: torch.device
) -> DecodeGroup:
    longest = max(len(c) for c in contexts)
    slots = torch.zeros((len(rows), longest), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, 1, longest), dtype=torch.bool)
    for row, context in enumerate(contexts):
        slots[row, : len(context)] = context
        mask[row, ..., : len(context)] = True
    return DecodeGroup(torch.tensor(rows).to(device), slots.to(device), mask.to(device))


def slots_of(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """The cache slots of a sequence's tokens [start, end)."""
    positions = torch.arange(start, end)
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
        if meta.use_kernel:
            from server.engine.triton_attention import decode_attention
        else:
            decode_attention = table_decode_attention
        out[meta.decode_rows] = decode_attention(
            query[:, meta.decode_rows].transpose(0, 1).contiguous(),
            key_cache,
            value_cache,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            meta.block_size,
            scaling if scaling is not None else query.shape[-1] ** -0.5,
        )
    for group in meta.decode_groups:
        out[group.rows] = _decode_attention(
            query[:, group.rows], key_cache, value_cache, group, scaling
        )
    for start, end, slots in meta.prefills:
        keys = key_cache[slots].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, context, dim]
        values = value_cache[slots].transpose(0, 1).unsqueeze(0)
        out[start:end] = _chunk_attention(query[:, start:end], keys, values, scaling)
    return out


def _decode_attention(
    queries: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    group: DecodeGroup,
    scaling: float | None,
) -> torch.Tensor:
    """One query per sequence, [heads, n, dim] -> [n, heads, dim]. The query heads that share a
    KV head go in as that head's query rows ([n, kv_heads, heads per kv, dim]), so GQA needs no
    expanded copy of the keys and the padding mask broadcasts over them."""
    num_heads, num_seqs, head_dim = queries.shape
    num_kv_heads = key_cache.shape[1]
    keys = key_cache[group.slots].transpose(1, 2)  # [n, kv_heads, longest, dim]
    values = value_cache[group.slots].transpose(1, 2)
    grouped = queries.transpose(0, 1).reshape(num_seqs, num_kv_heads, -1, head_dim)
    attended = scaled_dot_product_attention(
        grouped, keys, values, attn_mask=group.mask, scale=scaling
    )
    return attended.reshape(num_seqs, num_heads, head_dim)


def table_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """The Triton kernel's contract in plain torch (query [n, heads, dim] -> same shape): every
    row gathers its table's full width and masks past its length. The shapes depend only on
    the table's width, so a CUDA graph can capture it; the cost is the width, not the context
    (the kernel reads only the context)."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[1]
    offsets = torch.arange(block_size, device=query.device)
    slots = (block_tables.long()[:, :, None] * block_size + offsets).flatten(1)
    keys = key_cache[slots].transpose(1, 2)  # [n, kv_heads, width, dim]
    values = value_cache[slots].transpose(1, 2)
    positions = torch.arange(slots.shape[1], device=query.device)
    mask = (positions[None] < seq_lens[:, None])[:, None, None]  # [n, 1, 1, width]
    grouped = query.reshape(num_seqs, num_kv_heads, -1, head_dim)
    attended = scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return attended.reshape(num_seqs, num_heads, head_dim)


def _chunk_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """A prompt chunk's queries [heads, n, dim] over its whole context (cached tokens, then
    the chunk): query j sits at position context - n + j and sees keys up to there.

    No dense mask ever: sdpa's fused kernels skip no work for one (2x on the CPU) and, with
    GQA, fall back to a kernel that materialises every score in float32 (tens of GiB for a
    chunk of a 32k prompt on a GPU). A chunk whose cached part is no longer than itself is
    padded in front with dummy queries to a plain causal square; a short chunk over a long
    cache (a question after a cached video) takes sdpa's lower-right causal bias, with the
    keys expanded to every query head (the bias does not take GQA)."""
    num_heads, num_queries, _ = queries.shape
    context = keys.shape[2]
    offset = context - num_queries
    if offset > num_queries:
        repeat = num_heads // keys.shape[1]
        attended = scaled_dot_product_attention(
            queries.unsqueeze(0),
            keys.repeat_interleave(repeat, dim=1),
            values.repeat_interleave(repeat, dim=1),
            attn_mask=causal_lower_right(num_queries, context),
            scale=scaling,
        )
        return attended[0].transpose(0, 1)
    if offset > 0:
        padding = queries.new_zeros(num_heads, offset, queries.shape[2])
        queries = torch.cat([padding, queries], 1)
    attended = scaled_dot_product_attention(
        queries.unsqueeze(0), keys, values, is_causal=True, scale=scaling, enable_gqa=True
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
