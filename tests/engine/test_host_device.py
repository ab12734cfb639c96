"""One engine step on a CUDA device never makes the host wait for the device.

Why: with async scheduling (engine.py `_step`) the host queues step t+1 (`runner.forward`,
then `runner.sample`) before it reads step t's tokens, so the host's Python work (scheduling,
building inputs, detokenizing) overlaps the device's compute. One wait inside either call
silently destroys that overlap: nothing fails, the server is just slower. Two kinds of wait:

- a host -> device copy from pageable memory, or a blocking one (`.to(device)` of a list or an
  ordinary CPU tensor): CUDA waits for everything already queued on the stream before it. Every
  step input goes through `transfer.to_device` (pinned memory, non_blocking=True) instead;
- a device -> host read: `.item()`, `.tolist()`, `.cpu()`, `bool(t)`, `int(t)`, or an operator
  whose output's size depends on the data (`nonzero`, a boolean-mask index, ...). The one
  intended read is the sampled tokens: `SampledTokens` copies them, non-blocking, into pinned
  memory, and the host reads them later (`.tokens()`, outside the step).

There is no GPU here: FakeTensorMode makes "cuda" tensors that hold no memory, and a
TorchDispatchMode (`HostWaitChecker`) sees every operator the step runs with its devices and
arguments. A realistic step mix (prompt chunks beside decodes, decodes whose input token is
still on the device, every sampling feature) runs through a real ModelRunner, eagerly and
through the CUDA-graph buffers.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import xgrammar
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from server.engine import runner as runner_module
from server.engine.block_manager import BlockManager
from server.engine.cuda_graph import DecodeGraphs
from server.engine.inputs import ModelInputs
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import Sequence
from server.engine.structured import GrammarCache, StructuredOutput

BLOCK_SIZE = 16
NUM_BLOCKS = 64
# Operators whose output's size (or a Python value) depends on a CUDA tensor's data: the host
# waits for the device to know it.
DATA_DEPENDENT = {
    "_local_scalar_dense",  # .item(), .tolist(), bool(), int(), float()
    "item",
    "nonzero",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "equal",
    "is_nonzero",
}
TORCH_DIR = str(Path(torch.__file__).parent)
SEEDED = torch.Generator()  # what a seeded row's generator is here


@pytest.fixture(autouse=True)
def async_scheduling() -> None:
    """Overrides the engine tests' sync/async parameters: no engine is built here (the test
    drives the runner the way the engine's async `_step` does), so one run is enough."""


class HostWait(AssertionError):
    """The step made the host wait for the device."""


def _is_cuda(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cuda"


def _pinned(tensor: torch.Tensor) -> bool:
    return getattr(tensor, "_pinned_in_test", False)


def _mark_pinned(tensor: torch.Tensor, device: object = None) -> torch.Tensor:
    """FakeTensorMode has no pinned memory: `pin_memory` returns the tensor itself, marked, so
    the checker can tell a pinned source (copied without a wait) from a pageable one. It
    refuses what the real one cannot pin: ATen's `_pin_memory` copies into pinned storage laid
    out with the tensor's own strides, which an expanded tensor (a stride 0) cannot be
    written to ("more than one element of the written-to tensor refers to a single memory
    location")."""
    layout = zip(tensor.shape, tensor.stride(), strict=True)
    if any(stride == 0 and size > 1 for size, stride in layout):
        raise RuntimeError("pin_memory of an expanded tensor: it cannot be copied into")
    tensor._pinned_in_test = True  # type: ignore[attr-defined]
    return tensor


def stack() -> str:
    """The Python stack from the test down, torch's own frames left out."""
    frames = traceback.extract_stack()
    first = next((i for i, f in enumerate(frames) if f.filename == __file__), 0)
    kept = [f for f in frames[first:-2] if not f.filename.startswith(TORCH_DIR)]
    return "".join(traceback.format_list(kept))


class HostWaitChecker(TorchDispatchMode):
    """Raises HostWait (and records it, should the caller swallow the exception) on any
    operator that makes the host wait for a CUDA device, with the Python stack that ran it.
    Counts the non-blocking host->device copies it let through (`uploads`) and the
    non-blocking device->host copies (`downloads`: the sampled tokens', and the prompt
    logprobs' in a step that scores some)."""

    def __init__(self) -> None:
        super().__init__()
        self.offences: list[str] = []
        self.uploads = 0
        self.downloads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        problem = self._problem(func, args, kwargs)
        if problem is not None:
            self.offences.append(f"{problem}: aten.{func.overloadpacket.__name__} at\n{stack()}")
            raise HostWait(self.offences[-1])
        if func.overloadpacket is torch.ops.aten.to:
            # As aten._to_copy (what it is made of): FakeTensorMode keeps that one off the
            # missing device, not aten.to, which reaches it whole under inference_mode.
            return func.decompose(*args, **kwargs)
        return func(*args, **kwargs)

    def _problem(self, func, args: tuple, kwargs: dict[str, Any]) -> str | None:
        name = func.overloadpacket.__name__
        # By name: `.to()` arrives as aten.to.* under inference_mode (the runner's), as
        # aten._to_copy outside it.
        named = {a.name: v for a, v in zip(func._schema.arguments, args, strict=False)} | kwargs
        non_blocking = bool(named.get("non_blocking", False))
        if name in ("_to_copy", "to"):
            source = named["self"]
            other = named.get("other")
            target = other.device if isinstance(other, torch.Tensor) else named.get("device")
            target = torch.device(target) if target is not None else source.device
            return self._copy(source, target, None, non_blocking)
        if name in ("copy_", "copy"):
            target = named["self"]
            return self._copy(named["src"], target.device, target, non_blocking)
        if not any(_is_cuda(a) for a in tree_leaves((args, kwargs))):
            return None
        if name in DATA_DEPENDENT:
            return "a device->host read of a CUDA tensor's values"
        indices = named.get("indices") if name.startswith("index") else None
        indices = indices if isinstance(indices, (list, tuple)) else ()
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            return "a boolean-mask index on CUDA (its size is read on the host)"
        return None

    def _copy(
        self,
        source: torch.Tensor,
        target: torch.device,
        out: torch.Tensor | None,
        non_blocking: bool,
    ) -> str | None:
        if source.device.type == "cpu" and target.type == "cuda":
            if not non_blocking:
                return "a blocking host->device copy (use transfer.to_device)"
            if not _pinned(source):
                return "a host->device copy from pageable memory (use transfer.to_device)"
            self.uploads += 1
        elif source.device.type == "cuda" and target.type == "cpu":
            # `_to_copy` with non_blocking allocates its output in pinned memory; `copy_`
            # into an ordinary tensor waits.
            if not non_blocking or (out is not None and not _pinned(out)):
                return "a blocking device->host copy"
            self.downloads += 1
        return None


class FakeEvent:
    """torch.cuda.Event without CUDA: what SampledTokens records after its copy."""

    def record(self, stream: object = None) -> None:
        pass

    def synchronize(self) -> None:
        raise HostWait("Event.synchronize in the step")

    def query(self) -> bool:
        raise HostWait("Event.query in the step")


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What a step under FakeTensorMode needs in place of a CUDA device: pinned memory (marked,
    see _mark_pinned), events and streams, the graphs' capture (the warm-up forwards only), a
    seeded row's CUDA generator (fake random operators take no generator: the row still draws
    in its own step of the per-row loop); and real memory where the host itself reads or
    writes values on the CPU (the prompt's rope positions, the grammars' bitmask)."""

    def warm_up_only(self: DecodeGraphs) -> None:
        for bucket in reversed(self.buckets):
            self.outputs[bucket] = self.forward(self.buffers.first(bucket))

    def no_sync(*args: object, **kwargs: object) -> None:
        raise HostWait("torch.cuda.synchronize in the step")

    exponential = torch.Tensor.exponential_

    def exponential_(self: torch.Tensor, *args: object, generator: object = None, **kw: Any):
        assert generator is None or generator is SEEDED
        return exponential(self, *args, **kw)

    prompt_positions = ModelRunner._prompt_positions

    def real_prompt_positions(self: ModelRunner, seq: Sequence) -> tuple[torch.Tensor, int]:
        with unset_fake_temporarily():  # host work on CPU tensors: values the host reads
            return prompt_positions(self, seq)

    allocate_bitmask = xgrammar.allocate_token_bitmask

    def host_bitmask(*args: Any, **kwargs: Any) -> torch.Tensor:
        with unset_fake_temporarily():  # filled on the host, by xgrammar's C++: real memory
            return allocate_bitmask(*args, **kwargs)

    allows_a_token = GrammarCache.allows_a_token

    def host_allows_a_token(self: GrammarCache, matcher: Any) -> bool:
        with unset_fake_temporarily():  # a compile's check, on the host: a value it reads
            return allows_a_token(self, matcher)

    monkeypatch.setattr(ModelRunner, "_prompt_positions", real_prompt_positions)
    monkeypatch.setattr(xgrammar, "allocate_token_bitmask", host_bitmask)
    monkeypatch.setattr(GrammarCache, "allows_a_token", host_allows_a_token)
    monkeypatch.setattr(DecodeGraphs, "capture", warm_up_only)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))
    # an H200's (transformers picks the experts' grouped products by it)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.Tensor, "pin_memory", _mark_pinned)
    monkeypatch.setattr(torch.Tensor, "exponential_", exponential_)
    monkeypatch.setattr(
        runner_module, "make_generator", lambda seed, device: None if seed is None else SEEDED
    )
    yield


def test_the_checker_catches_each_kind_of_wait(fake_cuda: None) -> None:
    """Every kind of wait raises, so the step test cannot pass by seeing nothing."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        check_the_checker()
        with torch.inference_mode():  # as the runner runs: some operators dispatch otherwise
            check_the_checker()


def check_the_checker() -> None:
    device = torch.device("cuda", 0)
    on_device = torch.zeros(4, device=device)
    waits = {
        "blocking upload": lambda: torch.arange(3).to(device),
        "pageable upload": lambda: torch.arange(3).to(device, non_blocking=True),
        "blocking copy_ upload": lambda: on_device.copy_(torch.ones(4)),
        "item": lambda: on_device.sum().item(),
        "tolist": lambda: on_device.tolist(),
        "bool": lambda: bool(on_device[0] > 0),
        "cpu": lambda: on_device.cpu(),
        "blocking copy_ download": lambda: torch.empty(4).copy_(on_device),
        "nonzero": lambda: on_device.nonzero(),
        "mask index": lambda: on_device[on_device > 0],
    }
    for kind, wait in waits.items():
        checker = HostWaitChecker()
        with pytest.raises(HostWait), checker:
            wait()
        assert len(checker.offences) == 1, kind
    with HostWaitChecker() as checker:  # what transfer.to_device and SampledTokens do
        torch.arange(3).pin_memory().to(device, non_blocking=True)
        on_device.to("cpu", non_blocking=True)
        on_device.view(2, 2)[on_device.long()[:2]]  # an index by ids on the device: no wait
    assert (checker.uploads, checker.downloads, checker.offences) == (1, 1, [])


def sequence(name: str, prompt: int, sampling: SamplingParams, vocab: int) -> Sequence:
    ids = torch.randint(100, vocab, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    seq = Sequence(name, ModelInputs({"input_ids": ids}, prompt, 0), sampling, 64)
    assert len(seq.inputs.token_ids) == prompt  # read now (cached): fake tensors have no values
    return seq


def mixed_sequences(vocab: int) -> list[Sequence]:
    """Every sampling feature, each on its own row; `long` is prefilled in two chunks."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    return [
        sequence("greedy", 12, SamplingParams(temperature=0, logprobs=2), vocab),
        sequence(
            "nucleus",
            9,
            SamplingParams(temperature=0.8, top_p=0.9, top_k=50, bad_word_ids=((101,), (7, 9))),
            vocab,
        ),
        sequence("top-k", 8, SamplingParams(temperature=1.1, top_k=20, seed=7), vocab),
        sequence(
            "penalties",
            7,
            SamplingParams(
                temperature=0.7,
                repetition_penalty=1.2,
                presence_penalty=0.5,
                frequency_penalty=0.3,
                min_tokens=4,  # EOS banned
            ),
            vocab,
        ),
        sequence(
            "structured",
            6,
            SamplingParams(temperature=0, structured=StructuredOutput.json_schema(schema)),
            vocab,
        ),
        sequence("long", 40, SamplingParams(temperature=0.6, prompt_logprobs=2), vocab),
    ]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("size", ["test", "test-moe"])
def test_a_step_never_waits_for_the_device(
    size: str, graphs: bool, fake_cuda: None, request: pytest.FixtureRequest
) -> None:
    """Steps as the engine's async `_step` runs them: forward (step t+1) is queued while step
    t's tokens are still on the device (`num_pending_tokens`; the runner hands them to the
    step's inputs on the device), then step t's tokens reach the host, then step t+1's
    sampling is queued. Neither `forward` nor `sample` may make the host wait; `sample` makes
    exactly one non-blocking copy to the host (the sampled tokens). A dense model and a
    mixture of experts (its rows routed to experts on the device)."""
    import bench_gpu

    tiny = request.getfixturevalue("tiny3moe_model_dir" if size == "test-moe" else "tiny_model_dir")
    seqs = mixed_sequences(bench_gpu.SIZES[size]["vocab_size"])  # host objects: real tensors
    with FakeTensorMode(allow_non_fake_inputs=True):
        loaded = bench_gpu.random_model(size, "cuda", tiny)
        sizes = (8, 256) if graphs else None
        runner = ModelRunner(loaded, NUM_BLOCKS, BLOCK_SIZE, 0, graph_batch_sizes=sizes)
        graph_steps = run_steps(runner, seqs)
    assert graph_steps == (3 if graphs else 0)  # the decode-only steps, when graphs are on


def run_steps(runner: ModelRunner, seqs: list[Sequence]) -> int:
    """Five steps of `seqs`; returns how many were graph steps."""
    scheduler = Scheduler(
        SchedulerConfig(8, 62, 100, 3600.0),  # 62 tokens: the long prompt takes two steps
        BlockManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=False),
    )
    for seq in seqs:
        scheduler.add(seq)
    graph_steps = 0
    in_flight: list[Sequence] = []  # sampled on the device, not read by the host yet
    for step in range(5):
        if step == 4:  # the last step as without async scheduling: every token read first
            in_flight = receive(in_flight)
        batch = scheduler.schedule()
        sampled = batch.sampled
        pending = [s for s in batch.seqs if s.num_pending_tokens]
        graph_steps += runner._graph_decodes(batch) is not None
        with HostWaitChecker() as checker:
            logits = runner.forward(batch, sampled)
        # one non-blocking download in steps that score prompt logprobs (read with the tokens)
        assert (checker.offences, checker.downloads) == ([], 1 if step < 2 else 0)
        assert checker.uploads > 0  # the step's inputs did go to the device, past the checker
        in_flight = receive(in_flight)  # the previous step's tokens, while this one computes
        scheduler.commit(batch)
        with HostWaitChecker() as checker:
            runner.sample(logits, sampled)
        assert (checker.offences, checker.downloads) == ([], 1)  # the sampled tokens
        for seq in sampled:
            seq.num_pending_tokens = 1
        in_flight = sampled
        # Prompt logprobs are stored when the engine reads the step's tokens (engine.py);
        # their values do not exist on fake tensors.
        assert (runner.take_prompt_logprobs() is not None) == (step < 2)
        chunks = [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]
        if step == 0:  # prompts (the long one's first chunk: it is not sampled)
            assert [n for _, n in chunks] == [12, 9, 8, 7, 6, 20] and len(sampled) == 5
        elif step == 1:  # decodes of tokens still on the device, beside the long prompt's end
            assert len(pending) == 5 and chunks[-1] == ("long", 20) and len(sampled) == 6
        elif step < 4:  # decodes only, every input token still on the device
            assert len(pending) == 6 == len(sampled)
        else:  # decodes only, every input token on the host
            assert not pending and len(sampled) == 6
    return graph_steps


def receive(in_flight: list[Sequence]) -> list[Sequence]:
    """engine.py `_receive`: the tokens reach the host (fake tensors hold no values: any id)."""
    for seq in in_flight:
        seq.num_pending_tokens = 0
        seq.output_token_ids.append(101 + len(seq.output_token_ids))
    return []
