"""Decode steps through DecodeGraphs' static, padded buffers (what a CUDA graph replays). The
CPU runs the same padded step eagerly, so everything but the capture is checked here: the
tokens equal the eager engine's, padding rows touch only the scratch block, the step makes no
host sync (a graph cannot capture one), and the fixed-width attention matches the reference."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from server.config import Settings
from server.engine.attention import table_decode_attention
from server.engine.cuda_graph import DecodeGraphs, DecodeRow, batch_buckets
from server.engine.engine import AsyncEngine
from server.engine.inputs import InputBuilder
from server.engine.loader import LoadedModel
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.engine.structured import StructuredOutput
from tests.engine.attention_cases import decode_cases


def test_batch_buckets() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(1) == [1]


@pytest.mark.parametrize("case", decode_cases("cpu", torch.float32, head_dim=32))
def test_fixed_width_attention_matches_the_reference(case) -> None:
    width = max(len(t) for t in case.tables) + 3  # wider than any context, like a graph's
    tables = torch.full((len(case.tables), width), 7, dtype=torch.int32)  # stale entries
    for row, table in enumerate(case.tables):
        tables[row, : len(table)] = torch.tensor(table)
    out = table_decode_attention(
        case.query.transpose(0, 1).contiguous(),
        case.keys,
        case.values,
        tables,
        torch.tensor(case.seq_lens, dtype=torch.int32),
        case.block_size,
        case.scale,
    )
    torch.testing.assert_close(out, case.paged(False), rtol=1e-5, atol=1e-5)


def build_engine(loaded: LoadedModel, enforce_eager: bool, **overrides: object) -> AsyncEngine:
    settings = Settings(model="x", max_model_len=512, enforce_eager=enforce_eager, **overrides)
    return AsyncEngine.build(loaded, settings.engine_config())


def prompts(loaded: LoadedModel) -> list:
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    texts = ["Hi", "Tell me a story about a lighthouse.", "Count: one two three four five"]
    return [builder.build([{"role": "user", "content": t}], []) for t in texts]


async def generate(engine: AsyncEngine, inputs: list, sampling: list) -> list[list[int]]:
    engine.start()
    try:
        seqs = [
            engine.add_request(f"r{i}", p, s)
            for i, (p, s) in enumerate(zip(inputs, sampling, strict=True))
        ]
        for seq in seqs:
            async for _ in engine.stream(seq):
                pass
        return [seq.output_token_ids for seq in seqs]
    finally:
        await engine.stop()


@pytest.mark.anyio
async def test_padded_graph_steps_decode_like_eager(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampling = [
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=14, temperature=0, repetition_penalty=1.3, ignore_eos=True),
    ]
    inputs = prompts(loaded)
    eager = await generate(build_engine(loaded, True), inputs, sampling)

    sizes: list[int] = []
    replay = DecodeGraphs.replay

    def counting_replay(self: DecodeGraphs, size: int, num: int) -> torch.Tensor:
        sizes.append(num)
        return replay(self, size, num)

    monkeypatch.setattr(DecodeGraphs, "replay", counting_replay)
    engine = build_engine(loaded, False)
    assert await generate(engine, inputs, sampling) == eager
    assert 3 in sizes and 1 in sizes  # three decodes padded to a bucket of 4, then fewer
    # On CUDA (the GPU check) those steps were graph replays; elsewhere the same padded step.
    replayed = engine.runner.graphs.num_replays
    assert replayed == len(sizes) if loaded.device.type == "cuda" else replayed == 0


def test_eager_engine_builds_no_graphs(loaded: LoadedModel) -> None:
    assert build_engine(loaded, True).runner.graphs is None
    assert build_engine(loaded, False, quantization="none").runner.graphs is not None


def fill(engine: AsyncEngine, decodes: list[DecodeRow]) -> None:
    graphs = engine.runner.graphs
    graphs._fill(decodes, graphs.bucket(len(decodes)))


def some_decodes(engine: AsyncEngine) -> list[DecodeRow]:
    """Three decodes on blocks 0-5, at positions that cross block boundaries."""
    size = engine.runner.block_size
    tables = [[0, 1], [2], [3, 4, 5]]
    positions = [size + 2, 0, 2 * size + 5]
    return [
        DecodeRow(11 + i, p, t[p // size] * size + p % size, t, p + 1)
        for i, (t, p) in enumerate(zip(tables, positions, strict=True))
    ]


def test_padding_rows_write_only_the_scratch_block(loaded: LoadedModel) -> None:
    engine = build_engine(loaded, False)
    runner = engine.runner
    decodes = some_decodes(engine)
    for layer in runner.kv_cache.keys:
        layer.normal_()
    before = [layer.clone() for layer in runner.kv_cache.keys]
    with torch.inference_mode():
        runner.graphs.run(decodes)
    size = runner.block_size
    written = {d.slot for d in decodes}
    scratch = range(runner.graphs.scratch_block * size, (runner.graphs.scratch_block + 1) * size)
    for old, new in zip(before, runner.kv_cache.keys, strict=True):
        changed = set((old != new).any(-1).any(-1).nonzero().flatten().tolist())
        assert written <= changed <= written | set(scratch)
        assert changed - written  # the padding row did write, to the scratch block


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
# Operators a CUDA graph cannot capture: a scalar read, an output shaped by the data, a tensor
# made from host values (its copy to the device would be replayed from freed host memory).
UNCAPTURABLE = {"_local_scalar_dense", "nonzero", "masked_select", "lift_fresh", "lift_fresh_copy"}


class RefuseUncapturable(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name.startswith("index") and len(args) > 1 else ()
        masked = isinstance(indices, (list, tuple)) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices
        )  # indexing by a boolean mask: its size is read on the host
        if name in UNCAPTURABLE or masked:
            raise AssertionError(f"uncapturable operator in the decode step: aten.{name}")
        return func(*args, **(kwargs or {}))


@contextmanager
def no_host_syncs() -> Iterator[None]:
    """Any read of a tensor's values by the host, at the Python level or inside an operator,
    and any tensor made from host values, raises."""

    def refuse(name: str):
        def refused(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"host sync in the decode step: Tensor.{name}")

        return refused

    saved = {name: getattr(torch.Tensor, name) for name in SYNCS}
    try:
        for name in SYNCS:
            setattr(torch.Tensor, name, refuse(name))
        with RefuseUncapturable():
            yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_refusals_catch_what_they_should() -> None:
    for bad in (
        lambda: torch.tensor([1.0, 2.0]).sum().item(),
        lambda: torch.tensor([0, 3]),
        lambda: torch.arange(4)[torch.arange(4) > 1],
    ):
        with pytest.raises(AssertionError), no_host_syncs():
            bad()


def test_the_captured_step_makes_no_host_sync(loaded: LoadedModel) -> None:
    engine = build_engine(loaded, False)
    runner = engine.runner
    fill(engine, some_decodes(engine))
    buffers = runner.graphs.buffers.first(4)
    with torch.inference_mode(), no_host_syncs():
        logits = runner._decode_forward(buffers)
    assert logits.shape == (4, runner.vocab_size)
    assert torch.isfinite(logits).all()  # padding included


@pytest.mark.anyio
@pytest.mark.parametrize("enforce_eager", [True, False])
async def test_schema_constrained_decoding_on_the_engine_device(
    loaded: LoadedModel, enforce_eager: bool
) -> None:
    """The grammar masks run where the logits are (CUDA in the GPU check), beside graph steps
    and unconstrained rows: every constrained answer parses against its schema."""
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    structured = StructuredOutput.json_schema(schema)
    engine = build_engine(loaded, enforce_eager)
    engine.compile_grammar(structured)
    sampling = [
        SamplingParams(max_tokens=40, temperature=0, structured=structured),
        SamplingParams(max_tokens=40, temperature=0.9, seed=1, structured=structured),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    ]
    outputs = await generate(engine, prompts(loaded), sampling)
    for tokens in outputs[:2]:
        text = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
        assert json.loads(text)["answer"] in ("yes", "no")
    assert len(outputs[2]) == 12


@pytest.mark.parametrize("size", ["2b", "7b", "30b-a3b"])
def test_full_size_graph_step_on_fake_cuda(
    size: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen2-VL-2B/7B's and Qwen3-VL-30B-A3B's real dimensions on "cuda" tensors that hold no
    memory (FakeTensorMode): building the runner's graphs (the capture's warm-up forwards,
    every bucket) and a padded step run with no device, dtype or shape error. Only the
    capture call itself is left out."""
    import bench_gpu

    moe = size == "30b-a3b"
    tiny_model_dir = request.getfixturevalue("tiny3moe_model_dir" if moe else "tiny_model_dir")
    # an H200's (transformers picks the experts' grouped products by it)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    def warm_up_only(self: DecodeGraphs) -> None:
        for bucket in reversed(self.buckets):
            self.outputs[bucket] = self.forward(self.buffers.first(bucket))

    monkeypatch.setattr(DecodeGraphs, "capture", warm_up_only)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))
    # FakeTensorMode has no pinned memory: the inputs' copies go from ordinary memory here.
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    with FakeTensorMode(allow_non_fake_inputs=True):
        loaded = bench_gpu.random_model(size, "cuda", tiny_model_dir)
        runner = ModelRunner(loaded, 64, 16, 0, "reference", graph_batch_sizes=(8, 256))
        rows = [DecodeRow(5 + i, 20, (3 + i) * 16 + 4, [2, 3 + i], 21) for i in range(3)]
        with torch.inference_mode():
            logits = runner.graphs.run(rows)
    assert logits.device == torch.device("cuda", 0) and logits.dtype == torch.bfloat16
    assert logits.shape == (3, loaded.model.config.text_config.vocab_size)
    assert set(runner.graphs.outputs) == {1, 2, 4, 8}


def test_a_one_token_chunk_of_recomputed_outputs_is_not_a_graph_decode(
    loaded: LoadedModel,
) -> None:
    """After a preemption a sequence recomputes its outputs as prompt-like chunks; a 1-token
    chunk of them (a tight token budget) is not sampled, so the step is not a graph decode:
    the graph would return a row for it that no sampled sequence owns."""
    engine = build_engine(loaded, False)
    runner, blocks = engine.runner, engine.scheduler.blocks
    inputs = prompts(loaded)[0]
    decode = Sequence("d", inputs, SamplingParams(temperature=0), 8)
    recompute = Sequence("r", inputs, SamplingParams(temperature=0), 8)
    decode.output_token_ids = [5]
    recompute.output_token_ids = [5, 6, 7]
    for seq in (decode, recompute):
        assert blocks.allocate(seq)
    decode.num_computed_tokens = decode.num_tokens - 1
    recompute.num_computed_tokens = inputs.num_prompt_tokens  # 2 more outputs to recompute
    runner._positions(decode, 0, 1), runner._positions(recompute, 0, 1)  # the prompts' rope
    batch = ScheduledBatch()
    batch.add(decode, 1)
    batch.add(recompute, 1)
    assert batch.sampled == [decode]
    assert runner._graph_decodes(batch) is None
    with torch.inference_mode():
        logits = runner.forward(batch, batch.sampled)
    assert logits.shape[0] == 1
    for seq in (decode, recompute):
        blocks.free_blocks(seq)


def test_a_rows_table_is_named_by_a_key_no_later_sequence_shares(loaded: LoadedModel) -> None:
    """A graph row's table is rewritten only past what its key last wrote: a key of id(seq)
    and the request id could name a finished sequence's successor (its address reused, its
    id sent again) and leave the old table's blocks in the buffer."""
    engine = build_engine(loaded, False)
    runner, blocks = engine.runner, engine.scheduler.blocks
    inputs = prompts(loaded)[0]
    keys = []
    for _ in range(2):  # (the same request id, one after the other)
        seq = Sequence("same-id", inputs, SamplingParams(temperature=0), 8)
        seq.output_token_ids = [5]
        assert blocks.allocate(seq)
        seq.num_computed_tokens = seq.num_tokens - 1
        runner._positions(seq, 0, 1)
        batch = ScheduledBatch()
        batch.add(seq, 1)
        decodes = runner._graph_decodes(batch)
        assert decodes is not None
        keys.append(decodes[0][0].table_key)
        blocks.free_blocks(seq)
    assert keys[0] != keys[1]


def test_table_rows_are_rewritten_only_where_they_changed() -> None:
    graphs = DecodeGraphs(lambda buffers: buffers.token_ids, 4, 64, 99, 16, torch.device("cpu"))

    def rows_of(tables: list[list[int]], keys: list[object]) -> list[DecodeRow]:
        return [DecodeRow(1, 0, 0, t, len(t) * 16, k) for t, k in zip(tables, keys, strict=True)]

    def assert_buffer_holds(tables: list[list[int]]) -> None:
        for row, table in enumerate(tables):
            assert graphs.buffers.block_tables[row, : len(table)].tolist() == table

    tables = [[1, 2, 3], [4, 5]]
    graphs.run(rows_of(tables, ["a", "b"]))
    assert_buffer_holds(tables)
    tables[0].append(6)  # a new block: only it is written
    graphs.buffers.block_tables[0, :3] = -1  # (what a full rewrite would have undone)
    graphs.run(rows_of(tables, ["a", "b"]))
    assert graphs.buffers.block_tables[0, :4].tolist() == [-1, -1, -1, 6]
    other = [[7, 8, 9, 10], [4, 5]]  # another sequence (or new blocks) in row 0: all of it
    graphs.run(rows_of(other, ["c", "b"]))
    assert_buffer_holds(other)
    three = [[7, 8, 9, 10], [4, 5], [11]]  # a bucket of 4: row 3 is padding
    graphs.run(rows_of(three, ["c", "b", "d"]))
    assert_buffer_holds(three)
    assert graphs.table_rows[3] is None  # the padding overwrote it: rewritten when next used
    assert graphs.buffers.block_tables[3, 0] == 99  # the scratch block
