"""Attention over the paged KV cache, plugged into HF's Qwen2-VL text model.

One engine step is one flattened batch: every scheduled sequence contributes its new tokens
(one for a decode, a chunk for a prefill) back to back. `StepMetadata` says where each
sequence's queries are in that batch and which cache slots hold its context. The text model
calls the function registered here (ATTENTION_NAME) in place of sdpa; the keys/values of the
step are already in the cache (kv_cache.StepCache.update wrote them).

The implementation here is the plain-torch reference: one-token queries (decodes) together in
groups, each gathering its rows' contexts through their block tables on the device (the host
sends a table entry per block, not a slot per token), and each prompt chunk on its own (causal,
offset by what is already cached). It is exact and runs anywhere;
it is what CPU runs use and the oracle the Triton decode kernel (triton_attention.py, chosen
with --attention-backend triton) is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention

from server.engine.transfer import to_device

ATTENTION_NAME = "vlm_paged"


# Decodes are gathered in groups of at most this many context tokens (all rows padded to the
# group's longest): a batch of long contexts never materialises all of its KV at once.
MAX_GATHERED_TOKENS = 1 << 18


@dataclass
class DecodeGroup:
    rows: torch.Tensor  # [n] rows of the step that are these decodes
    block_tables: torch.Tensor  # [n, most blocks] int32 (the slots are made on the device)
    seq_lens: torch.Tensor  # [n] int32
    every_row: bool = False  # rows are the step's rows 0..n-1 in order (a decode-only step)


@dataclass
class StepMetadata:
    query_start: list[int]  # [num_seqs + 1]: the sequences' queries in the flattened step
    seq_lens: list[int]  # context length of each sequence after this step
    slot_mapping: torch.Tensor  # [num_tokens]: the cache slot of each new token
    # Decodes read through their block tables: by the Triton kernel (--attention-backend
    # triton; one group), else gathered on the device (groups capped by MAX_GATHERED_TOKENS;
    # the CUDA-graph step: one group of fixed width). Each prompt chunk alone.
    decode_groups: list[DecodeGroup]
    prefills: list[tuple[int, int, torch.Tensor]]  # (first row, end row, context slots)
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
        group = DecodeGroup(rows, block_tables, seq_lens, every_row=True)
        return cls(list(range(num + 1)), [], slot_mapping, [group], [], block_size, use_kernel)

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
        slot_mapping = to_device(new_token_slots(steps, block_size), device)
        prefills = [
            (
                query_start[i],
                query_start[i + 1],
                to_device(slots_of(table, 0, length, block_size), device),
            )
            for i, (table, length, num) in enumerate(steps)
            if num > 1
        ]
        decodes = [i for i, num in enumerate(num_new_tokens) if num == 1]
        if not decodes:
            groups = []
        elif use_kernel or len(decodes) * max(seq_lens) <= MAX_GATHERED_TOKENS:
            groups = [decodes]  # the kernel reads the cache in place; else the gather fits
        else:
            groups = _gather_groups(sorted(decodes, key=seq_lens.__getitem__), seq_lens)
        decode_groups = [
            _decode_group(group, query_start, block_tables, seq_lens, device) for group in groups
        ]
        return cls(
            query_start, seq_lens, slot_mapping, decode_groups, prefills, block_size, use_kernel
        )


def _gather_groups(decodes: list[int], seq_lens: list[int]) -> list[list[int]]:
    """Decodes (shortest first) in groups whose padded gather stays under the cap."""
    groups: list[list[int]] = [[]]
    for i in decodes:
        if groups[-1] and (len(groups[-1]) + 1) * seq_lens[i] > MAX_GATHERED_TOKENS:
            groups.append([])
        groups[-1].append(i)
    return groups


def _decode_group(
    decodes: list[int],
    query_start: list[int],
    block_tables: list[list[int]],
    seq_lens: list[int],
    device: torch.device,
) -> DecodeGroup:
    """These decodes' block tables (their blocks, not every context slot: the host's work per
    step is a table entry per block_size tokens)."""
    widest = max(len(block_tables[i]) for i in decodes)
    tables = np.zeros((len(decodes), widest), dtype=np.int32)  # numpy: a list per row, fast
    for row, i in enumerate(decodes):
        tables[row, : len(block_tables[i])] = block_tables[i]
    lengths = torch.tensor([seq_lens[i] for i in decodes], dtype=torch.int32)
    rows = [query_start[i] for i in decodes]
    return DecodeGroup(
        to_device(rows, device, torch.long),
        to_device(tables, device),
        to_device(lengths, device),
        every_row=rows == list(range(query_start[-1])),
    )


def new_token_slots(steps: list[tuple[list[int], int, int]], block_size: int) -> torch.Tensor:
    """The slots of each (block table, context length, new tokens) step's new tokens, in order:
    a decode's one slot as a plain int (no tensor work per sequence), a chunk's through
    slots_of."""
    parts: list[int | torch.Tensor] = []
    for table, length, num in steps:
        if num == 1:
            position = length - 1
            parts.append(table[position // block_size] * block_size + position % block_size)
        else:
            parts.append(slots_of(table, length - num, length, block_size))
    return join_runs(parts, lambda ints: torch.tensor(ints, dtype=torch.long))


def join_runs(
    parts: list[int | torch.Tensor],
    run_tensor: Callable[[list[int]], torch.Tensor],
    dim: int = 0,
) -> torch.Tensor:
    """Per-sequence parts of a step, in order, as one tensor: a run of plain ints (decodes:
    no tensor work per sequence) becomes one tensor through run_tensor; tensors (chunks) go
    as they are."""
    out: list[torch.Tensor] = []
    run: list[int] = []
    for part in [*parts, None]:
        if isinstance(part, int):
            run.append(part)
            continue
        if run:
            out.append(run_tensor(run))
            run = []
        if part is not None:
            out.append(part)
    return out[0] if len(out) == 1 else torch.cat(out, dim=dim)


def slots_of(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """The cache slots of a sequence's tokens [start, end) (only their blocks are read: a
    decode's one slot costs one table entry, not the whole table)."""
    positions = torch.arange(start, end)
    first = start // block_size
    table = torch.tensor(block_table[first : -(-end // block_size)], dtype=torch.long)
    return table[positions // block_size - first] * block_size + positions % block_size


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
    decode_attention = table_decode_attention
    if meta.use_kernel and meta.decode_groups:
        from server.engine.triton_attention import decode_attention
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    for group in meta.decode_groups:
        out[group.rows] = decode_attention(
            query[:, group.rows].transpose(0, 1).contiguous(),
            key_cache,
            value_cache,
            group.block_tables,
            group.seq_lens,
            meta.block_size,
            scale,
        )
    for start, end, slots in meta.prefills:
        keys = key_cache[slots].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, context, dim]
        values = value_cache[slots].transpose(0, 1).unsqueeze(0)
        out[start:end] = _chunk_attention(query[:, start:end], keys, values, scaling)
    return out


def attend_decodes(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: StepMetadata,
    scale: float,
) -> torch.Tensor:
    """A decode-only step's attention in the fused decoder's layout: query [n, heads, dim]
    -> the same shape. One group holding every row in order goes straight to the decode
    function (no gather of the queries, no scatter of the outputs)."""
    groups = meta.decode_groups
    if len(groups) != 1 or not groups[0].every_row or meta.prefills:
        return paged_attention(query.transpose(0, 1), key_cache, value_cache, meta, scale)
    decode_attention = table_decode_attention
    if meta.use_kernel:
        from server.engine.triton_attention import decode_attention
    group = groups[0]
    return decode_attention(
        query, key_cache, value_cache, group.block_tables, group.seq_lens, meta.block_size, scale
    )


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
