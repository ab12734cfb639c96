"""A Triton kernel for decode attention that reads the paged KV cache through the block table.

One program per (decoding sequence, KV head): it loads the queries of every head that shares
the KV head (GQA: Qwen2-VL-2B has 6 per KV head, -7B 7), walks the sequence's blocks in order
with an online softmax, and writes their outputs. Nothing is gathered or copied: each key and
value is read once per step, which is what a memory-bound decode step costs.

Off unless `--attention-backend triton` (on CUDA with bf16/fp16 weights, --block-size 16 to
128, a power of two); prompt chunks always
use the reference path (sdpa over the gathered context), where compute, not the gather, is the
cost. The module imports Triton, so it is only imported when the kernel is used; tests run it
on the CPU under TRITON_INTERPRET=1 against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_DOT = 16  # tl.dot needs every dimension to be at least 16


# stride_table (the widest block table of the step) not specialised on: one compiled kernel
# serves every width, so the one compile_now makes at start is the one serving uses.
@triton.jit(do_not_specialize=["stride_table"])
def _decode_kernel(
    query,  # [num_decodes, num_heads, head_dim]
    key_cache,  # [num_slots, num_kv_heads, head_dim]
    value_cache,
    out,  # like query
    block_tables,  # [num_decodes, max_blocks] int32
    seq_lens,  # [num_decodes] int32: keys to attend to (the new one included)
    scale,
    stride_q_token,
    stride_q_head,
    stride_k_slot,
    stride_k_head,
    stride_v_slot,
    stride_v_head,
    stride_o_token,
    stride_o_head,
    stride_table,
    HEADS_PER_KV: tl.constexpr,
    ROWS: tl.constexpr,  # HEADS_PER_KV padded to a power of two >= 16
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    head = kv_head * HEADS_PER_KV + rows
    row_ok = rows < HEADS_PER_KV
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        query + seq * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    length = tl.load(seq_lens + seq)
    best = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    offsets = tl.arange(0, BLOCK_SIZE)
    for index in range(0, tl.cdiv(length, BLOCK_SIZE)):
        block = tl.load(block_tables + seq * stride_table + index).to(tl.int64)
        slots = block * BLOCK_SIZE + offsets
        key_ok = index * BLOCK_SIZE + offsets < length
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(
            key_cache + slots[:, None] * stride_k_slot + kv_head * stride_k_head + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            value_cache + slots[:, None] * stride_v_slot + kv_head * stride_v_head + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        weights = tl.exp(scores - new_best[:, None])
        rescale = tl.exp(best - new_best)
        total = total * rescale + tl.sum(weights, 1)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
        best = new_best
    result = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(
        out + seq * stride_o_token + head[:, None] * stride_o_head + dims[None, :],
        result.to(out.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """query [num_decodes, num_heads, head_dim] -> attention output of the same shape."""
    num_decodes, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[1]
    if block_size < MIN_DOT or block_size & (block_size - 1):
        raise ValueError(f"the Triton decode kernel needs a power-of-two block size >= {MIN_DOT}")
    heads_per_kv = num_heads // num_kv_heads
    out = torch.empty_like(query)
    _decode_kernel[(num_decodes, num_kv_heads)](
        query,
        key_cache,
        value_cache,
        out,
        block_tables,
        seq_lens,
        scale,
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        value_cache.stride(0),
        value_cache.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        HEADS_PER_KV=heads_per_kv,
        ROWS=max(MIN_DOT, triton.next_power_of_2(heads_per_kv)),
        HEAD_DIM=head_dim,
        BLOCK_D=max(MIN_DOT, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
    )
    return out


def compile_now(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Run the kernel once for the model's shapes on a one-block cache: Triton compiles it
    (and builds its launcher, which needs a C compiler and Python's headers) at start, where a
    failure stops the server with its reason, rather than inside the first decode step."""
    query = torch.zeros(1, num_heads, head_dim, dtype=dtype, device=device)
    cache = torch.zeros(block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    table = torch.zeros(1, 1, dtype=torch.int32, device=device)
    seq_lens = torch.ones(1, dtype=torch.int32, device=device)
    decode_attention(query, cache, cache, table, seq_lens, block_size, 1.0)
