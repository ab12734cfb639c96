"""OpenAI's logit_bias and vLLM's min_p, allowed_token_ids, bad_words and
include_stop_str_in_output, through the API on the tiny checkpoint (its answers are random;
these fields make them not)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from tests.api.test_errors import assert_error

pytestmark = pytest.mark.anyio


def chat(**extra: object) -> dict:
    messages = [{"role": "user", "content": "Say something."}]
    return {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0, **extra}


async def content(client: httpx.AsyncClient, body: dict) -> str:
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def test_logit_bias_forces_and_forbids_tokens(client: httpx.AsyncClient, tokenizer) -> None:
    a, b = (str(tokenizer.convert_tokens_to_ids(t)) for t in ("a", "b"))
    assert await content(client, chat(logit_bias={a: 100, b: 99})) == "aaaa"
    assert await content(client, chat(logit_bias={a: -100, b: 99})) == "bbbb"


async def test_logit_bias_on_text_completions(client: httpx.AsyncClient, tokenizer) -> None:
    token = tokenizer.convert_tokens_to_ids("b")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 3, "temperature": 0.9, "seed": 1}
    response = await client.post("/v1/completions", json={**body, "logit_bias": {str(token): 100}})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "bbb"


async def test_allowed_token_ids_limit_the_answer(client: httpx.AsyncClient, tokenizer) -> None:
    allowed = [tokenizer.convert_tokens_to_ids(t) for t in ("x", "y")]
    body = chat(allowed_token_ids=allowed, temperature=1.0, seed=3, max_tokens=12)
    assert set(await content(client, body)) <= {"x", "y"}


async def test_allowed_token_ids_that_min_tokens_bans_are_a_400(
    client: httpx.AsyncClient, tokenizer
) -> None:
    """Only enders allowed, and min_tokens bans the enders: no token is left to generate."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    x = tokenizer.convert_tokens_to_ids("x")
    for extra in ({"allowed_token_ids": [eos]}, {"allowed_token_ids": [x], "stop_token_ids": [x]}):
        response = await client.post("/v1/chat/completions", json=chat(min_tokens=2, **extra))
        assert_error(response, 400, "allowed_token_ids")
        assert await content(client, chat(**extra)) == ""  # without min_tokens: ends at once


async def test_allowed_token_ids_with_a_grammar_or_empty_are_400s(
    client: httpx.AsyncClient, tokenizer
) -> None:
    """A grammar and a list of allowed tokens can leave no token to generate (a failure deep
    into the answer): the two are not combined; an empty list would allow nothing."""
    x = tokenizer.convert_tokens_to_ids("x")
    json_object = {"response_format": {"type": "json_object"}}
    for extra in (json_object, {"guided_choice": ["yes", "no"]}):
        response = await client.post(
            "/v1/chat/completions", json=chat(allowed_token_ids=[x], **extra)
        )
        assert_error(response, 400, "allowed_token_ids")
    response = await client.post("/v1/chat/completions", json=chat(allowed_token_ids=[]))
    assert_error(response, 400, "allowed_token_ids")


async def test_bad_words_are_never_completed(client: httpx.AsyncClient, tokenizer) -> None:
    """vLLM's bad_words: a one-token word is never chosen; a longer one's last token is
    banned only right after the rest of it (the forced answer "aaaa" becomes "abab")."""
    a, b = (str(tokenizer.convert_tokens_to_ids(t)) for t in ("a", "b"))
    forced = chat(logit_bias={a: 100, b: 99})
    assert await content(client, forced) == "aaaa"
    assert await content(client, {**forced, "bad_words": ["a"]}) == "bbbb"
    assert await content(client, {**forced, "bad_words": ["aa"]}) == "abab"
    # "ab" and "ba" are one token each, neither of which the forced answer writes
    assert await content(client, {**forced, "bad_words": ["ab", "ba"]}) == "aaaa"
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, "temperature": 0}
    body |= {"logit_bias": {a: 100, b: 99}, "bad_words": [" aa"]}  # "aa" too, without the space
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "abab"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"bad_words": ["  "]}, "bad_words"),  # no tokens to ban
        ({"bad_words": [""]}, "bad_words[0]"),
        ({"bad_words": ["w"] * 65}, "bad_words"),
        ({"bad_words": ["a"], "response_format": {"type": "json_object"}}, "bad_words"),
        ({"bad_words": ["a"], "guided_choice": ["yes", "no"]}, "bad_words"),
        ({"bad_words": ["x", "y"], "allowed_token_ids": "xy"}, "allowed_token_ids"),
    ],
)
async def test_bad_words_that_cannot_be_honoured_are_400s(
    client: httpx.AsyncClient, tokenizer, extra: dict, param: str
) -> None:
    if extra.get("allowed_token_ids") == "xy":  # banned entirely: nothing left to generate
        extra = {**extra, "allowed_token_ids": [tokenizer.convert_tokens_to_ids(t) for t in "xy"]}
    response = await client.post("/v1/chat/completions", json=chat(**extra))
    assert_error(response, 400, param)


def never_twice(n: int, length: int, preferred: str = "abcd") -> str:
    """The greedy answer over `preferred` (likeliest first) that holds no n-gram twice."""
    out: list[str] = []
    for _ in range(length):
        tail = out[len(out) - n + 1 :] if n > 1 else []
        seen = range(len(out) - n + 1)
        banned = {out[i + n - 1] for i in seen if out[i : i + n - 1] == tail}
        out.append(next(token for token in preferred if token not in banned))
    return "".join(out)


async def test_no_repeat_ngram_size_holds_no_ngram_twice(
    client: httpx.AsyncClient, tokenizer
) -> None:
    """transformers' no_repeat_ngram_size, as MinerU's client sends it in vLLM's vllm_xargs
    (with its other sampling fields, and a key no processor here reads, which changes
    nothing), or by its generate() name: the forced answer "aaaaaaaa" never repeats n tokens."""
    bias = {str(tokenizer.convert_tokens_to_ids(t)): 100 - i for i, t in enumerate("abcd")}
    forced = chat(logit_bias=bias, max_tokens=8)
    assert await content(client, forced) == "aaaaaaaa"
    mineru = {"top_p": 0.01, "top_k": 1, "repetition_penalty": 1.0, "skip_special_tokens": False}
    for n in (1, 2, 3):
        length = 4 if n == 1 else 8  # (four tokens to choose from, each once)
        expected = never_twice(n, length)
        xargs = {"vllm_xargs": {"no_repeat_ngram_size": n, "debug": False}}
        body = {**forced, "max_tokens": length}
        assert await content(client, {**body, **xargs, **mineru}) == expected
        assert await content(client, {**body, "no_repeat_ngram_size": n}) == expected
        response = await client.post("/v1/chat/completions", json={**body, **xargs, "n": 2})
        choices = response.json()["choices"]  # (each its own answer's n-grams)
        assert [c["message"]["content"] for c in choices] == [expected, expected]
        text = {"model": "tiny", "prompt": "x", "max_tokens": length, "temperature": 0}
        response = await client.post("/v1/completions", json={**text, **xargs, "logit_bias": bias})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected
    assert never_twice(2, 8) == "aabacada"  # (the reference itself)
    for off in (0, -1):
        xargs = {"no_repeat_ngram_size": off, "k": [1, "x", 2.5]}
        assert await content(client, {**forced, "vllm_xargs": xargs}) == "aaaaaaaa"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"vllm_xargs": {"no_repeat_ngram_size": "3"}}, "vllm_xargs.no_repeat_ngram_size"),
        ({"no_repeat_ngram_size": 2.5}, "no_repeat_ngram_size"),
        ({"vllm_xargs": {"no_repeat_ngram_size": True}}, "vllm_xargs.no_repeat_ngram_size"),
        ({"vllm_xargs": {f"k{i}": i for i in range(65)}}, "vllm_xargs"),
        ({"vllm_xargs": {"k": {"nested": 1}}}, "vllm_xargs.k"),
        ({"vllm_xargs": [3]}, "vllm_xargs"),
        (
            {"vllm_xargs": {"no_repeat_ngram_size": 3}, "response_format": {"type": "json_object"}},
            "vllm_xargs.no_repeat_ngram_size",
        ),
    ],
)
async def test_vllm_xargs_that_cannot_be_read_are_400s(
    client: httpx.AsyncClient, extra: dict, param: str
) -> None:
    response = await client.post("/v1/chat/completions", json=chat(**extra))
    error = assert_error(response, 400)
    assert error["param"] == param or error["param"].startswith(f"{param}."), error


async def test_skip_special_tokens_false_keeps_them_in_the_text(
    client: httpx.AsyncClient, tokenizer
) -> None:
    """vLLM's skip_special_tokens: false shows the special tokens the answer holds (EOS, which
    ends it, is never text); spaces_between_special_tokens changes nothing (fast tokenizers)."""
    special = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    a = tokenizer.convert_tokens_to_ids("a")
    twice = ["<|vision_start|>" * 2]  # a bad word: the forced answer alternates
    body = chat(logit_bias={str(special): 100, str(a): 99}, bad_words=twice)
    assert await content(client, body) == "aa"  # the special tokens dropped
    kept = "<|vision_start|>a" * 2  # the special token as text, as vLLM shows it
    assert await content(client, {**body, "skip_special_tokens": False}) == kept
    both = {**body, "skip_special_tokens": False, "spaces_between_special_tokens": False}
    assert await content(client, both) == kept
    completion = {"model": "tiny", "prompt": "x", "max_tokens": 4, "temperature": 0}
    completion |= {"logit_bias": body["logit_bias"], "skip_special_tokens": False}
    response = await client.post("/v1/completions", json=completion | {"bad_words": twice})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == kept


async def test_include_stop_str_in_output_keeps_an_ending_tokens_text(
    client: httpx.AsyncClient, tokenizer
) -> None:
    """vLLM's: with include_stop_str_in_output the token that ended the answer is text too (a
    stop_token_ids token; EOS, which is text only with skip_special_tokens false)."""
    a = tokenizer.convert_tokens_to_ids("a")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    body = chat(logit_bias={str(a): 100}, stop_token_ids=[a])
    assert await content(client, body) == ""
    assert await content(client, {**body, "include_stop_str_in_output": True}) == "a"
    ends = chat(logit_bias={str(eos): 100}, include_stop_str_in_output=True)
    assert await content(client, ends) == ""
    assert await content(client, {**ends, "skip_special_tokens": False}) == "<|im_end|>"
    assert await content(client, {**ends, "include_stop_str_in_output": False}) == ""


async def test_stop_token_ids_may_be_written_as_digits(
    client: httpx.AsyncClient, tokenizer
) -> None:
    """evalscope's --stop-token-ids sends its ids as strings ("151645"), as vLLM reads them;
    any other string is still a 400 naming it."""
    a = tokenizer.convert_tokens_to_ids("a")
    body = chat(logit_bias={str(a): 100}, include_stop_str_in_output=True)
    assert await content(client, body | {"stop_token_ids": [str(a)]}) == "a"
    for bad in ("-1", "1.0", "x", "", "１２"):
        response = await client.post("/v1/chat/completions", json=body | {"stop_token_ids": [bad]})
        assert_error(response, 400, "stop_token_ids[0]")
    completion = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "stop_token_ids": [str(a)]}
    response = await client.post("/v1/completions", json=completion | {"logit_bias": {str(a): 100}})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "stop"


async def test_min_p_is_honoured_and_checked(client: httpx.AsyncClient) -> None:
    # min_p 1: only the likeliest token survives, so sampling is greedy
    greedy = await content(client, chat(max_tokens=8))
    assert await content(client, chat(max_tokens=8, temperature=1.0, min_p=1.0)) == greedy
    response = await client.post("/v1/chat/completions", json=chat(min_p=1.5))
    assert_error(response, 400, "min_p")


async def test_top_p_0_takes_the_likeliest_token(client: httpx.AsyncClient) -> None:
    """OpenAI takes top_p from 0 (Open WebUI's slider starts there): the nucleus keeps only
    the likeliest token, so sampling is greedy; past 1 it is a 400."""
    greedy = await content(client, chat(max_tokens=8))
    assert await content(client, chat(max_tokens=8, temperature=1.0, top_p=0, seed=3)) == greedy
    assert_error(await client.post("/v1/chat/completions", json=chat(top_p=1.5)), 400, "top_p")
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 4, "top_p": 0}
    answer = (await client.post("/v1/responses", json=body)).json()
    assert answer["top_p"] == 0  # (as sent)


async def test_llama_cpp_options_a_front_end_sends_are_read_or_change_nothing(
    client: httpx.AsyncClient,
) -> None:
    """Open WebUI sends its advanced parameters, llama.cpp's and Ollama's names, to every
    connection: repeat_penalty is repetition_penalty; the others change nothing. Another
    unknown field is still a 400."""
    sampled = chat(max_tokens=8, temperature=1.0, seed=5)
    penalised = await content(client, {**sampled, "repetition_penalty": 1.8})
    assert await content(client, {**sampled, "repeat_penalty": 1.8}) == penalised
    plain = await content(client, sampled)
    assert penalised != plain  # (so the alias is seen to be read)
    owui = {"mirostat": 0, "mirostat_eta": 0.1, "tfs_z": 1, "repeat_last_n": 64, "num_ctx": 2048}
    owui |= {"num_predict": 8, "keep_alive": "5m", "use_mmap": True, "think": False}
    assert await content(client, {**sampled, **owui}) == plain
    text = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "mirostat": 0, "repeat_penalty": 1.1}
    assert (await client.post("/v1/completions", json=text)).status_code == 200
    responses = {"model": "tiny", "input": "Hi", "max_output_tokens": 2, "tfs_z": 1}
    assert (await client.post("/v1/responses", json=responses)).status_code == 200
    typo = await client.post("/v1/chat/completions", json={**sampled, "repeat_penalti": 1.1})
    assert_error(typo, 400, "repeat_penalti")
    bad = await client.post("/v1/chat/completions", json={**sampled, "repeat_penalty": 0})
    assert_error(bad, 400, "repeat_penalty")  # (named as sent)
    both = {**sampled, "repeat_penalty": 1.1, "repetition_penalty": 1.2}
    assert_error(await client.post("/v1/chat/completions", json=both), 400, "repeat_penalty")
    responses = {**responses, "repeat_penalty": 1.8, "temperature": 1.0, "seed": 5}
    assert (await client.post("/v1/responses", json=responses)).status_code == 200


async def test_include_stop_str_in_output(client: httpx.AsyncClient, tokenizer) -> None:
    forced = {str(tokenizer.convert_tokens_to_ids("a")): 100}
    body = chat(max_tokens=6, logit_bias=forced, stop=["xaa", "aaa"])
    assert await content(client, body) == ""
    assert await content(client, {**body, "include_stop_str_in_output": True}) == "aaa"


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("logit_bias", {"abc": 1}, "logit_bias"),  # keys are token ids
        ("logit_bias", {"\u00b2": 1}, "logit_bias"),  # a digit to str.isdigit, not to int()
        ("logit_bias", {"5": 101}, "logit_bias.5"),  # OpenAI's range: -100..100
        ("logit_bias", {"99999999": 1}, "logit_bias"),  # beyond the vocabulary
        ("logit_bias", {"15": 60, "015": 60}, "logit_bias"),  # one token, biased twice
        ("allowed_token_ids", [99999999], "allowed_token_ids"),
        ("allowed_token_ids", [-1], "allowed_token_ids[0]"),
    ],
)
async def test_bad_values_are_400s_naming_the_field(
    client: httpx.AsyncClient, field: str, value: object, param: str
) -> None:
    response = await client.post("/v1/chat/completions", json=chat(**{field: value}))
    assert_error(response, 400, param)


def test_sampling_defaults_from_a_generation_config() -> None:
    """The fields vLLM reads from generation_config.json; the ones the file leaves out keep
    the base (OpenAI's); a request's own values (null = left out) win over both."""
    from transformers import GenerationConfig

    from server.api.protocol import OPENAI_DEFAULTS, ChatCompletionRequest
    from server.engine.sampling import SamplingDefaults

    qwen = GenerationConfig(top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05)
    defaults = SamplingDefaults.from_generation_config(qwen, OPENAI_DEFAULTS)
    assert defaults == SamplingDefaults(0.1, 0.001, 1, 0.0, 1.05)
    assert SamplingDefaults.from_generation_config(GenerationConfig(), OPENAI_DEFAULTS) == (
        OPENAI_DEFAULTS
    )

    class Odd:  # what no request could ask for is not taken from a file either
        def to_diff_dict(self) -> dict:
            return {"temperature": 7.0, "top_p": 0.0, "top_k": -1, "min_p": 0.05}

    odd = SamplingDefaults.from_generation_config(Odd(), OPENAI_DEFAULTS)
    assert odd == SamplingDefaults(min_p=0.05)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    left_out = ChatCompletionRequest(**body, top_p=None).to_sampling_params(defaults)
    assert (left_out.temperature, left_out.top_p, left_out.top_k) == (0.1, 0.001, 1)
    assert left_out.repetition_penalty == 1.05
    own = ChatCompletionRequest(**body, temperature=0.9, top_k=-1, repetition_penalty=1.0)
    sampling = own.to_sampling_params(defaults)
    assert (sampling.temperature, sampling.top_k, sampling.repetition_penalty) == (0.9, 0, 1.0)


async def test_generation_config_auto_takes_the_checkpoints_defaults(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """--generation-config auto: a checkpoint asking for top_k 1 answers greedily whatever
    the seed when the request leaves top_k out; so does a folder's generation_config.json, or
    --override-generation-config over OpenAI's; the default (openai) samples at temperature 1."""
    import json
    import shutil

    from tests.helpers import make_settings, start_client

    path = tmp_path / "near-greedy"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "top_k": 1}))
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 8,
        "ignore_eos": True,
    }
    folder = tmp_path / "defaults"
    folder.mkdir()
    (folder / "generation_config.json").write_text('{"top_k": 1}')
    modes = {
        "auto": {"generation_config": "auto"},
        "folder": {"model": str(tiny_model_dir), "generation_config": str(folder)},
        "override": {"override_generation_config": '{"top_k": 1, "temperature": 0.9}'},
        "openai": {"generation_config": "openai"},
    }
    for mode, options in modes.items():
        async for client in start_client(make_settings(path, **options)):
            answers = {await content(client, {**body, "seed": seed}) for seed in (1, 2, 3)}
            greedy = await content(client, {**body, "temperature": 0})
            if mode != "openai":
                assert answers == {greedy}
                # the request's own top_k wins: sampling again
                assert (
                    len({await content(client, {**body, "seed": s, "top_k": 0}) for s in (1, 2)})
                    == 2
                )
            else:
                assert len(answers) == 3


async def test_return_tokens_as_token_ids(client: httpx.AsyncClient, tokenizer) -> None:
    """vLLM's: every logprobs token as "token_id:{id}" (chat, streamed chat, text completions
    with echo), the same ids the plain run's texts tokenize to."""
    forced = str(tokenizer.convert_tokens_to_ids("a"))
    body = chat(max_tokens=3, logprobs=True, top_logprobs=2, logit_bias={forced: 100})
    response = await client.post("/v1/chat/completions", json=body)
    plain = response.json()["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in plain] == ["a", "a", "a"]
    response = await client.post(
        "/v1/chat/completions", json={**body, "return_tokens_as_token_ids": True}
    )
    shown = response.json()["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in shown] == [f"token_id:{forced}"] * 3
    assert shown[0]["bytes"] == list(f"token_id:{forced}".encode())
    assert all(top["token"].startswith("token_id:") for t in shown for top in t["top_logprobs"])
    assert [t["logprob"] for t in shown] == [t["logprob"] for t in plain]
    async with client.stream(
        "POST",
        "/v1/chat/completions",
        json={**body, "return_tokens_as_token_ids": True, "stream": True},
    ) as stream:
        lines = [line async for line in stream.aiter_lines() if line.startswith("data: {")]
    choices = [c for line in lines for c in json.loads(line[6:])["choices"]]
    streamed = [t["token"] for c in choices if c.get("logprobs") for t in c["logprobs"]["content"]]
    assert streamed == [f"token_id:{forced}"] * 3
    completion = {
        "model": "tiny",
        "prompt": "Hi",
        "max_tokens": 2,
        "logprobs": 1,
        "echo": True,
        "logit_bias": {forced: 100},
        "return_tokens_as_token_ids": True,
    }
    response = await client.post("/v1/completions", json=completion)
    tokens = response.json()["choices"][0]["logprobs"]["tokens"]
    hi = tokenizer("Hi")["input_ids"]
    assert tokens == [f"token_id:{t}" for t in hi] + [f"token_id:{forced}"] * 2


async def test_min_tokens_without_max_tokens(client: httpx.AsyncClient) -> None:
    """Without max_tokens the answer may take the rest of the context (here the server's
    default of 16): a min_tokens above the default is met, one past what the context leaves
    is a 400 naming min_tokens (vLLM's), not an answer cut short of it."""
    body = chat(min_tokens=20)
    del body["max_tokens"]
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 20
    context = client.app.state.services.engine.max_seq_len  # type: ignore[attr-defined]
    response = await client.post("/v1/chat/completions", json={**body, "min_tokens": context})
    error = assert_error(response, 400, "min_tokens", "context_length_exceeded")
    assert "leaves after the prompt" in error["message"]


async def test_a_length_past_the_context_names_the_field_sent(client: httpx.AsyncClient) -> None:
    context = client.app.state.services.engine.max_seq_len  # type: ignore[attr-defined]
    for field in ("max_tokens", "max_completion_tokens"):
        body = {k: v for k, v in chat().items() if k != "max_tokens"} | {field: context}
        for stream in (False, True):
            response = await client.post("/v1/chat/completions", json={**body, "stream": stream})
            assert_error(response, 400, field, "context_length_exceeded")
