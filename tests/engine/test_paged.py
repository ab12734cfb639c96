"""The paged engine against HF's own generate (both families, greedy, token for token): with a
16-token step budget (every prompt prefilled in chunks, media split across chunks), with
prefix-cache and encoder-cache hits, and after preemption and recomputation."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.inputs import InputBuilder, ModelInputs, VideoFrames
from server.engine.kv_cache import kv_cache_shape
from server.engine.loader import LoadedModel
from server.engine.sampling import SamplingParams
from server.media.image import fit_to_budget
from tests.helpers import make_image

pytestmark = pytest.mark.anyio
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(make_image(width, height, seed=seed)))


@pytest.fixture(scope="module")
def prompts(loaded: LoadedModel) -> dict[str, ModelInputs]:
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)

    def user(*parts: dict) -> list[dict]:
        return [{"role": "user", "content": list(parts)}]

    img, vid = {"type": "image"}, {"type": "video"}

    def text(t: str) -> dict:
        return {"type": "text", "text": t}

    def sized(picture: Image.Image) -> Image.Image:  # as the server sizes them
        return fit_to_budget(
            picture, 1 << 30, side=builder.token_side, min_pixels=builder.min_image_pixels
        )

    frames = np.stack([np.asarray(image(112, 84, seed=i)) for i in range(4)])
    return {
        "text": builder.build(user(text("Tell me a story about paged memory.")), []),
        "image": builder.build(user(img, text("What is this?")), [sized(image(96, 64))]),
        "images": builder.build(
            user(text("Compare"), img, img, text("please.")),
            [sized(image(200, 150, 1)), sized(image(56, 112, 2))],
        ),
        "video": builder.build(
            user(vid, text("What happens?")), [], [VideoFrames(frames, (0.5, 1.5, 2.5, 3.5), 4.0)]
        ),
    }


def reference(loaded: LoadedModel, prompt: ModelInputs, num_tokens: int = 12) -> list[int]:
    with torch.inference_mode():
        tensors = {name: t.to(loaded.device) for name, t in prompt.tensors.items()}
        # No end-of-text: the EOS token may be chosen and decoding goes on past it, as with
        # the engine's ignore_eos (min_new_tokens would ban it instead).
        out = loaded.model.generate(
            **tensors, max_new_tokens=num_tokens, eos_token_id=[], do_sample=False
        )
    return out[0, prompt.num_prompt_tokens :].tolist()


@pytest.fixture(scope="module")
def expected(loaded: LoadedModel, prompts: dict[str, ModelInputs]) -> dict[str, list[int]]:
    return {name: reference(loaded, prompt) for name, prompt in prompts.items()}


def make_engine(loaded: LoadedModel, **settings: object) -> AsyncEngine:
    values = {"model": "unused", "max_model_len": 2048, "max_num_batched_tokens": 16, **settings}
    return AsyncEngine.build(loaded, Settings(**values).engine_config())


async def generate(engine: AsyncEngine, requests: dict[str, ModelInputs]) -> dict[str, list[int]]:
    seqs = {name: engine.add_request(name, prompt, GREEDY) for name, prompt in requests.items()}

    async def drain(seq) -> list[int]:
        async for _ in engine.stream(seq):
            pass
        return list(seq.output_token_ids)

    outputs = await asyncio.gather(*(drain(s) for s in seqs.values()))
    return dict(zip(seqs, outputs, strict=True))


async def test_chunked_prefill_matches_hf_alone_and_mixed(loaded, prompts, expected) -> None:
    assert all(p.num_prompt_tokens > 16 for p in prompts.values())  # every prompt is chunked
    engine = make_engine(loaded)
    engine.start()
    alone = {}
    for name, prompt in prompts.items():
        alone.update(await generate(engine, {name: prompt}))
    mixed = await generate(engine, {f"{name}-mixed": p for name, p in prompts.items()})
    await engine.stop()
    assert alone == expected
    assert {name.removesuffix("-mixed"): out for name, out in mixed.items()} == expected


async def test_prefix_and_encoder_cache_hits_give_the_same_answer(
    loaded, prompts, expected
) -> None:
    engine = make_engine(loaded, max_num_batched_tokens=512)
    engine.start()
    first = engine.add_request("first", prompts["images"], GREEDY)
    async for _ in engine.stream(first):
        pass
    vision_calls = engine.runner.media.cache.num_misses
    again = engine.add_request("again", prompts["images"], GREEDY)
    async for _ in engine.stream(again):
        pass
    await engine.stop()
    assert first.num_cached_tokens == 0
    block = engine.scheduler.blocks.block_size
    assert again.num_cached_tokens == (prompts["images"].num_prompt_tokens - 1) // block * block
    assert first.output_token_ids == again.output_token_ids == expected["images"]
    assert engine.runner.media.cache.num_misses == vision_calls


async def test_same_size_images_share_only_the_text_before_them(loaded) -> None:
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    cat = builder.build(messages, [image(96, 64, seed=1)])
    dog = builder.build(messages, [image(96, 64, seed=2)])
    assert cat.token_ids == dog.token_ids  # identical placeholder runs
    engine = make_engine(loaded, max_num_batched_tokens=512, block_size=4)
    engine.start()
    outputs = {}
    for name, prompt in (("cat", cat), ("dog", dog)):
        outputs.update(await generate(engine, {name: prompt}))
    await engine.stop()
    first_image_token = cat.media[0].start
    assert engine.scheduler.blocks.num_hit_tokens <= first_image_token
    assert outputs["cat"] == reference(loaded, cat) and outputs["dog"] == reference(loaded, dog)


@pytest.mark.parametrize("enforce_eager", [True, False])  # and through the decode graphs
async def test_preemption_recomputes_to_the_same_tokens(
    loaded, prompts, enforce_eager, caplog
) -> None:
    """A KV cache that holds the prompts but not what they generate: the newest sequences are
    preempted, recomputed (prompt + what they had generated) and finish as if alone (a graph
    step's table rows follow each sequence's new blocks). --log-level debug says so."""
    caplog.set_level("DEBUG", logger="server.engine.engine")
    requests = {name: prompts[name] for name in ("text", "image", "images")}
    sampling = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    blocks_for_prompts = sum(-(-p.num_prompt_tokens // 16) for p in requests.values())
    bytes_per_token = kv_cache_shape(loaded.model).bytes_per_token(loaded.dtype)
    engine = make_engine(
        loaded,
        max_num_batched_tokens=4096,
        kv_cache_memory=(blocks_for_prompts + 1) * 16 * bytes_per_token / 2**30,
        max_model_len=0,  # the model's: the context is then what the cache holds
        enable_prefix_caching=False,
        enforce_eager=enforce_eager,
    )
    engine.start()
    seqs = [engine.add_request(name, p, sampling) for name, p in requests.items()]
    for seq in seqs:
        async for _ in engine.stream(seq):
            pass
    await engine.stop()
    assert engine.scheduler.num_preemptions > 0
    for seq, prompt in zip(seqs, requests.values(), strict=True):
        assert seq.output_token_ids == reference(loaded, prompt, 40), seq.request_id
    lines = [r.getMessage() for r in caplog.records]
    admitted = [line for line in lines if line.startswith("admitted: ")]
    assert len(admitted) == 3, lines  # (once each: not again when taken back after preemption)
    assert f"admitted: {requests['text'].num_prompt_tokens} prompt tokens (0 from" in admitted[0]
    preempted = [int(line.split()[0]) for line in lines if "preempted for KV cache room" in line]
    assert sum(preempted) == engine.scheduler.num_preemptions


async def test_a_prompt_the_cache_cannot_hold_alone_is_refused_at_submit(loaded, prompts) -> None:
    """A --max-model-len the KV cache cannot hold is refused at start; without one the context
    served is what the cache holds, and a prompt past it a 400."""
    from server.exceptions import InvalidRequest, ModelLoadError

    bytes_per_token = kv_cache_shape(loaded.model).bytes_per_token(loaded.dtype)
    num_blocks = -(-(prompts["text"].num_prompt_tokens + GREEDY.max_tokens) // 16)
    assert prompts["images"].num_prompt_tokens > num_blocks * 16
    budget = num_blocks * 16 * bytes_per_token / 2**30
    with pytest.raises(ModelLoadError, match=f"lower --max-model-len to {num_blocks * 16} or"):
        make_engine(loaded, kv_cache_memory=budget)  # asked for 2048 tokens: refused, as vLLM
    engine = make_engine(loaded, kv_cache_memory=budget, max_model_len=0)
    engine.start()
    assert engine.max_seq_len == num_blocks * 16  # the model's context: what the cache holds
    with pytest.raises(InvalidRequest) as refused:
        engine.add_request("big", prompts["images"], GREEDY)
    fits = await generate(engine, {"text": prompts["text"]})
    await engine.stop()
    assert refused.value.code == "context_length_exceeded"
    assert len(fits["text"]) == GREEDY.max_tokens


def test_worst_case_step_runs_on_any_device(loaded) -> None:
    """The memory profile's step (measured only on CUDA) goes through the real runner path."""
    from server.engine.profile import _max_image_tokens, worst_case_step

    config = Settings(model="unused", max_num_batched_tokens=64).engine_config()
    assert worst_case_step(loaded, config, max_seq_len=300) > 0  # a chunk over a long context
    assert worst_case_step(loaded, config, max_seq_len=40) > 0  # a prompt shorter than a chunk
    assert _max_image_tokens(loaded) >= 1024


def test_the_measured_kv_budget_leaves_room_for_the_encoder_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CUDA the KV cache gets what --gpu-memory-utilization leaves, and the encoder cache,
    which fills later on the same card, comes out of it (else a 1 GiB cache runs the server
    past the share it was given). CUDA's memory readings stubbed: the arithmetic on the CPU."""
    from types import SimpleNamespace

    from server.engine import profile

    gib = 2**30
    readings = {"max_memory_allocated": 30 * gib, "memory_reserved": 32 * gib}
    for name, value in readings.items():
        monkeypatch.setattr(torch.cuda, name, lambda device=None, value=value: value)
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * gib, 140 * gib))
    monkeypatch.setattr(profile, "worst_case_step", lambda *args: 2 * gib)  # its temporary KV
    model = SimpleNamespace(device=torch.device("cpu"))

    def budget(encoder_cache: float) -> float:
        config = Settings(
            model="unused", gpu_memory_utilization=0.5, encoder_cache_memory=encoder_cache
        ).engine_config()
        return profile.kv_budget_bytes(model, config, max_seq_len=300) / gib  # type: ignore[arg-type]

    # 140 x 0.5 - (30 - 2) peak - (140 - 100 - 32) outside torch - the encoder cache
    assert budget(0) == pytest.approx(34)
    assert budget(1) == pytest.approx(33)
    assert budget(4) == pytest.approx(30)


@pytest.mark.parametrize("room", ["max_num_seqs", "blocks_for_none", "blocks_for_the_prompt"])
async def test_priority_preemption_leaves_the_answers_unchanged(loaded, prompts, room) -> None:
    """--scheduling-policy priority: a higher-priority request overtakes a long running one,
    which is preempted: for want of a sequence slot (max_num_seqs 1), of KV blocks for the
    prompt (it makes way at admission), or of blocks as both grow (memory pressure picks the
    lower one, which may already be scheduled for that step). Both answers are the ones each
    gets alone. (Compared with the engine's own unhurried answers: over hundreds of tokens
    HF's cached generate drifts from its own full forward on Qwen3-VL.)"""
    low_prompt, high_prompt = prompts["text"], prompts["image"]
    low = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True, priority=5)
    high = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, priority=0)
    settings: dict = {"scheduling_policy": "priority", "enable_prefix_caching": False}
    if room == "max_num_seqs":
        settings["max_num_seqs"] = 1
    else:  # the cache holds the low one's whole answer, not the high one's beside it
        bytes_per_token = kv_cache_shape(loaded.model).bytes_per_token(loaded.dtype)
        blocks = -(-(low_prompt.num_prompt_tokens + 150) // 16)
        settings["kv_cache_memory"] = blocks * 16 * bytes_per_token / 2**30
        settings["max_model_len"] = 0  # the model's: the context is then what the cache holds
    engine = make_engine(loaded, max_num_batched_tokens=4096, **settings)
    engine.start()
    alone = [
        await collect(engine, engine.add_request(name, prompt, sampling))
        for name, prompt, sampling in (("a", low_prompt, low), ("b", high_prompt, high))
    ]
    assert engine.scheduler.num_preemptions == 0
    free = engine.scheduler.blocks
    prompt_blocks = -(-high_prompt.num_prompt_tokens // 16)
    target = {"blocks_for_none": prompt_blocks - 1, "blocks_for_the_prompt": prompt_blocks}
    # The engine's thread waits at the step where the cache is that full, until the high one
    # is in its inbox (polled from the event loop instead, a loaded machine missed the window:
    # the low one had finished).
    paused, resume = threading.Event(), threading.Event()

    def pause_when_full(_: int) -> None:
        if paused.is_set() or first.num_completion_tokens < 3:
            return
        if free.num_free_blocks <= target.get(room, 1 << 30):
            paused.set()
            resume.wait(60)

    first = engine.add_request("low", low_prompt, low)
    engine.on_step = pause_when_full
    low_done = asyncio.ensure_future(collect(engine, first))
    assert await asyncio.to_thread(paused.wait, 60) and not first.is_finished
    second = engine.add_request("high", high_prompt, high)
    resume.set()
    assert await collect(engine, second) == alone[1]
    assert await low_done == alone[0]
    await engine.stop()
    assert engine.scheduler.num_preemptions > 0 and first.num_preemptions > 0


async def collect(engine: AsyncEngine, seq) -> list[int]:
    async for _ in engine.stream(seq):
        pass
    return list(seq.output_token_ids)
