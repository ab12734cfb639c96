"""Sampler: last-position logits of a batch -> one next token per sequence, batched.

Every row keeps its own parameters, and a seeded row its own torch.Generator, so a request's
output does not depend on what else shares the batch. The whole batch is handled with a fixed
number of tensor operations (the per-row parameters become tensors once per step): grammar
masks filled on the host and applied together, penalties from one scatter_add over the rows'
tokens, one sort for top-k/top-p (skipped when no row asks), and sampling by the exponential
race `argmax(p / Exp(1))`, which needs no host round trip. The sampler's only device->host
transfer is the chosen ids; rows that ask for logprobs add their values to that same
transfer (one float tensor), computed for those rows only. `sample_async` queues all of it
and returns at once: the ids stay on the device for the next step's inputs (async
scheduling) while they travel to the host.

Logprobs describe the model's raw distribution, log_softmax of the logits before grammars,
bans, penalties, temperature and truncation (vLLM's default, `logprobs_mode=raw_logprobs`).

Penalties follow OpenAI (presence / frequency, over generated tokens) and HF (repetition, over
prompt and generated tokens).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.bad_words import BadWords
from server.engine.repeated_ngrams import RepeatedNgrams
from server.engine.sampling import SamplingParams, TokenLogprobs
from server.engine.structured import GrammarCache
from server.engine.transfer import HostCopy, to_device

FAILED = -1  # the token of a row whose grammar failed: the engine fails that request alone
# A grammar over its budget on SLOW_GRAMMAR_STEPS of its last SLOW_GRAMMAR_WINDOW tokens fails
# its request (a slow step now and then is a hiccup, a garbage collection say; an ambiguous
# grammar is slow at most steps, and slower and slower)
SLOW_GRAMMAR_STEPS = 5
SLOW_GRAMMAR_WINDOW = 8
# The exponential race on a CPU too (tests run both draws there); a GPU always races.
RACE_ON_CPU = False
MIN_LOGPROB = -9999.0  # JSON has no -inf: an impossible token's logprob, as OpenAI and vLLM send


@dataclass
class SamplingState:
    """Per-sequence sampling inputs the runner keeps between steps."""

    params: SamplingParams
    generator: torch.Generator | None
    # [vocab] bool on the model's device: the prompt's tokens (repetition penalty only)
    prompt_seen: torch.Tensor | None
    output_token_ids: list[int]
    # [vocab] on the model's device, made once per sequence (a step only stacks the rows'):
    # the logit_bias as a dense bias, the allowed_token_ids as a mask
    bias: torch.Tensor | None = None
    allowed: torch.Tensor | None = None
    banned_token_ids: tuple[int, ...] = ()  # e.g. EOS until min_tokens is reached
    bad_words: BadWords | None = None  # the request's bad words, indexed (vLLM's bad_words)
    repeated: RepeatedNgrams | None = None  # the answer's n-grams (no_repeat_ngram_size)
    matcher: Any = None  # xgrammar GrammarMatcher for structured output
    # A thinking answer's grammar shapes what follows its reasoning: it waits (constrains
    # nothing, reads no token) until the reasoning's end token has been sampled.
    grammar_waits: bool = False
    grammars: GrammarCache | None = None
    logprobs: TokenLogprobs | None = None  # the last sampled token's (params.logprobs set)
    # The token this step must take whatever the logits say (a thinking budget's end); the
    # reasoning was seen to have ended (its budget applies no more).
    forced_token_id: int | None = None
    thinking_over: bool = False
    # Why its row was FAILED (the engine logs it under the request's id and fails the request)
    # and the finish reason that gives the request: "error" (ours), or the constraint's fault:
    # "dead_end" (its grammar allowed no next token), "grammar_too_slow" (see SLOW_GRAMMAR_STEPS)
    failure: str | None = None
    failed_as: str = "error"
    # CPU seconds its grammar matcher took this step (mask and advance), and whether each of
    # its last SLOW_GRAMMAR_WINDOW steps was over the budget
    grammar_seconds: float = 0.0
    slow_grammar_steps: deque[bool] = field(
        default_factory=lambda: deque(maxlen=SLOW_GRAMMAR_WINDOW)
    )

    @property
    def grammar_ended(self) -> bool:
        """Its grammar has taken its end token (the answer it shapes is complete)."""
        return self.matcher is not None and self.matcher.is_terminated()


def prompt_seen(
    params: SamplingParams, prompt: list[int], vocab: int, device: torch.device
) -> torch.Tensor | None:
    """The prompt's tokens as a [vocab] mask, made once per sequence; None without a
    repetition penalty (the only thing that reads the prompt)."""
    if params.repetition_penalty == 1.0:
        return None
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[torch.tensor(prompt, dtype=torch.long)] = True
    return to_device(seen, device)


def token_bias(params: SamplingParams, vocab: int, device: torch.device) -> torch.Tensor | None:
    """The logit_bias as a [vocab] tensor, made once per sequence; None without one."""
    if not params.logit_bias:
        return None
    ids, values = zip(*params.logit_bias, strict=True)
    bias = torch.zeros(vocab, dtype=torch.float32)
    bias[torch.tensor(ids, dtype=torch.long)] = torch.tensor(values, dtype=torch.float32)
    return to_device(bias, device)


def allowed_tokens(params: SamplingParams, vocab: int, device: torch.device) -> torch.Tensor | None:
    """The allowed_token_ids as a [vocab] mask, made once per sequence; None: any token."""
    if not params.allowed_token_ids:
        return None
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[torch.tensor(params.allowed_token_ids, dtype=torch.long)] = True
    return to_device(allowed, device)


def sample(logits: torch.Tensor, states: list[SamplingState]) -> list[int]:
    """logits: [batch, vocab] -> one token per row (FAILED for a row whose grammar failed)."""
    return sample_async(logits, states).tokens()


def sample_async(logits: torch.Tensor, states: list[SamplingState]) -> SampledTokens:
    """Queue the step's sampling on the device; the host reads the tokens later
    (`SampledTokens.tokens`), and the next step can read them on the device meanwhile."""
    logits = logits.float()
    asking = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    # Before grammars, bans and penalties change the logits in place: the raw distribution.
    raw = raw_logprobs(logits, asking) if asking else None
    failed = apply_grammars(logits, states)
    ban_tokens(logits, states)
    restrict_and_bias(logits, states)
    rows = [i for i, s in enumerate(states) if s.params.has_penalties]
    if rows:
        on_rows(logits, rows, lambda sub: apply_penalties(sub, [states[i] for i in rows]))
    force_tokens(logits, states)
    chosen = torch.argmax(logits, dim=-1)
    rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
    if rows:
        where = index(rows, logits)
        drawn = draw(logits.index_select(0, where), [states[i] for i in rows])
        chosen.index_copy_(0, where, drawn)
    return SampledTokens(chosen, pack(chosen, raw, asking, states), states, asking, failed)


class SampledTokens:
    """A step's sampled ids: on the device (`ids`, what the next step's decodes read), and
    on their way to the host in one copy, the step's one device -> host transfer."""

    def __init__(
        self,
        ids: torch.Tensor,
        packed: torch.Tensor,
        states: list[SamplingState],
        asking: list[int],
        failed: set[int],
    ):
        self.ids = ids
        self.states, self.asking, self.failed = states, asking, failed
        self.packed = HostCopy(packed)

    def tokens(self) -> list[int]:
        """Wait for the copy; then the rows' logprobs (state.logprobs), and each grammar
        advanced by its row's token (so: call it once)."""
        tokens = unpack(self.packed.get().tolist(), self.asking, self.states)
        for row, (token, state) in enumerate(zip(tokens, self.states, strict=True)):
            if row in self.failed:
                tokens[row] = FAILED
            elif state.grammar_waits:
                state.grammar_waits = token != state.params.think_end_token_id
            elif state.matcher is not None and not state.matcher.is_terminated():
                tokens[row] = advance(state, token)
        return tokens


def raw_logprobs(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """[len(rows), vocab] log_softmax of these rows' unprocessed logits."""
    if len(rows) < logits.shape[0]:
        logits = logits.index_select(0, index(rows, logits))
    return torch.log_softmax(logits, dim=-1)


def pack(
    chosen: torch.Tensor, raw: torch.Tensor | None, rows: list[int], states: list[SamplingState]
) -> torch.Tensor:
    """What the host needs of the step in one tensor: the chosen ids, and for rows that ask
    for logprobs the chosen logprobs, top-k values and top-k ids (float64: exact for any id)."""
    if raw is None:
        return chosen
    num_top = max(states[row].params.logprobs or 0 for row in rows)
    picked = raw.gather(1, chosen.index_select(0, index(rows, raw))[:, None])
    parts = [chosen.double(), picked.view(-1).double()]
    if num_top:
        top = torch.topk(raw, num_top, dim=-1)
        parts += [top.values.reshape(-1).double(), top.indices.reshape(-1).double()]
    return torch.cat(parts).nan_to_num_(nan=MIN_LOGPROB).clamp_(min=MIN_LOGPROB)


def unpack(values: list, rows: list[int], states: list[SamplingState]) -> list[int]:
    """`pack` read back: the chosen ids; rows that asked get their logprobs (state.logprobs)."""
    batch, num_rows = len(states), len(rows)
    if not rows:
        return [int(v) for v in values]
    num_top = max(states[row].params.logprobs or 0 for row in rows)
    top_values = values[batch + num_rows : batch + num_rows * (1 + num_top)]
    top_ids = values[batch + num_rows * (1 + num_top) :]
    for j, row in enumerate(rows):
        start = j * num_top
        wanted = range(start, start + (states[row].params.logprobs or 0))
        states[row].logprobs = TokenLogprobs.of(
            values[batch + j], ((int(top_ids[m]), top_values[m]) for m in wanted)
        )
    return [int(v) for v in values[:batch]]


def index(rows: list[int], like: torch.Tensor) -> torch.Tensor:
    return to_device(rows, like.device, torch.long)


def on_rows(logits: torch.Tensor, rows: list[int], change) -> None:
    """Apply `change` (in place, on a [len(rows), vocab] copy) to these rows only: the work
    is proportional to the rows that ask for it, in the same few operations for any batch."""
    if len(rows) == logits.shape[0]:
        change(logits)
        return
    where = index(rows, logits)
    sub = logits.index_select(0, where)
    change(sub)
    logits.index_copy_(0, where, sub)


def apply_grammars(logits: torch.Tensor, states: list[SamplingState]) -> set[int]:
    """Every constrained row's bitmask filled on the host, copied once, applied together.
    Returns the rows whose matcher failed (their request fails; the batch goes on)."""
    # A finished grammar (its end token taken: the answer ends there) constrains nothing more.
    rows = [
        i
        for i, s in enumerate(states)
        if s.matcher is not None
        and s.grammars is not None
        and not s.grammar_waits
        and not s.matcher.is_terminated()
    ]
    if not rows:
        return set()
    grammars = states[rows[0]].grammars
    assert grammars is not None
    bitmask = grammars.xgr.allocate_token_bitmask(len(states), grammars.vocab_size)
    failed = set()
    for row in rows:
        started = time.thread_time()
        try:
            states[row].matcher.fill_next_token_bitmask(bitmask, row)
        except Exception as exc:
            states[row].failure = _matcher_raised(exc)
            failed.add(row)
        states[row].grammar_seconds = time.thread_time() - started
    applied = [row for row in rows if row not in failed]
    if applied:
        grammars.apply(logits, bitmask, applied)
    return failed


def advance(state: SamplingState, token: int) -> int:
    """The row's grammar advanced by its token: the token, or FAILED (why: on the state) if
    the grammar refused it or has been too slow."""
    started = time.thread_time()
    try:
        # (a grammar that allowed nothing leaves any id to the sampler, padding's too)
        special = state.grammars is not None and token in state.grammars.special_token_ids
        accepted = not special and state.matcher.accept_token(token)
    except Exception as exc:
        state.failure = _matcher_raised(exc)
        accepted = False
    state.grammar_seconds += time.thread_time() - started
    if not accepted:
        state.failure = state.failure or f"the grammar refused token {token}"
        # (a grammar that allowed nothing: the constraint's fault, not ours)
        state.failed_as = "dead_end" if _allows_nothing(state) else "error"
        return FAILED
    return FAILED if _too_slow(state) else token


def _too_slow(state: SamplingState) -> bool:
    """Whether the row's grammar has cost more CPU than its budget on SLOW_GRAMMAR_STEPS of
    its last SLOW_GRAMMAR_WINDOW tokens. An ambiguous grammar (one text, many parses:
    `x ::= x x | "a"`) costs more at every token, and the engine thread that matches it is
    the one every request waits on: such a request fails alone before it slows the batch to
    a crawl. CPU time, not wall time: a busy machine does not fail a grammar that is cheap."""
    budget = state.grammars.max_seconds_per_token if state.grammars is not None else 0.0
    state.slow_grammar_steps.append(budget > 0 and state.grammar_seconds > budget)
    if sum(state.slow_grammar_steps) < SLOW_GRAMMAR_STEPS:
        return False
    state.failure = (
        f"its grammar took {state.grammar_seconds * 1000:.1f} ms of CPU for one token, over "
        f"the {budget * 1000:g} ms budget (--max-grammar-ms-per-token) on "
        f"{SLOW_GRAMMAR_STEPS} of its last {SLOW_GRAMMAR_WINDOW} tokens"
    )
    state.failed_as = "grammar_too_slow"
    return True


def _allows_nothing(state: SamplingState) -> bool:
    try:
        return state.grammars is not None and not state.grammars.allows_a_token(state.matcher)
    except Exception:  # (a matcher that raises is a failure of its own)
        return False


def _matcher_raised(exc: Exception) -> str:
    return f"the grammar matcher raised {type(exc).__name__}: {exc}"


def ban_tokens(logits: torch.Tensor, states: list[SamplingState]) -> None:
    banned = [(row, token) for row, s in enumerate(states) for token in s.banned_token_ids]
    if banned:
        rows, tokens = zip(*banned, strict=True)
        device = logits.device
        logits[to_device(rows, device, torch.long), to_device(tokens, device, torch.long)] = float(
            "-inf"
        )


def force_tokens(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """In place: a row with a forced token can take only that one (last, so that no ban,
    bias or penalty can leave the row without a token)."""
    forced = [(row, s.forced_token_id) for row, s in enumerate(states)]
    forced = [(row, token) for row, token in forced if token is not None]
    if forced:
        rows, tokens = zip(*forced, strict=True)
        where = index(list(rows), logits)
        logits.index_fill_(0, where, float("-inf"))
        logits[where, to_device(tokens, logits.device, torch.long)] = 0.0


def thinking_end(state: SamplingState, output_token_ids: list[int]) -> int | None:
    """The token that ends the reasoning when a thinking budget is spent and the reasoning
    still goes on (None otherwise). The answer is scanned for the end only from the budget on
    and until it is seen, so a long answer costs one scan, not one a step."""
    params = state.params
    budget, end = params.thinking_token_budget, params.think_end_token_id
    if budget is None or end is None or state.thinking_over or len(output_token_ids) < budget:
        return None
    state.thinking_over = end in output_token_ids
    return None if state.thinking_over else end


def restrict_and_bias(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """In place: rows with allowed_token_ids keep only those, then every row's logit_bias is
    added (OpenAI's and vLLM's order: before penalties and temperature; greedy rows too). The
    rows' masks and biases were made once per sequence: a step stacks them (no host work
    that grows with how many ids a request lists)."""
    rows = [i for i, s in enumerate(states) if s.allowed is not None]
    if rows:
        keep = torch.stack([states[i].allowed for i in rows])
        on_rows(logits, rows, lambda sub: sub.masked_fill_(~keep, float("-inf")))
    rows = [i for i, s in enumerate(states) if s.bias is not None]
    if rows:
        bias = torch.stack([states[i].bias for i in rows])
        on_rows(logits, rows, lambda sub: sub.add_(bias))


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """In place, for rows that have penalties: repetition over prompt + output first (HF's
    and vLLM's order), then frequency/presence over the output (a row's unused penalty
    changes nothing)."""
    vocab = logits.shape[-1]
    device = logits.device
    outputs = token_counts(padded([s.output_token_ids for s in states], vocab, device), vocab)
    if any(s.params.repetition_penalty != 1.0 for s in states):
        nothing = torch.zeros(vocab, dtype=torch.bool, device=device)
        masks = [s.prompt_seen if s.prompt_seen is not None else nothing for s in states]
        seen = torch.cat(masks).view(len(states), vocab) | (outputs > 0)
        # A penalty too small for float32 would be 0, and a masked -inf * 0 is NaN.
        smallest = torch.finfo(torch.float32).tiny
        penalties = [max(s.params.repetition_penalty, smallest) for s in states]
        penalty = to_device(penalties, device, torch.float32)[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalised, logits))
    frequency = to_device([s.params.frequency_penalty for s in states], device, torch.float32)
    presence = to_device([s.params.presence_penalty for s in states], device, torch.float32)
    logits -= frequency[:, None] * outputs + presence[:, None] * (outputs > 0)
    logits.nan_to_num_(nan=float("-inf"))  # extreme (schema-valid) values never pick NaN


def padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Host lists of token ids as one [batch, longest] tensor on the device (one copy)."""
    longest = max(1, max(len(r) for r in rows))
    return to_device([r + [pad] * (longest - len(r)) for r in rows], device, torch.long)


def token_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[batch, vocab] float counts of each row's ids (ids == vocab is padding, dropped)."""
    counts = torch.zeros((ids.shape[0], vocab + 1), dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def draw(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """[rows] sampled ids for rows that sample (temperature > 0): the exponential race on a
    GPU, the inverse of the cumulative distribution on a CPU; a row whose distribution is
    empty or not finite falls back to its argmax."""
    device = logits.device
    params = [s.params for s in states]
    temperature = to_device([p.temperature for p in params], device, torch.float32)
    scaled = logits / temperature[:, None]
    vocab = logits.shape[-1]
    min_p_rows = [i for i, p in enumerate(params) if p.min_p > 0.0]
    if min_p_rows:  # after the temperature, before top-k/top-p (vLLM's order)
        on_rows(scaled, min_p_rows, lambda sub: min_p(sub, [params[i].min_p for i in min_p_rows]))
    top_p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    top_k_rows = [i for i, p in enumerate(params) if p.top_p >= 1.0 and 0 < p.top_k < vocab]
    if top_p_rows:  # a sort, for these rows only
        on_rows(scaled, top_p_rows, lambda sub: top_k_top_p(sub, [params[i] for i in top_p_rows]))
    if top_k_rows:  # a top-k selection, cheaper than a sort
        on_rows(scaled, top_k_rows, lambda sub: top_k(sub, [params[i].top_k for i in top_k_rows]))
    scaled = torch.nan_to_num(scaled, nan=float("-inf"), posinf=torch.finfo(scaled.dtype).max)
    probs = torch.softmax(scaled, dim=-1)
    usable = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
    if device.type == "cpu" and not RACE_ON_CPU:
        drawn = inverse_cdf(probs, states, usable)
    else:
        drawn = exponential_race(probs, states)
    return torch.where(usable, drawn, torch.argmax(scaled, dim=-1))


def exponential_race(probs: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """argmax(p / Exp(1)) per row: a draw from p for every row at once, with no sort and no
    host sync (an exponential per vocabulary entry: cheap on a GPU, the bulk of a CPU step)."""
    noise = per_row_random(probs, states, lambda t, g: t.exponential_(generator=g))
    return torch.argmax(probs.div_(noise), dim=-1)


def inverse_cdf(
    probs: torch.Tensor, states: list[SamplingState], usable: torch.Tensor
) -> torch.Tensor:
    """The same draw on a CPU: one uniform number per row against the row's cumulative
    distribution (torch's multinomial races exponentials too, one per vocabulary entry, which
    was most of a CPU step). Rows that cannot be drawn from (their argmax is taken instead)
    get a placeholder."""
    safe = torch.where(usable[:, None], probs, torch.ones_like(probs))
    cdf = safe.double().cumsum_(dim=-1)
    shape = torch.empty((len(states), 1), dtype=torch.float64)
    uniform = per_row_random(shape, states, lambda t, g: t.uniform_(generator=g))
    drawn = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)[:, 0]
    return drawn.clamp_(max=probs.shape[-1] - 1)


def per_row_random(
    like: torch.Tensor,
    states: list[SamplingState],
    fill: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor],
) -> torch.Tensor:
    """Random numbers shaped like `like` ([rows, n]), made in place by `fill`: a seeded row's
    from its own generator (reproducible whatever shares the batch), the others' together from
    the global one."""
    out = torch.empty_like(like)
    unseeded = [row for row, s in enumerate(states) if s.generator is None]
    if len(unseeded) == len(states):
        return fill(out, None)
    for row, state in enumerate(states):
        if state.generator is not None:
            fill(out[row], state.generator)
    if unseeded:
        fresh = fill(like.new_empty((len(unseeded), like.shape[-1])), None)
        out.index_copy_(0, index(unseeded, out), fresh)
    return out


def min_p(scaled: torch.Tensor, values: list[float]) -> None:
    """In place: drop each row's tokens less likely than values[row] x its likeliest."""
    probs = scaled.softmax(dim=-1)
    floor = to_device(values, scaled.device, torch.float32)[:, None] * probs.amax(-1, keepdim=True)
    scaled.masked_fill_(probs < floor, float("-inf"))


def top_k(scaled: torch.Tensor, ks: list[int]) -> None:
    """In place: keep each row's ks[row] largest values (ties at the k-th kept)."""
    kth = torch.topk(scaled, max(ks), dim=-1).values  # [rows, largest k]
    threshold = kth.gather(1, to_device(ks, scaled.device, torch.long)[:, None] - 1)
    scaled.masked_fill_(scaled < threshold, float("-inf"))


def top_k_top_p(scaled: torch.Tensor, params: list[SamplingParams]) -> None:
    """In place, with one descending sort: keep each row's top_k (0: all), then the smallest
    prefix of what is left whose probability reaches top_p (the first token always stays),
    as HF and vLLM do."""
    vocab = scaled.shape[-1]
    device = scaled.device
    top_k = to_device(
        [p.top_k if 0 < p.top_k < vocab else vocab for p in params], device, torch.long
    )
    top_p = to_device([p.top_p for p in params], device, torch.float32)
    ordered, order = torch.sort(scaled, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    ordered = ordered.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = ordered.softmax(dim=-1)
    ordered = ordered.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p[:, None], float("-inf"))
    scaled.copy_(torch.full_like(scaled, float("-inf")).scatter(-1, order, ordered))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None  # the global generator: fresh randomness
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
