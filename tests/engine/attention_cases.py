"""Paged attention cases shared by the CPU tests and the GPU check: random keys/values in
shuffled blocks, GQA shapes of Qwen2-VL-2B (12 query heads : 2 KV heads) and -7B (28 : 4),
decodes and prompt chunks on top of cached context, checked against dense causal sdpa."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import scaled_dot_product_attention

from server.engine.attention import StepMetadata, paged_attention

GQA_SHAPES = {"qwen2-vl-2b": (12, 2), "qwen2-vl-7b": (28, 4)}


@dataclass
class Case:
    query: torch.Tensor  # [num_heads, num_tokens, head_dim]
    keys: torch.Tensor  # [num_slots, num_kv_heads, head_dim]
    values: torch.Tensor
    tables: list[list[int]]
    seq_lens: list[int]
    num_new: list[int]
    block_size: int

    def paged(self, use_kernel: bool) -> torch.Tensor:
        meta = StepMetadata.build(
            self.tables,
            self.num_new,
            self.seq_lens,
            self.block_size,
            self.query.device,
            use_kernel,
        )
        return paged_attention(self.query, self.keys, self.values, meta, self.scale)

    @property
    def scale(self) -> float:
        return self.query.shape[-1] ** -0.5

    def dense(self) -> torch.Tensor:
        """Each sequence's keys gathered block by block, causal sdpa in float32."""
        outputs, start = [], 0
        for table, length, num in zip(self.tables, self.seq_lens, self.num_new, strict=True):
            slots = [b * self.block_size + j for b in table for j in range(self.block_size)]
            index = torch.tensor(slots[:length], device=self.keys.device)
            keys = self.keys[index].float().transpose(0, 1)[None]
            values = self.values[index].float().transpose(0, 1)[None]
            query = self.query[:, start : start + num].float()[None]
            query_pos = torch.arange(length - num, length, device=keys.device)
            mask = torch.arange(length, device=keys.device)[None, :] <= query_pos[:, None]
            out = scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True
            )
            outputs.append(out[0].transpose(0, 1))
            start += num
        return torch.cat(outputs)


def make_case(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    seq_lens: list[int],
    num_new: list[int],
    block_size: int,
    device: str,
    dtype: torch.dtype,
    seed: int = 0,
) -> Case:
    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()  # scattered blocks
    tables, cursor = [], 0
    for count in blocks_needed:
        tables.append(order[cursor : cursor + count])
        cursor += count
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    keys = torch.randn(shape, generator=generator).to(device, dtype)
    values = torch.randn(shape, generator=generator).to(device, dtype)
    query = torch.randn((num_heads, sum(num_new), head_dim), generator=generator).to(device, dtype)
    return Case(query, keys, values, tables, seq_lens, num_new, block_size)


def decode_cases(device: str, dtype: torch.dtype, head_dim: int = 128) -> list[Case]:
    """Decodes only (what the kernel serves), at both GQA shapes."""
    return [
        make_case(heads, kv_heads, head_dim, [1, 17, 64, 250], [1, 1, 1, 1], 16, device, dtype)
        for heads, kv_heads in GQA_SHAPES.values()
    ]


def max_kernel_error(device: str, dtype: torch.dtype, head_dim: int = 128) -> float:
    """Largest |kernel - reference| over the decode cases (the GPU check prints it)."""
    return max(
        float((case.paged(True) - case.paged(False)).abs().max())
        for case in decode_cases(device, dtype, head_dim)
    )


def engine_tokens(
    model_dir: str, backend: str, device: str = "cpu", graphs: bool = False
) -> list[list[int]]:
    """Greedy tokens of three prompts decoded together by an engine on the given backend,
    decode steps through the CUDA-graph buffers with `graphs` (the image prompt's answer is
    checked against HF's generate by the caller)."""
    import asyncio
    import io

    from PIL import Image

    from server.config import Settings
    from server.engine.engine import AsyncEngine
    from server.engine.inputs import InputBuilder
    from server.engine.loader import load_model
    from server.engine.sampling import SamplingParams
    from tests.helpers import make_image

    loaded = load_model(Settings(model=model_dir, device=device).engine_config())
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    image = Image.open(io.BytesIO(make_image(96, 64)))
    prompts = [
        builder.build(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}], [image]
        )
        for t in ("Hi", "What is this?", "Describe it in detail.")
    ]
    sampling = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    async def run() -> list[list[int]]:
        settings = Settings(
            model="x", attention_backend=backend, max_model_len=1024, enforce_eager=not graphs
        )
        engine = AsyncEngine.build(loaded, settings.engine_config())
        engine.start()
        seqs = [engine.add_request(f"r{i}", p, sampling) for i, p in enumerate(prompts)]
        for seq in seqs:
            async for _ in engine.stream(seq):
                pass
        await engine.stop()
        return [seq.output_token_ids for seq in seqs]

    return asyncio.run(run())
