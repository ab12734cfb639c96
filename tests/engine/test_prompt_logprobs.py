"""Prompt logprobs in the engine: chunked prefill (a 16-token step budget) scores every prompt
token once, equal to a plain forward over the prompt; a preempted and recomputed prompt keeps
them once; a prompt that asks takes no prefix-cache hits."""

from __future__ import annotations

import pytest
import torch

from server.config import Settings
from server.engine import prompt_logprobs
from server.engine.engine import AsyncEngine
from server.engine.inputs import InputBuilder
from server.engine.loader import LoadedModel
from server.engine.sampling import SamplingParams

pytestmark = pytest.mark.anyio


def expected_logprobs(loaded: LoadedModel, inputs) -> torch.Tensor:
    tensors = {k: v.to(loaded.device) for k, v in inputs.tensors.items()}
    with torch.inference_mode():
        logits = loaded.model(**tensors).logits[0, :-1].float()
    ids = tensors["input_ids"][0, 1:]
    return torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0].cpu()


async def test_chunked_prompts_are_scored_once_like_a_plain_forward(loaded: LoadedModel) -> None:
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    text = "Tell me a long story about paged memory and prefix caches, please."
    inputs = builder.build([{"role": "user", "content": text}], [])
    settings = Settings(model="x", max_model_len=512, max_num_batched_tokens=16)
    engine = AsyncEngine.build(loaded, settings.engine_config())
    engine.start()
    sampling = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    seqs = [engine.add_request(f"p{i}", inputs, sampling) for i in range(2)]
    for seq in seqs:
        async for _ in engine.stream(seq):
            pass
    await engine.stop()
    expected = expected_logprobs(loaded, inputs)
    for seq in seqs:
        assert seq.num_cached_tokens == 0  # the second is not a prefix-cache hit
        got = torch.tensor([e.logprob for e in seq.prompt_logprobs])
        assert len(got) == inputs.num_prompt_tokens - 1
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert all(len(e.top) == 2 and e.top[0][1] >= e.top[1][1] for e in seq.prompt_logprobs)


def test_a_recomputed_prompt_keeps_its_logprobs_once(loaded: LoadedModel) -> None:
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    inputs = builder.build([{"role": "user", "content": "One two three four five."}], [])
    from server.engine.sequence import Sequence

    seq = Sequence("s", inputs, SamplingParams(prompt_logprobs=1), 4)
    scored = prompt_logprobs.Scored(seq, 1, range(0, 5))
    # [logprob, rank, top logprob, top id] per scored token
    packed = torch.tensor([[-1.0 - i, 3.0, -0.5, 7.0] for i in range(5)])
    prompt_logprobs.store([scored], packed)
    prompt_logprobs.store([scored], packed - 1)  # the same positions again (a preemption)
    assert [e.logprob for e in seq.prompt_logprobs] == [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert seq.prompt_logprobs[0].top == ((7, -0.5),)
    assert [e.rank for e in seq.prompt_logprobs] == [3] * 5


async def test_a_prompt_scored_in_the_last_step_before_a_stop_keeps_its_logprobs(
    loaded: LoadedModel,
) -> None:
    """The engine stops during the step that scores a prompt's last chunk (its logprobs still
    on their way to the host, with async scheduling): the prompt keeps them, as without."""
    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    text = "Tell me a long story about paged memory and prefix caches, please."
    inputs = builder.build([{"role": "user", "content": text}], [])
    settings = Settings(model="x", max_model_len=512, max_num_batched_tokens=16)
    engine = AsyncEngine.build(loaded, settings.engine_config())
    sample = engine.runner.sample

    def stop_in_this_step(logits: torch.Tensor, seqs: list) -> object:
        engine._stopping = True  # what stop() does, landing in the step that ends the prompt
        return sample(logits, seqs)

    engine.runner.sample = stop_in_this_step  # type: ignore[method-assign]
    engine.start()
    sampling = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=1)
    seq = engine.add_request("s", inputs, sampling)
    outputs = [out async for out in engine.stream(seq)]
    await engine.stop()
    assert outputs[-1].finished and seq.finish_reason in ("abort", "length")
    assert len(seq.prompt_logprobs) == inputs.num_prompt_tokens - 1
