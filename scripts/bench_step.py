"""Host cost of one whole decode step (scheduler + runner + sampler) where host work dominates.

    python scripts/bench_step.py                                  # this checkout
    VLM_CODE_ROOT=/path/to/old/checkout python scripts/bench_step.py   # the same, older code

A random-weight Qwen2-VL text model 28 layers deep (the depth of Qwen2-VL-2B/7B, so the step
launches as many kernels) but only 64 wide, with the real 151,936-token vocabulary: the
arithmetic is negligible and what is left is what the host does per step. For batch 1/16/64,
greedy and mixed sampling (bench_sampler.py's mix, one row under a json_schema grammar): the
median milliseconds of a decode step, its aten ops and its host transfers (tolist, item, ...;
each a queue-draining sync on a GPU). `--graphs` also runs the step through the decode-graph
buffers (on a CPU: the padded step the graph would replay, not a capture); `--decoders hf fused
compiled` runs HF's text model, the fused decoder (engine/decoder.py) and the fused decoder
through torch.compile side by side. "kernels" counts the ops that are not views: roughly what a
GPU launches (not counted for the compiled decoder: its layer's generated kernels are listed
under the table).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, os.environ.get("VLM_CODE_ROOT", str(ROOT)))

import torch  # noqa: E402
from bench_sampler import MIXED, TRANSFERS, _counting  # noqa: E402
from engine_step import engine_step  # noqa: E402
from op_count import CountOps  # noqa: E402

from server.engine.block_manager import BlockManager  # noqa: E402
from server.engine.inputs import ModelInputs  # noqa: E402
from server.engine.loader import LoadedModel  # noqa: E402
from server.engine.runner import ModelRunner  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from server.engine.sequence import Sequence  # noqa: E402
from server.engine.structured import StructuredOutput  # noqa: E402

VOCAB = 151936
PROMPT = 64
BLOCK_SIZE = 16
# A string long enough that the JSON never ends within the measured steps (older samplers
# could not run a finished grammar on).
SCHEMA = StructuredOutput.json_schema(
    {"type": "object", "properties": {"a": {"type": "string", "minLength": 64}}, "required": ["a"]}
)


def deep_narrow_model() -> LoadedModel:
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from server.engine.tiny import TinySpec, build_config, make_tiny_checkpoint

    tiny = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    processor = AutoProcessor.from_pretrained(tiny)
    spec = TinySpec(hidden_size=64, num_layers=28, num_heads=4, num_kv_heads=2)
    config = build_config(spec, processor.tokenizer)
    config.text_config.vocab_size = VOCAB
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return LoadedModel(
        model=model.eval(),
        processor=processor,
        path=tiny,
        family="qwen2-vl",
        device=torch.device("cpu"),
        dtype=torch.float32,
        context_length=4096,
        eos_token_ids=(config.text_config.eos_token_id,),
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
    )


def sampling_for(mix: str, batch: int) -> list[SamplingParams]:
    if mix == "greedy":
        return [SamplingParams(temperature=0, ignore_eos=True)] * batch
    params = [MIXED[i % len(MIXED)] for i in range(batch)]
    params = [SamplingParams(**{**vars(p), "ignore_eos": True}) for p in params]
    params[-1] = SamplingParams(temperature=0.7, structured=SCHEMA, ignore_eos=True)
    return params


def measure(
    loaded: LoadedModel, mix: str, batch: int, graphs: bool, decoder: str, steps: int = 12
) -> dict:
    per_seq = PROMPT + steps + 8
    num_blocks = batch * (-(-per_seq // BLOCK_SIZE) + 1)
    kwargs = {"graph_batch_sizes": (batch, per_seq)} if graphs else {}
    if decoder != "default":  # older checkouts have no fused decoder (and no such argument)
        kwargs["fused_decoder"] = decoder in ("fused", "compiled")
    if decoder == "compiled":
        kwargs["compile_decoder"] = True
    runner = ModelRunner(loaded, num_blocks, BLOCK_SIZE, 0, **kwargs)
    runner.grammars.compile(SCHEMA)
    scheduler = Scheduler(
        SchedulerConfig(batch, batch * PROMPT, 1 << 20, 3600.0),
        BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=False),
    )
    generator = torch.Generator().manual_seed(batch)
    for i, params in enumerate(sampling_for(mix, batch)):
        ids = torch.randint(0, 4096, (1, PROMPT), generator=generator)
        inputs = ModelInputs({"input_ids": ids}, PROMPT, 0)
        scheduler.add(Sequence(f"s{i}", inputs, params, per_seq))

    def step() -> None:
        engine_step(scheduler, runner)

    step()  # the prefill
    times = []
    for _ in range(steps - 1):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    calls: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in TRANSFERS}
    counter = CountOps()
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, _counting(original, name, calls))
        with counter:
            step()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    # Under a dispatch mode torch.compile steps aside: the compiled decoder's counted step ran
    # eagerly (its kernels: the line under the table).
    counted = decoder != "compiled"
    return {
        "ms": round(statistics.median(times[2:]) * 1000, 2),
        "ops": counter.count if counted else "-",
        "kernels": counter.kernels if counted else "-",
        "transfers": sum(calls.values()),
    }


def compiled_layer_kernels(loaded: LoadedModel, batch: int = 4) -> list[str]:
    """The kernels one compiled layer of the fused decoder runs (besides its KV writes and
    attention), read from Inductor's generated code for this device: its fused kernels and the
    library calls (matrix products)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from server.engine import decoder as fused

    built = fused.FusedDecoder.build(loaded.model)
    layer = built.layers[0]
    hidden = torch.randn(batch, layer.qkv.shape[1], dtype=layer.qkv.dtype)
    cos, sin = built._rope(torch.arange(batch), hidden.dtype)
    attended = torch.randn(batch, built.num_heads, built.head_dim, dtype=hidden.dtype)
    calls = [
        (fused.attention_inputs, (hidden, layer, cos, sin, built.num_heads, built.num_kv_heads)),
        (fused.attention_output_and_mlp, (hidden, attended, layer)),
    ]
    kernels = []
    for function, args in calls:
        for tensor in (hidden, cos, sin, attended):  # as the decoder's warm-up compiles it
            torch._dynamo.mark_dynamic(tensor, 0)
        with torch.inference_mode():
            _, codes = run_and_get_code(torch.compile(function), *args)
        call = "\n".join(codes).split("def call(", 1)[1]
        kernels += re.findall(r"^\s+(\w+_fused_\w+|extern_kernels\.\w+|aten\.\w+)", call, re.M)
    return kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", action="store_true", help="also the decode-graph step")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--decoders", nargs="+", default=["default"], choices=["default", "hf", "fused", "compiled"]
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # host cost, not intra-op parallelism
    loaded = deep_narrow_model()
    print(f"code: {Path(sys.modules['server'].__file__).parents[1]}")
    print(
        "| mix | batch | step | decoder | ms per step | aten ops per step | kernels per step "
        "| host transfers per step |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mix in ("greedy", "mixed"):
        for batch in args.batches:
            for graphs in (False, True) if args.graphs else (False,):
                for decoder in args.decoders:
                    row = measure(loaded, mix, batch, graphs, decoder)
                    name = "graph buffers" if graphs else "eager"
                    print(
                        f"| {mix} | {batch} | {name} | {decoder} | {row['ms']} | {row['ops']} "
                        f"| {row['kernels']} | {row['transfers']} |",
                        flush=True,
                    )
    if "compiled" in args.decoders:
        kernels = compiled_layer_kernels(loaded)
        print(
            f"\na compiled layer (this device's generated code): {len(kernels)} kernels: ", end=""
        )
        print(", ".join(kernels), "+ its KV writes and attention")


if __name__ == "__main__":
    main()
