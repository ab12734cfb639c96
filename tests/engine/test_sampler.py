"""The batched sampler: exactly one host transfer per step, a number of tensor operations that
does not grow with the batch, the distributions it samples, seeded rows reproducible whatever
shares the batch, and a failing grammar that fails its own row only."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from op_count import CountOps

from server.engine import sampler
from server.engine.sampler import FAILED, SamplingState, make_generator, prompt_seen, sample
from server.engine.sampling import SamplingParams
from server.engine.structured import GrammarCache, StructuredOutput

VOCAB = 2048  # at least the tiny tokenizer's, so a grammar can allow its tokens
HOST_TRANSFERS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__")


def state(params: SamplingParams, outputs: tuple[int, ...] = (), **extra) -> SamplingState:
    cpu = torch.device("cpu")
    return SamplingState(
        params=params,
        generator=make_generator(params.seed, cpu),
        prompt_seen=prompt_seen(params, [1, 2, 3, 5, 8], VOCAB, cpu),
        output_token_ids=list(outputs),
        bias=sampler.token_bias(params, VOCAB, cpu),
        allowed=sampler.allowed_tokens(params, VOCAB, cpu),
        **extra,
    )


def mixed_states(batch: int, seeded: bool = True) -> list[SamplingState]:
    kinds = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.2, top_k=5),
        SamplingParams(temperature=0.9, frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(temperature=0, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, seed=7 if seeded else None),
        SamplingParams(temperature=0.9, min_p=0.1, logit_bias=((5, 3.0),)),
        SamplingParams(temperature=0, allowed_token_ids=tuple(range(0, 2000, 3))),
    ]
    states = [state(kinds[i % len(kinds)], outputs=(1, 4, 4, 9)) for i in range(batch)]
    states[0].banned_token_ids = (3, 4)  # min_tokens: EOS and stop ids banned
    states[-1].forced_token_id = 11  # a thinking budget spent
    return states


@pytest.fixture(params=[False, True], ids=["inverse-cdf", "race"])
def draw(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both draws: a CPU's inverse CDF and the GPU's exponential race (forced on the CPU)."""
    monkeypatch.setattr(sampler, "RACE_ON_CPU", request.param)


@pytest.mark.usefixtures("draw")
def test_one_host_transfer_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    grammars = GrammarCache(_tokenizer(), VOCAB, (0,))
    states = mixed_states(12)
    states.append(state(SamplingParams(temperature=0.5), grammars=grammars))
    states[-1].matcher = grammars.matcher(StructuredOutput("json_object"))
    calls: Counter[str] = Counter()
    for name in HOST_TRANSFERS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    tokens = sample(torch.randn(len(states), VOCAB), states)
    monkeypatch.undo()
    assert calls == {"tolist": 1}, calls
    assert len(tokens) == len(states) and FAILED not in tokens


@pytest.mark.usefixtures("draw")
def test_tensor_ops_do_not_grow_with_the_batch() -> None:
    counts = {}
    for batch in (8, 80):  # every kind of row in both
        states = mixed_states(batch, seeded=False)  # a seeded row draws from its own generator
        logits = torch.randn(batch, VOCAB)
        with CountOps() as ops:
            sample(logits, states)
        counts[batch] = ops.count
    assert counts[80] == counts[8], counts


@pytest.mark.usefixtures("draw")
def test_distributions() -> None:
    torch.manual_seed(0)  # fixed draws: a statistical bound must not fail at random
    # The rest of the vocabulary is all but impossible (2e-9 in all: 1e-9 each made one of
    # them appear in about one run in 120).
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05] + [1e-12] * (VOCAB - 4)))
    draws = 4000
    for params, allowed in (
        (SamplingParams(temperature=1.0), {0, 1, 2, 3}),
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.7), {0, 1}),  # 0.5 < 0.7 <= 0.8
    ):
        states = [state(params) for _ in range(draws)]
        tokens = Counter(sample(logits.repeat(draws, 1), states))
        assert set(tokens) <= allowed, tokens
        if params.top_k == 0 and params.top_p == 1.0:
            for token, p in enumerate((0.5, 0.3, 0.15, 0.05)):
                assert abs(tokens[token] / draws - p) < 0.03, tokens
        else:  # top-2 renormalised: 0.5 / 0.8 and 0.3 / 0.8
            assert abs(tokens[0] / draws - 0.625) < 0.03, tokens


def test_penalties_and_bans() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, 7] = 1.0
    states = [
        state(SamplingParams(temperature=0, frequency_penalty=2.0), outputs=(7,)),
        state(SamplingParams(temperature=0, repetition_penalty=2.0), outputs=()),
        state(SamplingParams(temperature=0)),
    ]
    states[1].prompt_seen = prompt_seen(states[1].params, [7], VOCAB, torch.device("cpu"))
    logits[1, 9] = 0.6  # 7 halves to 0.5 once seen: 9 wins
    states[2].banned_token_ids = (7,)
    tokens = sample(logits, states)
    assert tokens[0] != 7 and tokens[1] == 9 and tokens[2] != 7


@pytest.mark.usefixtures("draw")
def test_seeded_rows_are_the_same_alone_and_in_any_batch() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    logits = torch.randn(20, VOCAB)
    alone_state = state(params)
    alone = [sample(logits[i : i + 1], [alone_state])[0] for i in range(20)]
    batched_state = state(params)
    batched = []
    for i in range(20):
        others = mixed_states(5)
        rows = torch.cat([torch.randn(2, VOCAB), logits[i : i + 1], torch.randn(3, VOCAB)])
        states = [*others[:2], batched_state, *others[2:]]
        batched.append(sample(rows, states)[2])
    assert alone == batched


class FailingMatcher:
    def __init__(self, real) -> None:
        self.real = real

    def fill_next_token_bitmask(self, bitmask, index=0):
        raise RuntimeError("injected grammar failure")

    def is_terminated(self) -> bool:
        return False


def test_a_failing_grammar_fails_its_row_only() -> None:
    grammars = GrammarCache(_tokenizer(), VOCAB, (0,))
    good = state(SamplingParams(temperature=0), grammars=grammars)
    good.matcher = grammars.matcher(StructuredOutput("json_object"))
    bad = state(SamplingParams(temperature=0), grammars=grammars)
    bad.matcher = FailingMatcher(grammars.matcher(StructuredOutput("json_object")))
    plain = state(SamplingParams(temperature=0.7))
    tokens = sample(torch.randn(3, VOCAB), [good, bad, plain])
    assert tokens[1] == FAILED and tokens[0] != FAILED and tokens[2] != FAILED


def test_a_bounded_string_keeps_raw_control_characters_out() -> None:
    """JSON forbids raw control characters in strings; xgrammar let them into strings with
    minLength / maxLength (its issue #800): pydantic's max_length, in many schemas."""
    grammars = GrammarCache(_tokenizer(), VOCAB, (0,))
    bounded = {"type": "string", "minLength": 1, "maxLength": 4}
    schema = {
        "type": "object",
        "properties": {"s": bounded, "t": {"type": "array", "items": bounded}},
    }

    def takes(text: str) -> bool:
        return grammars.matcher(StructuredOutput.json_schema(schema)).accept_string(text)

    assert takes('{"s":"abc","t":["x","héé"]}')  # (compact, as every JSON answer)
    for raw in ("\x00", "\x06", "\t", "\x1f"):
        assert not takes('{"s":"a' + raw + '"')
        assert not takes('{"s":"a","t":["' + raw)
    assert not takes('{"s":"abcde"')  # (the bound still holds)


def test_bounded_strings_and_categories_keep_surrogates_out() -> None:
    """xgrammar's classes take an encoded surrogate (ED A0 80: not UTF-8, decoded as three
    U+FFFD) as one character: a bounded string, or a categories item, could outgrow its
    bound in the text, and any string hold what is not UTF-8. Their classes leave surrogates
    out; other characters stay."""
    from server.pipelines.categories import ITEM

    grammars = GrammarCache(_tokenizer(), VOCAB, (0,))
    bounded = {"type": "string", "maxLength": 4}
    unbounded = ({"type": "string"}, b""), ({"type": "object"}, b'{"k":')  # json_object's
    for schema, before in ((bounded, b""), (ITEM, b""), *unbounded):
        spec = StructuredOutput.json_schema(schema)
        assert grammars.matcher(spec).accept_string(before + '"a€é"'.encode())
        assert not grammars.matcher(spec).accept_string(before + b'"a\xed\xa0\x80')
        assert grammars.matcher(spec).accept_string(before + b'"a\xed\x9f\xbf"')  # U+D7FF


def test_the_grammar_cache_is_bounded_least_recently_used_out() -> None:
    """Per-request schemas (a categories list each) must not pile up for the server's life."""
    grammars = GrammarCache(_tokenizer(), VOCAB, (0,))
    specs = [StructuredOutput.choice([f"a{i}", f"b{i}"]) for i in range(6)]
    size = grammars.compile(specs[0]).memory_size_bytes
    grammars.max_bytes = 3 * size + size // 2  # room for three
    for spec in specs[1:4]:
        grammars.compile(spec)
    assert grammars.compile(specs[1]) is grammars.compile(specs[1])  # a lookup, now recent
    grammars.compile(specs[4])
    assert [grammars.lookup(s) is not None for s in specs] == [
        False,
        True,
        False,
        True,
        True,
        False,
    ]
    assert grammars.num_bytes <= grammars.max_bytes
    matcher = grammars.matcher(specs[0])  # evicted: compiled again, and it still works
    assert matcher.accept_string("a0") and matcher.is_completed()


def test_the_device_grammar_path_masks_what_xgrammar_masks() -> None:
    """CUDA's grammar masking (`apply_on_device`: the constrained rows' bitmask and indices sent
    through pinned copies, no host sync) masks exactly what xgrammar's CPU kernel does, on
    the listed rows only."""
    grammars = GrammarCache(_tokenizer(), VOCAB, (0,))
    bitmask = grammars.xgr.allocate_token_bitmask(4, VOCAB)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    grammars.matcher(StructuredOutput("json_object")).fill_next_token_bitmask(bitmask, 1)
    grammars.matcher(StructuredOutput.json_schema(schema)).fill_next_token_bitmask(bitmask, 3)
    bitmask[0] = 0  # a row not listed is left alone, whatever its bits
    logits = torch.randn(4, VOCAB)
    expected = logits.clone()
    grammars.apply(expected, bitmask, [1, 3])  # on the CPU: xgrammar's kernel
    grammars.apply_on_device(logits, bitmask, [1, 3])
    assert torch.equal(logits, expected)
    assert torch.isinf(logits[[1, 3]]).any(dim=-1).all() and torch.isfinite(logits[[0, 2]]).all()


@pytest.mark.anyio
async def test_engine_fails_only_the_request_whose_grammar_fails(
    loaded, monkeypatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    from server.config import Settings
    from server.engine.engine import AsyncEngine
    from server.engine.inputs import InputBuilder
    from server.log import RequestIdFilter, request_id_var

    caplog.handler.addFilter(RequestIdFilter())  # the id each line is logged under

    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    prompt = builder.build([{"role": "user", "content": "Give me JSON."}], [])
    engine = AsyncEngine.build(loaded, Settings(model="unused", max_model_len=1024).engine_config())
    real_matcher = engine.runner.grammars.matcher
    monkeypatch.setattr(
        engine.runner.grammars,
        "matcher",
        lambda spec, grammar=None: FailingMatcher(real_matcher(spec, grammar)),
    )
    engine.start()
    structured = SamplingParams(max_tokens=8, structured=StructuredOutput("json_object"))
    request_id_var.set("req-bad")
    bad = engine.add_request("bad", prompt, structured)
    request_id_var.set("req-good")
    good = engine.add_request("good", prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    outputs = {}
    for seq in (bad, good):
        outputs[seq.request_id] = [o async for o in engine.stream(seq)][-1]
    assert engine.is_running
    await engine.stop()
    assert outputs["bad"].finish_reason == "error"
    assert outputs["good"].finish_reason == "length" and good.num_completion_tokens == 8
    # why, under the failed request's id (not whichever request the thread logged last)
    failing = [r for r in caplog.records if "failing the request" in r.getMessage()]
    assert [r.request_id for r in failing] == ["req-bad"]
    assert "grammar matcher raised" in failing[0].getMessage()


@pytest.mark.anyio
async def test_a_queued_request_keeps_its_grammar_when_the_cache_lets_go(
    loaded, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A request holds its compiled grammar from add_request on: evicted from the bounded
    cache meanwhile, it is not compiled again on the engine thread (that would stall every
    running sequence for as long as a compile takes)."""
    from server.config import Settings
    from server.engine.engine import AsyncEngine
    from server.engine.inputs import InputBuilder
    from server.engine.sequence import Sequence

    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    prompt = builder.build([{"role": "user", "content": "Give me JSON."}], [])
    engine = AsyncEngine.build(loaded, Settings(model="unused", max_model_len=1024).engine_config())
    spec = StructuredOutput("json_object")
    engine.compile_grammar(spec)
    engine.start()
    try:
        seq = engine.add_request("r", prompt, SamplingParams(max_tokens=8, structured=spec))
        grammars = engine.runner.grammars
        assert seq.grammar is not None and seq.grammar is grammars.lookup(spec)
        [o async for o in engine.stream(seq)]
    finally:
        await engine.stop()
    grammars.max_bytes = 0
    grammars.compile(StructuredOutput.choice(["a", "b"]))  # the newest stays, json_object goes
    assert not engine.is_grammar_compiled(spec)

    def no_compiling(spec: StructuredOutput) -> None:
        raise AssertionError("compiled on the engine thread")

    monkeypatch.setattr(grammars, "_grammar", no_compiling)
    queued = Sequence("q", prompt, SamplingParams(max_tokens=8, structured=spec), 64)
    queued.grammar = seq.grammar
    assert engine.runner._state(queued).matcher is not None


@pytest.mark.anyio
async def test_a_grammar_waits_for_the_reasoning_to_end(loaded) -> None:  # type: ignore[no-untyped-def]
    """A thinking answer under a grammar: the reasoning is free (here ended by its budget),
    the grammar shapes what follows the end token; both schedulings (the end token's step is
    read before the next step samples)."""
    from server.config import Settings
    from server.engine.engine import AsyncEngine
    from server.engine.inputs import InputBuilder

    builder = InputBuilder(loaded.processor, loaded.image_token_id, loaded.video_token_id)
    prompt = builder.build([{"role": "user", "content": "Yes or no?"}], [])
    engine = AsyncEngine.build(loaded, Settings(model="unused", max_model_len=1024).engine_config())
    spec = StructuredOutput.choice(["yes", "no"])
    engine.compile_grammar(spec)
    end = 100  # (a stand-in for "</think>": the tiny vocabulary has none)
    params = SamplingParams(
        max_tokens=40,
        temperature=0,
        structured=spec,
        thinking_token_budget=3,
        think_end_token_id=end,
    )
    engine.start()
    try:
        seq = engine.add_request("r", prompt, params)
        seq.grammar = engine.runner.grammars.lookup(spec)
        last = [o async for o in engine.stream(seq)][-1]
    finally:
        await engine.stop()
    assert last.finish_reason == "stop", last
    reasoning, answer = seq.output_token_ids[:4], seq.output_token_ids[4:]
    assert reasoning[3] == end and end not in reasoning[:3]
    assert loaded.processor.tokenizer.decode(answer, skip_special_tokens=True) in ("yes", "no")


def _tokenizer():
    """A tiny real tokenizer for the grammar (the tiny checkpoint's)."""
    from transformers import AutoTokenizer

    from server.engine.tiny import make_tiny_checkpoint

    global _TOKENIZER
    if _TOKENIZER is None:
        import tempfile
        from pathlib import Path

        path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
        _TOKENIZER = AutoTokenizer.from_pretrained(path)
    return _TOKENIZER


_TOKENIZER = None


def test_repetition_penalty_comes_before_presence() -> None:
    """HF's and vLLM's order: 2.0 / 2 - 0.5 = 0.5 < 0.6 (the other order gives 0.75)."""
    logits = torch.zeros(1, VOCAB)
    logits[0, 0], logits[0, 20] = 2.0, 0.6  # token 20 is not in the prompt
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5)
    assert sample(logits, [state(params, outputs=(0,))]) == [20]


class RefusingMatcher:
    def fill_next_token_bitmask(self, bitmask, index=0):
        return True  # allows everything

    def accept_token(self, token: int) -> bool:
        return False

    def is_terminated(self) -> bool:
        return False


class DeadEndMatcher(RefusingMatcher):
    def fill_next_token_bitmask(self, bitmask, index=0):
        bitmask[index] = 0  # allows nothing
        return True


def test_a_token_the_grammar_refuses_fails_the_row() -> None:
    """A dead end (the grammar allowed no token: the constraint's fault, a 400) apart from a
    refusal of a token it allowed (ours: a 500)."""
    grammars = GrammarCache(_tokenizer(), VOCAB, (0,))
    refused = state(SamplingParams(temperature=0), grammars=grammars)
    refused.matcher = RefusingMatcher()
    dead_end = state(SamplingParams(temperature=0), grammars=grammars)
    dead_end.matcher = DeadEndMatcher()
    assert sample(torch.randn(2, VOCAB), [refused, dead_end]) == [FAILED, FAILED]
    assert (refused.failed_as, dead_end.failed_as) == ("error", "dead_end")


class SlowMatcher(RefusingMatcher):
    """Allows everything, accepts every token, and burns `cost` seconds of CPU per mask on the
    steps `slow_steps` names (a step counter: the matcher's own)."""

    def __init__(self, cost: float, slow_steps: range):
        self.cost, self.slow_steps, self.step = cost, slow_steps, 0

    def fill_next_token_bitmask(self, bitmask, index=0):
        if self.step in self.slow_steps:
            until = time.thread_time() + self.cost
            while time.thread_time() < until:
                pass
        self.step += 1
        return True

    def accept_token(self, token: int) -> bool:
        return True


def unpadded(rows: int, grammars: GrammarCache) -> torch.Tensor:
    """Random logits without the ids no grammar takes (the model's padding past the
    tokenizer's vocabulary), as a real matcher's mask leaves them: these matchers mask nothing."""
    logits = torch.randn(rows, VOCAB)
    logits[:, sorted(grammars.special_token_ids)] = float("-inf")
    return logits


class Every:
    """The steps of a slow pattern: those whose index modulo `period` is in `slow`."""

    def __init__(self, period: int, slow: range):
        self.period, self.slow = period, slow

    def __contains__(self, step: int) -> bool:
        return step % self.period in self.slow


def test_a_grammar_over_its_cpu_budget_on_most_tokens_fails_its_row_alone() -> None:
    """A grammar that takes more CPU than the budget on SLOW_GRAMMAR_STEPS of its last
    SLOW_GRAMMAR_WINDOW tokens fails its request (the constraint's fault), also one that is
    cheap now and then; a slow spell shorter than that, or a row without the budget, goes
    on."""
    grammars = GrammarCache(_tokenizer(), VOCAB, (0,), max_seconds_per_token=0.001)
    steps, window = sampler.SLOW_GRAMMAR_STEPS, sampler.SLOW_GRAMMAR_WINDOW
    slow = state(SamplingParams(temperature=0), grammars=grammars)
    slow.matcher = SlowMatcher(0.002, range(0, 100))
    mostly = state(SamplingParams(temperature=0), grammars=grammars)
    mostly.matcher = SlowMatcher(0.002, Every(window, range(1, window)))  # cheap 1 in 8
    spells = state(SamplingParams(temperature=0), grammars=grammars)
    spells.matcher = SlowMatcher(0.002, Every(window, range(steps - 1)))  # 4 of every 8
    plain = state(SamplingParams(temperature=0))
    rows = [slow, mostly, spells, plain]

    for step in range(steps - 1):
        assert FAILED not in sample(unpadded(4, grammars), rows), step
    tokens = sample(unpadded(4, grammars), rows)
    assert tokens[0] == FAILED and FAILED not in tokens[1:]
    assert slow.failed_as == "grammar_too_slow" and "--max-grammar-ms-per-token" in slow.failure
    assert FAILED in sample(unpadded(3, grammars), rows[1:])[:1]  # 5 of its first 6 slow
    for _ in range(3 * window):
        assert FAILED not in sample(unpadded(2, grammars), rows[2:])


def test_a_padding_id_is_refused_without_xgrammars_own_stderr_line(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A grammar that allowed nothing leaves the sampler any id, the model's padding past the
    tokenizer's vocabulary too: refused here, not by xgrammar's matcher, whose refusal is a
    line on stderr outside the log's format."""
    grammars = GrammarCache(_tokenizer(), VOCAB, (0,))
    padding = max(grammars.special_token_ids)
    row = state(SamplingParams(temperature=0), grammars=grammars)
    row.matcher = grammars.matcher(StructuredOutput("json_object"))
    assert sampler.advance(row, padding) == FAILED
    assert row.failure == f"the grammar refused token {padding}"
    assert "cannot accept special token" not in capfd.readouterr().err


def test_without_a_budget_a_slow_grammar_goes_on() -> None:
    grammars = GrammarCache(_tokenizer(), VOCAB, (0,))  # max_seconds_per_token 0: no limit
    slow = state(SamplingParams(temperature=0), grammars=grammars)
    slow.matcher = SlowMatcher(0.001, range(0, 100))
    for _ in range(sampler.SLOW_GRAMMAR_STEPS + 1):
        assert sample(unpadded(1, grammars), [slow]) != [FAILED]


def test_logprobs_ride_in_the_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that ask get the chosen token's raw logprob and the top k (log_softmax of the
    unprocessed logits); rows that do not ask get nothing; still one host transfer."""
    logits = torch.randn(4, VOCAB)
    logits[2, 11] = 50.0  # a penalty below makes another token win, yet the raw logprob stays
    states = mixed_states(4)
    asking = {
        1: SamplingParams(temperature=0.7, top_p=0.9, logprobs=3),
        2: SamplingParams(temperature=0, frequency_penalty=2.0, logprobs=0),
    }
    for row, params in asking.items():
        states[row] = state(params, outputs=(11,) * 30)
    calls: Counter[str] = Counter()
    original = torch.Tensor.tolist
    monkeypatch.setattr(
        torch.Tensor, "tolist", lambda self: calls.update(["tolist"]) or original(self)
    )
    tokens = sample(logits.clone(), states)
    monkeypatch.undo()
    assert calls == {"tolist": 1}
    raw = torch.log_softmax(logits, dim=-1)
    assert states[0].logprobs is None and states[3].logprobs is None
    one = states[1].logprobs
    assert one is not None and len(one.top) == 3
    assert abs(one.logprob - raw[1, tokens[1]].item()) < 1e-5
    top = torch.topk(raw[1], 3)
    assert [t for t, _ in one.top] == top.indices.tolist()
    assert all(abs(lp - v) < 1e-5 for (_, lp), v in zip(one.top, top.values.tolist(), strict=True))
    two = states[2].logprobs
    assert tokens[2] != 11 and two is not None and two.top == ()
    assert abs(two.logprob - raw[2, tokens[2]].item()) < 1e-5


@pytest.mark.usefixtures("draw")
def test_broken_rows_still_give_a_token() -> None:
    logits = torch.randn(3, VOCAB)
    logits[1] = float("nan")
    logits[1, 17] = float("inf")  # everything else broken: only 17 can come out
    logits[2] = float("-inf")  # no distribution at all: still a token, and no error
    states = [state(SamplingParams(temperature=1.0, seed=i)) for i in range(3)]
    tokens = sample(logits, states)
    assert tokens[1] == 17 and all(0 <= t < VOCAB for t in tokens)


@pytest.mark.usefixtures("draw")
def test_min_p_drops_the_unlikely_tokens() -> None:
    """min_p 0.25: tokens under a quarter of the likeliest's probability (0.05 < 0.125, 0.1 <
    0.125) are never drawn; the rest keep their relative odds."""
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.35, 0.1, 0.05] + [1e-12] * (VOCAB - 4)))
    draws = 3000
    states = [state(SamplingParams(temperature=1.0, min_p=0.25)) for _ in range(draws)]
    tokens = Counter(sample(logits.repeat(draws, 1), states))
    assert set(tokens) == {0, 1}, tokens
    assert abs(tokens[0] / draws - 0.5 / 0.85) < 0.03, tokens
    # and without it, the third token does come up
    states = [state(SamplingParams(temperature=1.0)) for _ in range(draws)]
    assert 2 in Counter(sample(logits.repeat(draws, 1), states))


def test_logit_bias_and_allowed_tokens() -> None:
    logits = torch.zeros(4, VOCAB)
    logits[:, 7] = 5.0
    states = [
        state(SamplingParams(temperature=0, logit_bias=((11, 100.0),))),
        state(SamplingParams(temperature=0, logit_bias=((7, -100.0), (12, 1.0)))),
        state(SamplingParams(temperature=0, allowed_token_ids=(20, 21))),
        state(SamplingParams(temperature=0)),  # the batch's other rows change nothing here
    ]
    logits[2, 21] = 0.5
    assert sample(logits.clone(), states) == [11, 12, 21, 7]
    # sampled rows too: only the allowed tokens, whatever the logits say
    draws = [state(SamplingParams(temperature=1.0, allowed_token_ids=(3, 900))) for _ in range(200)]
    assert set(sample(torch.randn(200, VOCAB), draws)) == {3, 900}


def test_logprobs_are_the_raw_distribution_before_the_bias() -> None:
    logits = torch.randn(1, VOCAB)
    raw = torch.log_softmax(logits, dim=-1)
    params = SamplingParams(temperature=0, logprobs=0, logit_bias=((5, 100.0),))
    states = [state(params)]
    assert sample(logits.clone(), states) == [5]
    assert states[0].logprobs.logprob == pytest.approx(float(raw[0, 5]), abs=1e-5)


@pytest.mark.usefixtures("draw")
def test_a_forced_token_wins_over_bans_bias_and_penalties() -> None:
    """A thinking budget's end: the forced row takes its token (id 0 too) whatever its
    logits, bans, allowed ids or penalties say; the batch's other rows are untouched."""
    logits = torch.randn(4, VOCAB)
    logits[:, 7] = 50.0
    states = [
        state(SamplingParams(temperature=0, allowed_token_ids=(7,)), forced_token_id=0),
        state(SamplingParams(temperature=1.2, top_p=0.5, presence_penalty=2), outputs=(9,)),
        state(SamplingParams(temperature=0.8, seed=3, repetition_penalty=2.0), outputs=(9,)),
        state(SamplingParams(temperature=0)),
    ]
    states[1].forced_token_id, states[2].forced_token_id = 9, 9
    states[2].banned_token_ids = (9,)
    assert sample(logits.clone(), states) == [0, 9, 9, 7]


def test_the_thinking_budget_forces_the_end_once() -> None:
    """thinking_end: nothing before the budget; the end token at it while the reasoning goes
    on; nothing once the end was written (forced or by the model itself)."""
    params = SamplingParams(thinking_token_budget=3, think_end_token_id=99)
    budgeted = state(params)
    outputs: list[int] = []
    forced = []
    for token in [5, 6, 7, None, 8, 9]:
        forced.append(sampler.thinking_end(budgeted, outputs))
        outputs.append(token if forced[-1] is None else forced[-1])
    assert forced == [None, None, None, 99, None, None] and outputs[3] == 99
    ended_early = state(params)
    assert sampler.thinking_end(ended_early, [5, 99, 6]) is None and ended_early.thinking_over
    for unbudgeted in (
        SamplingParams(think_end_token_id=99),
        SamplingParams(thinking_token_budget=0),
    ):
        assert sampler.thinking_end(state(unbudgeted), [5, 6, 7]) is None
