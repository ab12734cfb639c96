"""Qwen3-VL specifics: the checkpoint as the public ones ship, video prompts with the planned
frames' timestamps (one media item per temporal patch), the family's 32-pixel token budget,
thinking checkpoints' reasoning split, MoE checkpoints as the hub ships them. (Greedy
equality with HF generate, chunked, cached and mixed, is in test_paged.py, which runs every
family.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from server.config import Settings
from server.engine.inputs import InputBuilder, VideoFrames
from server.engine.loader import LoadedModel, load_model
from server.engine.sampling import SamplingParams
from server.engine.tiny import TinySpec, make_tiny_checkpoint
from server.exceptions import ModelLoadError
from server.media.frames import FrameRequest, TokenBudget, VideoInfo, plan_frames
from server.pipelines.reasoning import ReasoningStream, split_reasoning

INSTRUCT_TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
THINKING_TEMPLATE_SHA256 = "36e042fe45641f067b1f2381fcc8955d10d956a3ed333ecdf7f7eb0916f68956"


@pytest.fixture(scope="module")
def qwen3(tiny3_model_dir: Path) -> LoadedModel:
    return load_model(Settings(model=str(tiny3_model_dir)).engine_config())


def builder_of(loaded: LoadedModel) -> InputBuilder:
    return InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)


def test_the_checkpoint_is_what_the_public_ones_ship(tiny3_model_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny3_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny3_model_dir)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    template = processor.chat_template.encode()
    assert hashlib.sha256(template).hexdigest() == INSTRUCT_TEMPLATE_SHA256
    tokenizer = processor.tokenizer
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "</think>")]
    assert ids[1] - ids[0] == 151668 - 151643  # Qwen3's added tokens, in Qwen3's order
    vision = model.config.vision_config
    assert (vision.patch_size, vision.spatial_merge_size) == (16, 2)
    assert (
        vision.deepstack_visual_indexes
        and model.config.text_config.rope_parameters["mrope_interleaved"]
    )


def test_same_bytes_on_every_run(tmp_path: Path) -> None:
    def digest(path: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}

    spec = TinySpec(family="qwen3-vl")
    assert digest(make_tiny_checkpoint(tmp_path / "a", spec)) == digest(
        make_tiny_checkpoint(tmp_path / "b", spec)
    )


def test_video_prompt_carries_the_planned_frames_timestamps(qwen3: LoadedModel) -> None:
    builder = builder_of(qwen3)
    frames = np.zeros((6, 96, 128, 3), dtype=np.uint8)
    video = VideoFrames(frames, (0.5, 1.5, 7.25, 8.75, 20.0, 21.0), 30.0)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
    inputs = builder.build(messages, [], [video])
    text = qwen3.tokenizer.decode(inputs.tensors["input_ids"][0])
    # One timestamp per temporal patch of two frames: the mean of the pair, as Qwen's processor
    # prints it; and no outer <|vision_start|> around the whole video (as the model was trained).
    stamps = ["<1.0 seconds>", "<8.0 seconds>", "<20.5 seconds>"]
    assert all(text.count(s) == 1 for s in stamps)
    assert text.index(stamps[0]) < text.index(stamps[1]) < text.index(stamps[2])
    assert "<|vision_start|><1.0 seconds>" not in text
    assert text.count("<|vision_start|>") == 3
    # One media item per temporal patch, each a (1, h, w) grid over its own placeholders.
    assert [item.grid[0] for item in inputs.media] == [1, 1, 1]
    ids = inputs.tensors["input_ids"][0]
    for item in inputs.media:
        assert (ids[item.start : item.end] == qwen3.video_token_id).all()
    assert sum(item.num_tokens for item in inputs.media) == inputs.num_video_tokens


@pytest.mark.parametrize("context", [4096, 131072])  # the token budget binds, or the pixels
def test_the_planner_uses_32_pixel_tokens_and_the_processors_limits(
    qwen3: LoadedModel, context: int
) -> None:
    """What the planner says the video costs is what the processor makes of it: 32-pixel
    tokens, a timestamp per temporal patch, and (with room) no more pixels over all frames
    than the processor allows, which would otherwise shrink the frames behind its back."""
    builder = builder_of(qwen3)
    assert builder.token_side == 32 and builder.per_patch_tokens > 2
    assert builder.max_video_pixels == qwen3.processor.video_processor.size["longest_edge"]
    info = VideoInfo(duration_s=60.0, fps=30.0, num_frames=1800, width=1280, height=720)
    budget = TokenBudget(
        context,
        100,
        200,
        token_side=builder.token_side,
        per_patch_tokens=builder.per_patch_tokens,
        max_video_pixels=builder.max_video_pixels,
    )
    plan = plan_frames(info, budget, FrameRequest("native"))
    assert plan.width % 32 == 0 and plan.height % 32 == 0
    assert plan.num_frames * plan.width * plan.height <= builder.max_video_pixels
    patches = plan.num_frames // 2
    per_patch = (plan.width // 32) * (plan.height // 32) + builder.per_patch_tokens
    assert plan.video_tokens == patches * per_patch <= context - 300
    frames = np.zeros((plan.num_frames, plan.height, plan.width, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
    timestamps = tuple(float(t) for t in plan.timestamps)
    inputs = builder.build(messages, [], [VideoFrames(frames, timestamps, 60.0)])
    assert inputs.tensors["video_grid_thw"][0].tolist() == [
        patches,
        plan.height // 16,
        plan.width // 16,
    ]
    assert inputs.num_video_tokens == patches * (per_patch - builder.per_patch_tokens)
    assert inputs.num_prompt_tokens <= 100 + plan.video_tokens + 2


def test_small_images_are_sized_to_what_the_processor_takes(qwen3: LoadedModel) -> None:
    from PIL import Image

    from server.media.image import max_pixels_for, target_size

    builder = builder_of(qwen3)
    side, floor = builder.token_side, builder.min_image_pixels
    assert floor == 65536  # Qwen3-VL's processor: at least 256 x 256 pixels
    width, height = target_size(96, 96, max_pixels_for("auto", 1 << 30, side), side, floor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    inputs = builder.build(messages, [Image.new("RGB", (width, height))])
    assert inputs.num_image_tokens == (width // side) * (height // side) == 64


def test_thinking_checkpoints_split_reasoning_from_the_answer(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "thinking", TinySpec(family="qwen3-vl-thinking"))
    loaded = load_model(Settings(model=str(path)).engine_config())
    template = loaded.processor.chat_template.encode()
    assert hashlib.sha256(template).hexdigest() == THINKING_TEMPLATE_SHA256
    builder = builder_of(loaded)
    assert builder.reasoning
    messages = [{"role": "user", "content": "Hi"}]
    assert builder.prompt(messages).endswith("<|im_start|>assistant\n<think>\n")
    # Answering at once reads as Qwen3's non-thinking prompts do.
    assert builder.prompt(messages, think=False).endswith("assistant\n<think>\n\n</think>\n\n")
    assert (
        builder.build(messages, []).thinks and not builder.build(messages, [], think=False).thinks
    )
    assert split_reasoning("Let me see.\n</think>\n\nA cat.") == ("Let me see.", "A cat.")
    assert split_reasoning("<think>\nStill thinking") == ("Still thinking", "")
    stream = ReasoningStream()
    pieces = [stream.feed(t) for t in ["Let me", " see.</th", "ink>\n\nA ", "cat."]]
    assert "".join(r for r, _ in pieces) == "Let me see."
    assert "".join(c for _, c in pieces) == "A cat."


def test_instruct_checkpoints_have_no_reasoning(qwen3: LoadedModel) -> None:
    assert not builder_of(qwen3).reasoning


def test_the_moe_checkpoint_is_what_the_public_ones_ship(tiny3moe_model_dir: Path) -> None:
    """Qwen3-VL-30B-A3B's architecture, its experts stored as the hub's checkpoints store
    them ([experts, in, out]: loaded through transformers' conversion, transposed), run by
    transformers' grouped_mm (no host sync: the engine tests run the family)."""
    from safetensors import safe_open

    settings = Settings(model=str(tiny3moe_model_dir), device="cpu", dtype="float32")
    loaded = load_model(settings.engine_config())  # (the checkpoint's, on any test device)
    model = loaded.model
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert loaded.family == "qwen3-vl-moe"
    text = model.config.text_config
    assert (text.num_experts, text.num_experts_per_tok) == (8, 2)
    assert text._experts_implementation == "grouped_mm"
    experts = model.model.language_model.layers[0].mlp.experts
    with safe_open(tiny3moe_model_dir / "model.safetensors", "pt") as f:
        prefix = "model.language_model.layers.0.mlp.experts."
        stored = {name: f.get_tensor(prefix + name) for name in ("gate_up_proj", "down_proj")}
    hidden, width = text.hidden_size, text.moe_intermediate_size
    assert stored["gate_up_proj"].shape == (8, hidden, 2 * width)
    assert stored["down_proj"].shape == (8, width, hidden)
    assert torch.equal(experts.gate_up_proj, stored["gate_up_proj"].transpose(1, 2))
    assert torch.equal(experts.down_proj, stored["down_proj"].transpose(1, 2))
    template = loaded.processor.chat_template.encode()
    assert hashlib.sha256(template).hexdigest() == INSTRUCT_TEMPLATE_SHA256


def test_moe_checkpoints_refuse_bitsandbytes_in_plain_words(tiny3moe_model_dir: Path) -> None:
    """bitsandbytes would leave the experts (nearly all the weights) unquantized."""
    settings = Settings(
        model=str(tiny3moe_model_dir), quantization="bnb-4bit", device="cpu", dtype="float32"
    )
    with pytest.raises(ModelLoadError, match="mixture-of-experts .* bitsandbytes quantizes"):
        load_model(settings.engine_config())


def test_experts_sync_free_where_grouped_mm_is_one_kernel(
    tiny3moe_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch's grouped_mm is one kernel on a CPU and on compute capability 9.x / 10.x; other
    GPUs loop over the experts reading their row counts back: no CUDA graphs there (the
    runner turns them off rather than fail to capture)."""
    import dataclasses

    from server.engine.runner import ModelRunner

    settings = Settings(model=str(tiny3moe_model_dir), device="cpu", dtype="float32")
    loaded = load_model(settings.engine_config())
    assert loaded.experts_sync_free
    on_cuda = dataclasses.replace(loaded, device=torch.device("cuda", 0))
    for capability, sync_free in [((9, 0), True), ((10, 0), True), ((8, 0), False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert on_cuda.experts_sync_free == sync_free
    dense = dataclasses.replace(
        on_cuda, model=load_model(Settings(model="tiny").engine_config()).model
    )
    assert dense.experts_sync_free  # (capability 8.0 still)
    monkeypatch.setattr(type(loaded), "experts_sync_free", property(lambda self: False))
    runner = ModelRunner(loaded, 64, 16, 0, graph_batch_sizes=(4, 128))
    assert runner.graphs is None and "CUDA graphs are off" in caplog.text


def test_moe_on_cuda_takes_bfloat16_only(tiny3moe_model_dir: Path) -> None:
    """torch's grouped_mm takes bfloat16 on CUDA: another dtype is refused before loading."""
    from server.engine.loader import check_experts_dtype

    cuda = torch.device("cuda")
    with pytest.raises(ModelLoadError, match="bfloat16 only .*not float16"):
        check_experts_dtype("qwen3-vl-moe", cuda, torch.float16)
    check_experts_dtype("qwen3-vl-moe", cuda, torch.bfloat16)
    check_experts_dtype("qwen3-vl-moe", torch.device("cpu"), torch.float32)
    check_experts_dtype("qwen3-vl", cuda, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.anyio
async def test_moe_decodes_on_cuda_as_graphs(tiny3moe_model_dir: Path) -> None:
    """The GPU check's mixture of experts (its float32 engine tests skip the family): bfloat16,
    the decode steps replayed as CUDA graphs (grouped_mm routes on the device of a Hopper
    GPU, so the step captures), their greedy tokens equal to eager steps' (four rows: the
    graphs' bucket is the eager batch's width, so the same kernels round alike)."""
    from tests.engine.test_cuda_graph import build_engine, generate, prompts

    settings = Settings(model=str(tiny3moe_model_dir), dtype="bfloat16", device="cuda")
    loaded = load_model(settings.engine_config())
    builder = builder_of(loaded)
    extra = builder.build([{"role": "user", "content": "Why is the sky blue?"}], [])
    inputs = [*prompts(loaded), extra]
    sampling = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)] * 4
    # The Triton kernel both ways: the reference attention's graphs gather their full table
    # width, eager steps only the context (other reductions: last bits, then other experts).
    eager = await generate(build_engine(loaded, True, attention_backend="triton"), inputs, sampling)
    engine = build_engine(loaded, False, attention_backend="triton")
    assert await generate(engine, inputs, sampling) == eager
    assert engine.runner.graphs.num_replays >= 10
