"""The GPU half of scripts/gpu_check.sh: full-size random-weight Qwen2-VL-2B / -7B (public
dimensions, built in memory: nothing is downloaded) through the engine's own scheduler and
runner, against the HBM roofline.

    python scripts/bench_gpu.py --device cuda                 # what gpu_check.sh runs
    python scripts/bench_gpu.py --device cpu --sizes test     # the CPU smoke run CI does

Prints one markdown table (and --json): for each size and attention backend, decode
tokens/s and step time at each batch size against the roofline (the bytes one decode step must
read, text weights + every sequence's KV, over the measured device-to-device copy bandwidth);
the 2B model's decode step through the whole engine loop with and without async scheduling;
the Triton kernel's largest difference from the reference at both GQA shapes; the memory
profile's KV budget against the peak memory of a real run; the capacity and chunked-prefill
benchmarks of bench_engine.py on the 2B model.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from engine_step import engine_step, run_requests  # noqa: E402

from server.config import Settings  # noqa: E402
from server.engine.block_manager import BlockManager  # noqa: E402
from server.engine.inputs import InputBuilder, ModelInputs  # noqa: E402
from server.engine.kv_cache import kv_cache_shape  # noqa: E402
from server.engine.loader import LoadedModel  # noqa: E402
from server.engine.runner import ModelRunner  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from server.engine.sequence import Sequence  # noqa: E402
from server.engine.tiny import TinySpec  # noqa: E402

T = TypeVar("T")

# Qwen2-VL-2B/7B-Instruct's and Qwen3-VL-30B-A3B-Instruct's published dimensions
# (config.json); "test" and "test-moe" are for CPU smoke runs.
SIZES = {
    "2b": dict(
        hidden_size=1536,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        intermediate_size=8960,
        vision_depth=32,
        vision_embed_dim=1280,
        vision_heads=16,
        vocab_size=151936,
        context=32768,
    ),
    "7b": dict(
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        intermediate_size=18944,
        vision_depth=32,
        vision_embed_dim=1280,
        vision_heads=16,
        vocab_size=152064,
        context=32768,
    ),
    "test": dict(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        vision_depth=1,
        vision_embed_dim=32,
        vision_heads=2,
        vocab_size=4096,
        context=4096,
    ),
    # A mixture of experts: each token's MLP is 8 of 128 experts of 768 (3B of 31B active).
    "30b-a3b": dict(
        family="qwen3-vl-moe",
        hidden_size=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=6144,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        vision_depth=27,
        vision_embed_dim=1152,
        vision_heads=16,
        deepstack_visual_indexes=[8, 16, 24],
        vocab_size=151936,
        context=32768,
    ),
    "test-moe": dict(
        family="qwen3-vl-moe",
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=256,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        vision_depth=1,
        vision_embed_dim=32,
        vision_heads=2,
        vocab_size=4096,
        context=4096,
    ),
}
# Text-config values a size sets beyond TinySpec's fields.
TEXT_CONFIG_KEYS = ("vocab_size", "head_dim", "num_experts", "num_experts_per_tok")
TEXT_CONFIG_KEYS += ("moe_intermediate_size",)
BLOCK_SIZE = 16
CONTEXT_PER_SEQUENCE = 512  # prompt tokens each decoding sequence has in its KV cache


def random_model(size: str, device: str, tiny: Path | None = None) -> LoadedModel:
    """A full-size random-weight model in memory, with the tokenizer and processor of a tiny
    checkpoint of its family (same special tokens, patch and merge sizes): `tiny`, or one
    built now."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from server.engine import tiny as tiny_checkpoint

    dims = SIZES[size]
    family = dims.get("family", "qwen2-vl")
    spec_fields = {k: v for k, v in dims.items() if k in TinySpec.__dataclass_fields__}
    spec = TinySpec(max_position_embeddings=dims["context"], **spec_fields)
    tiny = tiny or tiny_checkpoint.make_tiny_checkpoint(
        Path(tempfile.mkdtemp()) / "tiny", TinySpec(family=family)
    )
    processor = AutoProcessor.from_pretrained(tiny)
    config = tiny_checkpoint.build_config(spec, processor.tokenizer)
    for key in TEXT_CONFIG_KEYS:
        if key in dims:
            setattr(config.text_config, key, dims[key])
    if "deepstack_visual_indexes" in dims:
        config.vision_config.deepstack_visual_indexes = dims["deepstack_visual_indexes"]
    head_dim = dims.get("head_dim", dims["hidden_size"] // dims["num_heads"])
    sections = tiny_checkpoint.mrope_section
    if family.startswith("qwen3-vl"):
        sections = tiny_checkpoint.qwen3_mrope_section
    config.text_config.rope_parameters["mrope_section"] = sections(head_dim)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    model.eval()
    return LoadedModel(
        model=model,
        processor=processor,
        path=tiny,
        family=family,
        device=torch.device(device),
        dtype=dtype,
        context_length=dims["context"],
        eos_token_ids=(config.text_config.eos_token_id,),
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, num_bytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy (bytes read + bytes written)."""
    if device.type != "cuda":
        num_bytes = 256 << 20
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    synchronize(device)
    return 2 * num_bytes * 10 / (time.perf_counter() - started)


def text_weight_bytes(loaded: LoadedModel) -> int:
    """What one decode step reads of the weights: the text layers, final norm and lm_head
    (embedding rows and the vision tower are not read while decoding)."""
    language = loaded.model.model.language_model
    total = sum(p.numel() * p.element_size() for p in language.parameters())
    embed = language.embed_tokens.weight
    lm_head = loaded.model.lm_head.weight
    return total - embed.numel() * embed.element_size() + lm_head.numel() * lm_head.element_size()


def step_weight_bytes(loaded: LoadedModel, batch: int) -> int:
    """What one decode step of `batch` rows reads of the weights: text_weight_bytes, less the
    experts no row is routed to. With routing spread evenly (random weights), a row misses a
    given expert with probability 1 - k/E (k of E experts a token), so a step reads a share
    1 - (1 - k/E)^batch of them: 8 of 128 at batch 1, 112 at batch 32."""
    total = text_weight_bytes(loaded)
    config = loaded.model.config.text_config
    if not getattr(config, "num_experts", 0):
        return total
    touched = 1 - (1 - config.num_experts_per_tok / config.num_experts) ** batch
    language = loaded.model.model.language_model
    experts = [p for name, p in language.named_parameters() if ".mlp.experts." in name]
    expert_bytes = sum(p.numel() * p.element_size() for p in experts)
    return round(total - expert_bytes * (1 - touched))


def decode_step_time(
    loaded: LoadedModel, batch: int, backend: str, graphs: bool, decoder: str, steps: int = 20
) -> tuple[float, list[list[int]]]:
    """Median seconds of one engine decode step (scheduler + runner + sampling, one host sync)
    with `batch` sequences of CONTEXT_PER_SEQUENCE cached tokens, and the greedy tokens.
    decoder: "hf", "fused" or "compiled" (the fused decoder through torch.compile)."""
    per_seq = CONTEXT_PER_SEQUENCE + steps + 8
    num_blocks = batch * (-(-per_seq // BLOCK_SIZE) + 1)
    sizes = (batch, per_seq) if graphs else None  # the largest bucket is the batch itself
    runner = ModelRunner(
        loaded,
        num_blocks,
        BLOCK_SIZE,
        0,
        backend,
        graph_batch_sizes=sizes,
        fused_decoder=decoder != "hf",
        compile_decoder=decoder == "compiled",
    )
    scheduler = Scheduler(
        SchedulerConfig(batch, batch * CONTEXT_PER_SEQUENCE, 1 << 20, 3600.0),
        BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=False),
    )
    vocab = loaded.model.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(batch)
    seqs = []
    for i in range(batch):
        ids = torch.randint(0, min(vocab, 4096), (1, CONTEXT_PER_SEQUENCE), generator=generator)
        inputs = ModelInputs({"input_ids": ids}, CONTEXT_PER_SEQUENCE, 0)
        seqs.append(
            Sequence(f"s{i}", inputs, SamplingParams(temperature=0, ignore_eos=True), per_seq)
        )
        scheduler.add(seqs[-1])

    def step() -> None:
        engine_step(scheduler, runner)

    step()  # the prefill
    times = []
    for _ in range(steps):
        synchronize(loaded.device)
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    if graphs and loaded.device.type == "cuda":
        assert runner.graphs.num_replays >= steps, "the decode steps did not replay graphs"
    return statistics.median(times[3:]), [seq.output_token_ids for seq in seqs]


# (attention, decoder, graphs): each decoder eager, then as graphs (tokens compared with the
# eager run just before). HF = HF's text model, fused = decoder.FusedDecoder. On CUDA, graphs
# only over the Triton kernel (over the reference attention they gather the whole table width:
# a warned setup, not worth the time); HF's decoder only at batch 1 and 32 (the goal's batch).
CUDA_MODES = [
    ("reference", "hf", False),
    ("reference", "fused", False),
    ("triton", "hf", False),
    ("triton", "hf", True),
    ("triton", "fused", False),
    ("triton", "fused", True),
]
CPU_MODES = [
    ("reference", "hf", False),
    ("reference", "fused", False),
    ("reference", "fused", True),
]
HF_BATCHES = (1, 32)
# --compile-decoder, measured last (compiling takes a while; a timeout loses only these rows):
# graphs at the goal's batch, tokens compared with the fused decoder's graphs there.
COMPILED_BATCHES = (1, 32)
FUSED_GRAPH_TOKENS: dict[tuple[str, int], list[list[int]]] = {}


def decode_row(
    loaded: LoadedModel, size: str, batch: int, mode: tuple[str, str, bool], bandwidth: float
) -> tuple[dict, list[list[int]]]:
    backend, decoder, graphs = mode
    seconds, tokens = decode_step_time(loaded, batch, backend, graphs, decoder)
    gc.collect()  # that step's runner and graphs: a reference cycle
    weights = step_weight_bytes(loaded, batch)
    kv_per_token = kv_cache_shape(loaded.model).bytes_per_token(loaded.dtype)
    roofline = (weights + batch * CONTEXT_PER_SEQUENCE * kv_per_token) / bandwidth
    row = {
        "size": size,
        "backend": backend,
        "decoder": decoder,
        "step": "graphs" if graphs else "eager",
        "batch": batch,
        "step_ms": round(seconds * 1000, 2),
        "tok_s": round(batch / seconds, 1),
        "roofline_ms": round(roofline * 1000, 2),
        "of_roofline": f"{roofline / seconds:.0%}",
        "same_tokens": "",
    }
    return row, tokens


def decode_rows(
    loaded: LoadedModel, size: str, batches: list[int], bandwidth: float, errors: list[str]
) -> list:
    cuda = loaded.device.type == "cuda"
    rows = []
    for batch in batches:
        eager_tokens = None
        for mode in CUDA_MODES if cuda else CPU_MODES:
            backend, decoder, graphs = mode
            if cuda and decoder == "hf" and batch not in HF_BATCHES:
                continue
            part = f"{size} batch {batch} {backend}/{decoder}/{'graphs' if graphs else 'eager'}"
            got = attempt(errors, part, decode_row, loaded, size, batch, mode, bandwidth)
            if got is None:  # (a graph capture that failed: the next mode still runs)
                free(loaded.device)
                eager_tokens = None
                continue
            row, tokens = got
            if graphs and eager_tokens is not None:  # greedy tokens of the graph replay ==
                row["same_tokens"] = tokens == eager_tokens  # the same decoder's eager step's
            if graphs and decoder == "fused":
                FUSED_GRAPH_TOKENS[(size, batch)] = tokens
            eager_tokens = tokens
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def compiled_rows(loaded: LoadedModel, size: str, batches: list[int], bandwidth: float) -> list:
    """The compiled fused decoder as graphs (as replay on the CPU's padded buffers): its rows'
    greedy tokens against the fused decoder's graphs (in bf16 a fused kernel rounds once where
    HF's ops round each time, so a row can part ways with it: the share of equal rows)."""
    backend = "triton" if loaded.device.type == "cuda" else "reference"
    rows = []
    for batch in (b for b in batches if b in COMPILED_BATCHES):
        row, tokens = decode_row(loaded, size, batch, (backend, "compiled", True), bandwidth)
        fused = FUSED_GRAPH_TOKENS.get((size, batch))
        if fused is not None:
            same = sum(a == b for a, b in zip(tokens, fused, strict=True))
            row["same_tokens"] = f"{same}/{len(tokens)} rows = fused"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def random_prompts(loaded: LoadedModel, num: int, length: int) -> list[torch.Tensor]:
    """`num` prompts of `length` random token ids, the same ones every run."""
    vocab = min(loaded.model.config.text_config.vocab_size, 4096)
    return [
        torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(i))
        for i in range(num)
    ]


def memory_row(loaded: LoadedModel) -> dict:
    """The profiled KV budget, then the peak of a real run: 64 requests of 2k-token prompts
    (text: the encoder cache's share of the budget stays empty)."""
    from server.engine.engine import AsyncEngine

    device = loaded.device
    config = Settings(model="bench", max_num_batched_tokens=8192).engine_config()
    engine = AsyncEngine.build(loaded, config)
    blocks = engine.scheduler.blocks
    kv_bytes = (
        blocks.num_blocks * BLOCK_SIZE * kv_cache_shape(loaded.model).bytes_per_token(loaded.dtype)
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    sampling = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    asyncio.run(run_requests(engine, random_prompts(loaded, 64, 2048), [sampling] * 64))
    row = {"kv_cache_gib": round(kv_bytes / 2**30, 2), "blocks": blocks.num_blocks}
    if device.type == "cuda":
        total = torch.cuda.mem_get_info(device)[1]
        peak = torch.cuda.max_memory_allocated(device)
        row.update(
            peak_gib=round(peak / 2**30, 2),
            total_gib=round(total / 2**30, 2),
            peak_of_total=f"{peak / total:.1%}",
            limit=f"{config.gpu_memory_utilization:.0%}",
            # kept out of the KV budget, unused by these text prompts: the peak stays under
            # the limit by about this much
            encoder_cache_gib=config.encoder_cache_memory_gib,
        )
    return row


def loop_rows(loaded: LoadedModel, size: str, batches: list[int]) -> list:
    """Decode through the whole engine loop (thread, scheduler, runner, detokenizer) with and
    without async scheduling, side by side: ms per decode step once every sequence has its
    first token, and whether the greedy tokens are the same. On CUDA with the Triton kernel as
    graphs (what async scheduling is for: a step short enough for the host to show)."""
    from server.engine.engine import AsyncEngine

    cuda = loaded.device.type == "cuda"
    max_tokens, prompt_len = 64, 256
    rows = []
    for batch in batches:
        sync_tokens = None
        for async_scheduling in (False, True):
            settings = Settings(
                model="bench",
                max_model_len=prompt_len + max_tokens + 16,
                max_num_seqs=batch,
                kv_cache_memory=1.0,  # every sequence up to batch 100 (2B: 37k tokens); no profile
                attention_backend="triton" if cuda else "reference",
                enforce_eager=not cuda,
                async_scheduling=async_scheduling,
            )
            engine = AsyncEngine.build(loaded, settings.engine_config())

            prompts = random_prompts(loaded, batch, prompt_len)
            sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            seqs = asyncio.run(run_requests(engine, prompts, [sampling] * batch))
            started = max(s.first_token_time or 0.0 for s in seqs)
            ended = max(s.finish_time or 0.0 for s in seqs)
            tokens = [s.output_token_ids for s in seqs]
            rows.append(
                {
                    "size": size,
                    "batch": batch,
                    "async": async_scheduling,
                    "step_ms": round((ended - started) / (max_tokens - 1) * 1000, 2),
                    "same_tokens": "" if sync_tokens is None else tokens == sync_tokens,
                }
            )
            sync_tokens = tokens
            print(json.dumps(rows[-1]), flush=True)
            del engine
            if cuda:
                gc.collect()  # the runner and its decode graphs refer to each other
                torch.cuda.empty_cache()
    return rows


def engine_rows(loaded: LoadedModel) -> dict:
    import bench_engine

    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)

    async def run() -> dict:
        return {
            "capacity": await bench_engine.capacity(loaded, builder),
            "chunked": [await bench_engine.chunked(loaded, builder, b) for b in (16384, 2048)],
        }

    return asyncio.run(run())


def kernel_rows(device: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.engine.attention_cases import max_kernel_error

    if device.startswith("cuda"):
        return {
            str(dtype): max_kernel_error(device, dtype) for dtype in (torch.bfloat16, torch.float16)
        }
    return {}


def table(results: dict) -> str:
    lines = [
        "| model | attention | decoder | step | batch | step ms | tok/s | roofline ms "
        "| of roofline | tokens = eager |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["decode"]:
        lines.append(
            f"| {row['size']} | {row['backend']} | {row['decoder']} | {row['step']} "
            f"| {row['batch']} | "
            f"{row['step_ms']} | {row['tok_s']} | {row['roofline_ms']} | {row['of_roofline']} "
            f"| {row['same_tokens']} |"
        )
    lines += ["", "| model | batch | async scheduling | engine loop ms/step | tokens = sync |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for row in results.get("loop", []):
        lines.append(
            f"| {row['size']} | {row['batch']} | {row['async']} | {row['step_ms']} "
            f"| {row['same_tokens']} |"
        )
    lines.append("")
    lines.append(f"copy bandwidth: {results['bandwidth_gb_s']} GB/s")
    lines.append(f"Triton decode kernel, max |kernel - reference|: {results.get('kernel')}")
    lines.append(f"memory: {results.get('memory')}")
    for error in results.get("errors", []):
        lines.append(f"FAILED: {error}")
    lines.append(f"engine (2B): {json.dumps(results.get('engine'))}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", nargs="+", default=["2b", "7b"], choices=list(SIZES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--skip-engine", action="store_true", help="no capacity/chunked runs")
    parser.add_argument(
        "--loop-batches", type=int, nargs="+", default=[32], help="engine loop, async vs sync"
    )
    parser.add_argument(
        "--skip-compiled", action="store_true", help="no --compile-decoder rows (they compile)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    results: dict = {"bandwidth_gb_s": round(copy_bandwidth(device) / 1e9, 1), "decode": []}
    results["errors"] = []
    try:
        measure(results, args, device)
    except KeyboardInterrupt:  # gpu_check's time limit (SIGINT): keep what was measured
        results["interrupted"] = True
        print("bench_gpu: interrupted, the table holds what was measured", flush=True)
    except Exception as exc:  # (outside every part: a bug here) the table still comes out
        traceback.print_exc()
        results["errors"].append(f"bench: {exc!r}"[:500])
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if results["errors"]:
        sys.exit(1)


def attempt(errors: list[str], part: str, run: Callable[..., T], *args: Any) -> T | None:
    """One part of the benchmark. A path that never ran on this GPU may fail (a graph capture,
    the Triton kernel, an out-of-memory): its error is recorded and the other parts still run,
    so one call on the scarce GPU brings back every row it can."""
    try:
        return run(*args)
    except Exception as exc:
        traceback.print_exc()
        errors.append(f"{part}: {exc!r}"[:500])
        return None


def measure(results: dict, args: argparse.Namespace, device: torch.device) -> None:
    errors = results["errors"]
    results["kernel"] = attempt(errors, "Triton kernel", kernel_rows, args.device)
    bandwidth = results["bandwidth_gb_s"] * 1e9
    for size in args.sizes:
        loaded = attempt(errors, f"{size} build", random_model, size, args.device)
        if loaded is None:
            continue
        results["decode"] += decode_rows(loaded, size, args.batches, bandwidth, errors)
        if size in ("2b", "test"):
            loop = attempt(errors, f"{size} loop", loop_rows, loaded, size, args.loop_batches)
            results["loop"] = loop or []
            free(device)
        if size == args.sizes[0]:  # early: a time limit must not cost the profile check
            results["memory"] = attempt(errors, f"{size} memory", memory_row, loaded)
            free(device)  # (its engine's cache, before the next engine is built)
        if size in ("2b", "test") and not args.skip_engine:
            results["engine"] = attempt(errors, f"{size} engine", engine_rows, loaded)
        del loaded
        free(device)
    # Last, each model built again (the same seed: the same weights, so the fused decoder's
    # tokens compare): compiling takes a while, and a time limit then costs only these rows.
    for size in [] if args.skip_compiled else args.sizes:
        loaded = attempt(errors, f"{size} build", random_model, size, args.device)
        if loaded is not None:
            part = f"{size} --compile-decoder"
            rows = attempt(errors, part, compiled_rows, loaded, size, args.batches, bandwidth)
            results["decode"] += rows or []
            del loaded
        free(device)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
