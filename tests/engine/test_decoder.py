"""The fused decoder (steps of generated tokens) against HF's forward: same logits in float32,
same tokens through the engine (eager and through the decode-graph buffers), the weights
shared rather than copied, fewer ops per step, and HF's forward kept where it must be."""

from __future__ import annotations

import pytest
import torch
from op_count import CountOps
from torch import nn

from server.engine.decoder import FusedDecoder
from server.engine.inputs import InputBuilder, ModelInputs
from server.engine.loader import LoadedModel
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from tests.engine.test_cuda_graph import build_engine, generate, prompts


def randomise_vectors(loaded: LoadedModel) -> LoadedModel:
    """The text model's norms' weights and biases made random too (a random-weight checkpoint
    leaves them ones and zeros, which would hide a weight or bias left out)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in loaded.model.model.language_model.parameters():
            if param.ndim == 1:
                noise = torch.randn(param.shape, generator=generator) * 0.2
                param.add_(noise.to(param.device, param.dtype))
    return loaded


@pytest.fixture(scope="module")
def loaded(loaded: LoadedModel) -> LoadedModel:
    """Each family, its vectors random (randomise_vectors)."""
    return randomise_vectors(loaded)


def image_prompt(loaded: LoadedModel) -> ModelInputs:
    """An image before the question: the generated tokens' positions carry a rope delta."""
    from PIL import Image

    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    content = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    image = Image.new("RGB", (96, 64), (200, 30, 90))
    return builder.build([{"role": "user", "content": content}], [image])


def decode_logits(runner: ModelRunner, seqs: list[Sequence]) -> torch.Tensor:
    """Prefill the sequences (one step), give each a first token, then one decode step's
    logits; the KV cache and sequences as the engine would leave them."""
    prefill = ScheduledBatch(seqs, [s.inputs.num_prompt_tokens for s in seqs])
    for seq in seqs:
        seq.block_table = list(range(seq.index * 8, seq.index * 8 + 8))
    runner.run(prefill, seqs)
    for seq in seqs:
        seq.num_computed_tokens = seq.inputs.num_prompt_tokens
        seq.output_token_ids.append(7 + seq.index)
    decode = ScheduledBatch(seqs, [1] * len(seqs))
    with torch.inference_mode():
        return runner.forward(decode, seqs)


def new_seqs(loaded: LoadedModel, prompts_: list[ModelInputs]) -> list[Sequence]:
    seqs = []
    for index, inputs in enumerate(prompts_):
        seq = Sequence(f"s{index}", inputs, SamplingParams(temperature=0), 64)
        seq.index = index  # type: ignore[attr-defined]
        seqs.append(seq)
    return seqs


def test_every_family_gets_the_fused_decoder(loaded: LoadedModel) -> None:
    decoder = FusedDecoder.build(loaded.model)
    assert decoder is not None
    assert FusedDecoder.build(loaded.model) is decoder  # once per model: weights fused once


def test_the_weights_are_shared_not_copied(loaded: LoadedModel) -> None:
    decoder = FusedDecoder.build(loaded.model)
    layer = loaded.model.model.language_model.layers[0]
    fused = decoder.layers[0]
    for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        assert module.weight.untyped_storage().data_ptr() == fused.qkv.untyped_storage().data_ptr()
    if hasattr(layer.mlp, "experts"):  # a mixture of experts: HF's block itself
        assert decoder.sparse_mlps[0] is layer.mlp and fused.gate_up is None
        return
    gate = layer.mlp.gate_proj.weight
    assert gate.untyped_storage().data_ptr() == fused.gate_up.untyped_storage().data_ptr()
    rows = layer.mlp.up_proj.out_features
    assert torch.equal(fused.gate_up[rows:], layer.mlp.up_proj.weight)


def test_decode_logits_match_hf_forward(loaded: LoadedModel) -> None:
    """Two text prompts of different lengths and one after an image (a rope delta): the same
    decode step through HF's text model and through the fused decoder."""
    inputs = [*prompts(loaded)[:2], image_prompt(loaded)]
    logits = {}
    for fused in (False, True):
        runner = ModelRunner(loaded, 64, 16, 0, fused_decoder=fused)
        assert (runner.decoder is not None) == fused
        logits[fused] = decode_logits(runner, new_seqs(loaded, inputs))
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits[True].argmax(-1), logits[False].argmax(-1))


@pytest.mark.anyio
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graph-buffers"])
async def test_engine_tokens_equal_hf_forward(loaded: LoadedModel, enforce_eager: bool) -> None:
    """Greedy tokens of text and image prompts: the fused decoder's engine against one whose
    steps all run HF's forward."""
    inputs = [*prompts(loaded), image_prompt(loaded)]
    sampling = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(inputs)
    outputs = []
    for fused in (False, True):
        with pytest.MonkeyPatch.context() as patch:
            if not fused:  # from the start: on CUDA the graphs are captured while building
                patch.setattr(FusedDecoder, "build", classmethod(lambda cls, model: None))
            engine = build_engine(loaded, enforce_eager, max_num_seqs=4)
        assert (engine.runner.decoder is not None) == fused
        outputs.append(await generate(engine, inputs, sampling))
        if fused and not enforce_eager:
            assert engine.runner.graphs is not None
    assert outputs[1] == outputs[0]


@pytest.mark.anyio
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graph-buffers"])
async def test_compiled_decoder_gives_the_fused_decoders_tokens(
    loaded: LoadedModel, enforce_eager: bool, async_scheduling: bool
) -> None:
    """--compile-decoder: the same greedy tokens as the eager fused decoder (float32: the
    compiled kernels round alike), compiled while the engine is built, once for all layers
    (steps of 4, 3, 2 and 1 rows then compile nothing: a compile while serving raises)."""
    from torch._dynamo.utils import counters

    on_cuda = loaded.device.type == "cuda"
    if on_cuda and (async_scheduling or loaded.family == "qwen2.5-vl"):
        # the GPU check's time: sync only, once per shape of decoder (2.5's is 2's)
        pytest.skip("on CUDA: sync scheduling, Qwen2-VL and Qwen3-VL only")
    if on_cuda and enforce_eager and loaded.family != "qwen2-vl":
        pytest.skip("on CUDA: eager steps once (Qwen2-VL)")
    inputs = [*prompts(loaded), image_prompt(loaded)]
    sampling = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 8, 10, 12)
    ]
    outputs = []
    for compile_decoder in (False, True):
        compiles = counters["stats"]["unique_graphs"]
        engine = build_engine(
            loaded, enforce_eager, max_num_seqs=4, compile_decoder=compile_decoder
        )
        assert engine.runner.decoder.is_compiled == compile_decoder
        # two functions, for two rows and more and for one row: not once per layer (the
        # same compile may also have been made by an earlier test, for the same shapes)
        assert counters["stats"]["unique_graphs"] - compiles <= 4
        with torch.compiler.set_stance("fail_on_recompile"):
            outputs.append(await generate(engine, inputs, sampling))
    assert outputs[1] == outputs[0]
    assert FusedDecoder.build(loaded.model).is_compiled is False  # the cached one stays eager


def test_a_compiled_decode_step_runs_the_compiled_kernels(
    loaded: LoadedModel, async_scheduling: bool
) -> None:
    """The compiled code is what runs (not HF's ops under a compiled name): a profile of the
    decode step has no rms_norm within the layers (fused with what is around it) where the
    eager one has one per norm (HF's prefill computes its norms otherwise)."""
    if loaded.device.type == "cuda" and (async_scheduling or loaded.family == "qwen2.5-vl"):
        pytest.skip("on CUDA: sync scheduling, Qwen2-VL and Qwen3-VL only (the GPU check's time)")
    layers = loaded.model.model.language_model.layers
    norms_per_layer = 4 if hasattr(layers[0].self_attn, "q_norm") else 2
    rms_norm = {}
    for compile_decoder in (False, True):
        runner = ModelRunner(loaded, 64, 16, 0, compile_decoder=compile_decoder)
        seqs = new_seqs(loaded, prompts(loaded)[:2])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            decode_logits(runner, seqs)  # the prompts (HF's model) and one decode step
        rms_norm[compile_decoder] = sum(e.name == "aten::rms_norm" for e in prof.events())
    assert rms_norm[False] - rms_norm[True] == len(layers) * norms_per_layer, rms_norm


def test_a_decoder_that_fails_to_compile_decodes_uncompiled(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch.compile failing at start (e.g. no C compiler for Inductor): the server starts,
    with the fused decoder uncompiled and the reason logged."""
    compiled = FusedDecoder.compiled

    def broken(self: FusedDecoder) -> FusedDecoder:
        decoder = compiled(self)

        def fails(*args: object) -> None:
            raise RuntimeError("InductorError: no working C compiler")

        decoder.attention_inputs = fails  # type: ignore[method-assign]
        return decoder

    monkeypatch.setattr(FusedDecoder, "compiled", broken)
    runner = ModelRunner(loaded, 64, 16, 0, compile_decoder=True)
    assert runner.decoder is FusedDecoder.build(loaded.model) and not runner.decoder.is_compiled
    assert "no working C compiler" in caplog.text
    logits = decode_logits(runner, new_seqs(loaded, prompts(loaded)[:2]))
    assert torch.isfinite(logits).all()


def test_a_decode_step_runs_fewer_kernels(loaded: LoadedModel) -> None:
    """What bounds a decode step on a GPU is how many kernels it launches: the fused decoder's
    step at most 70% of HF's here (two layers: the step's own ops weigh; ~45 a layer in HF)."""
    inputs = prompts(loaded)[:2]
    counts = {}
    for fused in (False, True):
        runner = ModelRunner(loaded, 64, 16, 0, fused_decoder=fused)
        seqs = new_seqs(loaded, inputs)
        decode_logits(runner, seqs)  # prefill and a first decode
        for seq in seqs:
            seq.num_computed_tokens += 1
            seq.output_token_ids.append(9)
        counter = CountOps()
        with counter, torch.inference_mode():
            runner.forward(ScheduledBatch(seqs, [1, 1]), seqs)
        counts[fused] = counter.kernels
    assert counts[True] <= 0.7 * counts[False], counts


@pytest.mark.parametrize(
    "family, text_config",
    [
        ("qwen2-vl", {}),
        ("qwen2.5-vl", {"tie_word_embeddings": True}),
        ("qwen3-vl", {}),
        # a head_dim other than hidden / heads, biases on q/k/v and o_proj, tied embeddings
        ("qwen3-vl", {"head_dim": 24, "attention_bias": True, "tie_word_embeddings": True}),
        ("qwen3-vl-moe", {}),
        # a dense layer among the sparse ones (mlp_only_layers), as some MoE checkpoints have
        ("qwen3-vl-moe", {"mlp_only_layers": [0]}),
    ],
)
def test_bf16_logits_are_hf_forward_bit_for_bit_on_the_cpu(
    family: str, text_config: dict, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """HF's roundings (rope tables, norms, residuals) in bfloat16: the CPU's kernels give the
    same bits (a GPU's fused products may round differently)."""
    from server.config import Settings
    from server.engine import tiny
    from server.engine.loader import load_model

    build_config = tiny.build_config

    def with_overrides(spec, tokenizer):  # type: ignore[no-untyped-def]
        config = build_config(spec, tokenizer)
        for key, value in text_config.items():
            target = config if key == "tie_word_embeddings" else config.text_config
            setattr(target, key, value)
        return config

    monkeypatch.setattr(tiny, "build_config", with_overrides)
    path = tiny.make_tiny_checkpoint(tmp_path / family, tiny.TinySpec(family=family))
    settings = Settings(model=str(path), dtype="bfloat16", device="cpu")
    model = load_model(settings.engine_config())
    randomise_vectors(model)
    inputs = [*prompts(model)[:2], image_prompt(model)]
    logits = [
        decode_logits(ModelRunner(model, 64, 16, 0, fused_decoder=fused), new_seqs(model, inputs))
        for fused in (False, True)
    ]
    assert logits[0].dtype == torch.bfloat16
    assert torch.equal(logits[0], logits[1])


def test_quantized_or_wrapped_layers_keep_hf_forward(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from server.config import Settings
    from server.engine.loader import load_model

    loaded = load_model(Settings(model=str(tiny_model_dir)).engine_config())

    class Wrapped(nn.Linear):  # e.g. bitsandbytes' Linear4bit
        pass

    layer = loaded.model.model.language_model.layers[-1]
    old = layer.mlp.down_proj
    layer.mlp.down_proj = Wrapped(old.in_features, old.out_features, bias=False)
    q_weight = layer.self_attn.q_proj.weight
    assert FusedDecoder.build(loaded.model) is None
    assert layer.self_attn.q_proj.weight is q_weight  # nothing was fused


def test_no_fused_decoder_runs_hf_text_model(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """--no-fused-decoder: HF's text model decodes and the weights stay as loaded."""
    from server.config import Settings
    from server.engine.engine import AsyncEngine
    from server.engine.loader import load_model

    settings = Settings(model=str(tiny_model_dir), fused_decoder=False, max_model_len=512)
    model = load_model(settings.engine_config())
    attention = model.model.model.language_model.layers[0].self_attn
    q_weight = attention.q_proj.weight
    engine = AsyncEngine.build(model, settings.engine_config())
    assert engine.runner.decoder is None
    assert attention.q_proj.weight is q_weight
