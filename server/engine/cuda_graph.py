"""Decode steps replayed as CUDA graphs, one graph per batch-size bucket.

An eager decode step launches every kernel of every layer from Python (about 1,250 for a
28-layer Qwen2-VL), which costs more than the step's own memory traffic. A captured graph
launches them all at once. A graph replays fixed shapes at fixed addresses, so the step reads
static buffers (`DecodeBuffers`), filled before each replay: a batch of n decodes runs in the
smallest bucket >= n, its padding rows writing to a scratch KV slot that no sequence owns and
attending to that slot alone, so they cost a little work and change nothing. `lm_head` is inside
the graph; the sampler reads the first n rows of its output.

Only CUDA captures. Elsewhere (the CPU tests, `--no-enforce-eager` on a CPU) the same padded
step runs eagerly on the same buffers: everything but the capture itself is checked there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.engine.transfer import to_device

logger = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (which is always a bucket)."""
    sizes = [n for n in (1, 2, 4, 8) if n < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return [*sizes, max_num_seqs]


@dataclass
class DecodeBuffers:
    """The step's inputs at fixed addresses; row i is decode i (rows past n are padding)."""

    token_ids: torch.Tensor  # [rows] int64
    positions: torch.Tensor  # [rows] int64: text position + rope delta (all 3 mrope axes)
    slot_mapping: torch.Tensor  # [rows] int64: where the new token's keys/values go
    block_tables: torch.Tensor  # [rows, max_blocks] int32
    seq_lens: torch.Tensor  # [rows] int32: context length including the new token
    rows: torch.Tensor  # [rows] int64: 0..rows-1 (the decodes' rows in the step)

    @classmethod
    def allocate(cls, num_rows: int, max_blocks: int, device: torch.device) -> DecodeBuffers:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            zeros(num_rows),
            zeros(num_rows),
            zeros(num_rows),
            zeros(num_rows, max_blocks, dtype=torch.int32),
            zeros(num_rows, dtype=torch.int32),
            torch.arange(num_rows, device=device),
        )

    @classmethod
    def scratch(
        cls, num_rows: int, scratch_block: int, block_size: int, device: torch.device
    ) -> DecodeBuffers:
        """Rows that write to the scratch block and attend to it alone (as padding rows do)."""
        buffers = cls.allocate(num_rows, 1, device)
        buffers.slot_mapping.fill_(scratch_block * block_size)
        buffers.block_tables.fill_(scratch_block)
        buffers.seq_lens.fill_(1)
        return buffers

    def first(self, num: int) -> DecodeBuffers:
        return DecodeBuffers(
            self.token_ids[:num],
            self.positions[:num],
            self.slot_mapping[:num],
            self.block_tables[:num],
            self.seq_lens[:num],
            self.rows[:num],
        )


@dataclass
class DecodeRow:
    """One decode, as the host knows it."""

    token_id: int
    position: int
    slot: int
    block_table: list[int]
    seq_len: int
    # The sequence and its allocation (a preempted sequence is given new blocks): its row of
    # the table buffer is rewritten only when this changes, else only its new blocks are.
    table_key: object = None


class DecodeGraphs:
    def __init__(
        self,
        forward: Callable[[DecodeBuffers], torch.Tensor],
        max_num_seqs: int,
        max_blocks: int,
        scratch_block: int,
        block_size: int,
        device: torch.device,
    ):
        self.forward = forward  # buffers -> logits [rows, vocab]; no host syncs inside
        self.buckets = batch_buckets(max_num_seqs)
        self.scratch_block = scratch_block
        self.block_size = block_size
        self.buffers = DecodeBuffers.allocate(self.buckets[-1], max_blocks, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # What each row of the table buffer holds: (table_key, blocks written), or None.
        self.table_rows: list[tuple[object, int] | None] = [None] * self.buckets[-1]
        self._fill_padding(0, self.buckets[-1])
        self.num_replays = 0

    def bucket(self, num: int) -> int | None:
        """The smallest bucket that holds `num` decodes; None: too many, run eagerly."""
        return next((size for size in self.buckets if size >= num), None)

    def capture(self) -> None:
        """Capture every bucket, largest first, into one memory pool (smaller graphs reuse
        the largest one's activations)."""
        device = self.buffers.token_ids.device
        # The capture stream and the current device must be the model's (cuda:N), whatever
        # thread builds the engine.
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            pool = None
            for size in reversed(self.buckets):
                inputs = self.buffers.first(size)
                self.forward(inputs)  # warm-up: Triton compiles, cuBLAS picks its kernels
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[size] = self.forward(inputs)
                pool = graph.pool()
                self.graphs[size] = graph
            torch.cuda.synchronize(device)

    def run(self, decodes: list[DecodeRow]) -> torch.Tensor:
        """Logits [len(decodes), vocab] of one decode-only step."""
        return self.replay(self.fill(decodes), len(decodes))

    def fill(self, decodes: list[DecodeRow]) -> int:
        """The buffers for these decodes (the caller may still change them on the device);
        returns the bucket to replay."""
        size = self.bucket(len(decodes))
        if size is None:
            raise ValueError(f"{len(decodes)} decodes exceed the largest bucket")
        self._fill(decodes, size)
        return size

    def replay(self, size: int, num: int) -> torch.Tensor:
        """Logits [num, vocab] of the step filled for bucket `size`."""
        graph = self.graphs.get(size)
        if graph is None:  # not captured (no CUDA): the same padded step, eagerly
            return self.forward(self.buffers.first(size))[:num]
        graph.replay()
        self.num_replays += 1
        return self.outputs[size][:num]

    def _fill(self, decodes: list[DecodeRow], size: int) -> None:
        num = len(decodes)
        device = self.buffers.token_ids.device
        ints = [[d.token_id, d.position, d.slot, d.seq_len] for d in decodes]
        columns = to_device(ints, device, torch.long)  # one copy for the four of them
        buffers = self.buffers
        buffers.token_ids[:num].copy_(columns[:, 0])
        buffers.positions[:num].copy_(columns[:, 1])
        buffers.slot_mapping[:num].copy_(columns[:, 2])
        buffers.seq_lens[:num].copy_(columns[:, 3])
        for row, decode in enumerate(decodes):
            self._fill_table(row, decode)
        self._fill_padding(num, size)

    def _fill_table(self, row: int, decode: DecodeRow) -> None:
        """Only what changed since the last step: a table grows a block every block_size
        tokens, and a long context's table is thousands of entries (copying all of them every
        step cost more than a decode step)."""
        known = self.table_rows[row]
        table = decode.block_table
        reusable = known is not None and decode.table_key is not None
        first = known[1] if reusable and known[0] == decode.table_key else 0
        if first < len(table):
            fresh = to_device(table[first:], self.buffers.block_tables.device, torch.int32)
            self.buffers.block_tables[row, first : len(table)].copy_(fresh)
        self.table_rows[row] = (decode.table_key, len(table))

    def _fill_padding(self, start: int, end: int) -> None:
        """Rows [start, end) write their keys to the scratch block and attend to it alone."""
        if start == end:
            return
        self.buffers.token_ids[start:end] = 0
        self.buffers.positions[start:end] = 0
        self.buffers.slot_mapping[start:end] = self.scratch_block * self.block_size
        self.buffers.block_tables[start:end] = self.scratch_block
        self.buffers.seq_lens[start:end] = 1
        self.table_rows[start:end] = [None] * (end - start)
