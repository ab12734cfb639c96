"""AsyncEngine with a real tiny checkpoint: output matches HF generate, sampling controls work,
abort frees the engine, and context limits are enforced."""

from __future__ import annotations

import asyncio
import gc
import io
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.inputs import InputBuilder
from server.engine.loader import LoadedModel, load_model
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.exceptions import InvalidRequest
from tests.helpers import make_image

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def prompt(loaded: LoadedModel):
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    return builder.build(messages, [Image.open(io.BytesIO(make_image(96, 64)))])


def make_engine(loaded: LoadedModel, context_length: int = 2048, **settings: object) -> AsyncEngine:
    values = {"model": "unused", "max_model_len": context_length, "default_max_tokens": 16}
    config = Settings(**{**values, **settings}).engine_config()
    return AsyncEngine.build(loaded, config)


async def run(engine: AsyncEngine, request_id: str, prompt, sampling: SamplingParams):
    seq = engine.add_request(request_id, prompt, sampling)
    text = "".join([out.text_delta async for out in engine.stream(seq)])
    return seq, text


async def test_greedy_matches_hf_generate(loaded: LoadedModel, prompt) -> None:
    engine = make_engine(loaded)
    engine.start()
    seq, text = await run(engine, "a", prompt, SamplingParams(max_tokens=12, temperature=0))
    await engine.stop()
    with torch.inference_mode():
        tensors = {name: t.to(loaded.device) for name, t in prompt.tensors.items()}
        reference = loaded.model.generate(**tensors, max_new_tokens=12, do_sample=False)
    expected = reference[0, prompt.num_prompt_tokens :].tolist()
    assert seq.output_token_ids == expected
    assert text == loaded.tokenizer.decode(expected, skip_special_tokens=True)
    finished_on_eos = expected[-1] in loaded.eos_token_ids
    assert seq.finish_reason == ("stop" if finished_on_eos else "length")


async def test_async_decodes_read_their_token_on_the_device(
    loaded: LoadedModel, prompt, async_scheduling: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With async scheduling every decode is queued before the host has read its input token:
    the runner copies it from the last step's sampled ids, on the device. Without, none is."""
    handed_off: list[int] = []
    hand_off = ModelRunner._hand_off

    def counting(self: ModelRunner, token_ids: torch.Tensor, device_tokens: list) -> None:
        handed_off.append(len(device_tokens))
        hand_off(self, token_ids, device_tokens)

    monkeypatch.setattr(ModelRunner, "_hand_off", counting)
    engine = make_engine(loaded)
    engine.start()
    sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    seq, _ = await run(engine, "a", prompt, sampling)
    await engine.stop()
    assert seq.num_completion_tokens == 8
    # the prefill, then 7 decodes (none past the 8th token)
    assert handed_off == [0] + [1 if async_scheduling else 0] * 7


async def test_seeded_sampling_is_reproducible(loaded: LoadedModel, prompt) -> None:
    engine = make_engine(loaded)
    engine.start()
    outputs = []
    for request_id, seed in (("a", 1), ("b", 1), ("c", 2)):
        sampling = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=seed)
        seq, _ = await run(engine, request_id, prompt, sampling)
        outputs.append(seq.output_token_ids)
    await engine.stop()
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


async def test_stop_token_id_and_max_tokens(loaded: LoadedModel, prompt) -> None:
    engine = make_engine(loaded)
    engine.start()
    # (ignore_eos: a random-weight model may end sooner; stop ids apply whatever it says)
    sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    greedy, _ = await run(engine, "a", prompt, sampling)
    assert greedy.finish_reason == "length" and greedy.num_completion_tokens == 8
    stop_id = greedy.output_token_ids[3]
    first = greedy.output_token_ids.index(stop_id)
    sampling = SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=(stop_id,)
    )
    stopped, _ = await run(engine, "b", prompt, sampling)
    await engine.stop()
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id
    assert stopped.output_token_ids == greedy.output_token_ids[: first + 1]


async def test_abort_stops_within_a_token_and_frees_the_engine(loaded: LoadedModel, prompt):
    engine = make_engine(loaded)
    engine.start()
    seq = engine.add_request("long", prompt, SamplingParams(max_tokens=1500, temperature=0))
    stream = engine.stream(seq)
    await anext(stream)  # at least one token out
    engine.abort("long")
    outputs = [out async for out in stream]
    assert outputs[-1].finished and outputs[-1].finish_reason == "abort"
    assert seq.num_completion_tokens < 1500
    after, _ = await asyncio.wait_for(
        run(engine, "next", prompt, SamplingParams(max_tokens=3, temperature=0)), timeout=30
    )
    await engine.stop()
    assert after.num_completion_tokens == 3


async def test_an_idle_engine_holds_no_finished_sequence(loaded: LoadedModel, prompt) -> None:
    """Once idle the engine keeps nothing of the requests it answered: a finished sequence
    holds its prompt's tensors (an image's pixels), which the last step's sample kept alive
    until the next request came."""
    engine = make_engine(loaded)
    engine.start()
    try:
        seq, _ = await run(engine, "answered", prompt, SamplingParams(max_tokens=3, temperature=0))
        gone = weakref.ref(seq)
        del seq
        for _ in range(100):  # (the engine thread goes idle just after the answer's last piece)
            gc.collect()
            if gone() is None:
                break
            await asyncio.sleep(0.05)
        assert gone() is None, gc.get_referrers(gone())
    finally:
        await engine.stop()


async def test_bad_word_ids_part_the_answer_where_they_would_complete(
    loaded: LoadedModel, prompt
) -> None:
    """Banning the greedy answer's first two tokens as a word: the answer keeps the first and
    changes at the second; banning its first token as a word: it never appears. With async
    scheduling too, where the ban depends on the token sampled the step before."""
    engine = make_engine(loaded)
    engine.start()
    plain = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    greedy = (await run(engine, "a", prompt, plain))[0].output_token_ids
    pair = tuple(greedy[:2])
    two, _ = await run(engine, "b", prompt, replace(plain, bad_word_ids=(pair,)))
    one, _ = await run(engine, "c", prompt, replace(plain, bad_word_ids=(pair[:1],)))
    await engine.stop()
    parted = two.output_token_ids
    assert parted[0] == greedy[0] and parted[1] != greedy[1]
    assert all(tuple(parted[i : i + 2]) != pair for i in range(len(parted) - 1))
    assert one.output_token_ids[0] != greedy[0] and greedy[0] not in one.output_token_ids


def test_a_max_model_len_past_the_models_context_is_warned_of(
    loaded: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(loaded, loaded.context_length + 1000)
    assert engine.max_seq_len <= loaded.context_length
    assert f"is more than the model's context ({loaded.context_length} tokens)" in caplog.text


async def test_prompt_longer_than_context(loaded: LoadedModel, prompt) -> None:
    engine = make_engine(loaded, context_length=prompt.num_prompt_tokens)
    engine.start()
    with pytest.raises(InvalidRequest) as info:
        engine.add_request("a", prompt, SamplingParams())
    await engine.stop()
    assert info.value.code == "context_length_exceeded"


async def test_default_max_tokens_bounded_by_context(loaded: LoadedModel, prompt) -> None:
    engine = make_engine(loaded, context_length=prompt.num_prompt_tokens + 5)
    engine.start()
    seq = engine.add_request("a", prompt, SamplingParams(temperature=0))
    await engine.stop()
    assert seq.max_tokens == 5


async def test_without_a_default_max_tokens_the_answer_has_the_rest_of_the_context(
    loaded: LoadedModel, prompt
) -> None:
    """--default-max-tokens 0 (the default, as vLLM and OpenAI): a request without max_tokens
    may fill the context; what it is planned with (a video's frames, truncation) is a quarter
    of the context at most, 1,024 tokens."""
    engine = make_engine(loaded, context_length=2048, default_max_tokens=0)
    engine.start()
    seq = engine.add_request("a", prompt, SamplingParams(temperature=0))
    await engine.stop()
    assert seq.max_tokens == 2048 - prompt.num_prompt_tokens
    assert engine.limits.planned_answer_tokens == 512


async def test_video_prompt_matches_hf_generate_alone_and_batched(
    loaded: LoadedModel, prompt
) -> None:
    """Video inputs take Qwen's 3D rope (and, for Qwen2.5-VL, seconds per patch): the engine
    must match HF's own generate, alone and batched with an image prompt."""
    import numpy as np

    from server.engine.inputs import VideoFrames

    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    frames = np.stack(
        [np.asarray(Image.open(io.BytesIO(make_image(112, 84, seed=i)))) for i in range(4)]
    )
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}]
    video = builder.build(messages, [], [VideoFrames(frames, (0.5, 1.5, 2.5, 3.5), 4.0)])
    assert video.num_video_tokens > 0
    with torch.inference_mode():
        tensors = {name: t.to(loaded.device) for name, t in video.tensors.items()}
        reference = loaded.model.generate(**tensors, max_new_tokens=10, do_sample=False)
    expected = reference[0, video.num_prompt_tokens :].tolist()
    engine = make_engine(loaded)
    engine.start()
    greedy = SamplingParams(max_tokens=10, temperature=0)
    alone, _ = await run(engine, "alone", video, greedy)
    together = [engine.add_request("v", video, greedy), engine.add_request("i", prompt, greedy)]
    for seq in together:
        async for _ in engine.stream(seq):
            pass
    await engine.stop()
    assert alone.output_token_ids == expected[: len(alone.output_token_ids)]
    assert together[0].output_token_ids == alone.output_token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"])
async def test_engine_starts_and_answers_on_cuda(tiny_model_dir: Path, device: str) -> None:
    """Not just a load: the engine thread binds the device and decodes (it used to die at
    start on --device auto / cuda)."""
    loaded = load_model(Settings(model=str(tiny_model_dir), device=device).engine_config())
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    prompt = builder.build(messages, [Image.open(io.BytesIO(make_image(96, 64)))])
    engine = make_engine(loaded)
    engine.start()
    seq, _ = await run(engine, "cuda", prompt, SamplingParams(max_tokens=4, temperature=0))
    assert engine.is_running
    await engine.stop()
    assert loaded.device.type == "cuda" and loaded.device.index is not None
    assert seq.finish_reason in ("stop", "length") and seq.output_token_ids
