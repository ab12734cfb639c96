"""Sampler: last-position logits of a batch -> one next token per sequence.

Every sequence in a batch has its own parameters and, when it gives a seed, its own
torch.Generator, so its output does not depend on what else shares the batch.
Penalties follow OpenAI (presence / frequency, over generated tokens) and HF (repetition,
over prompt and generated tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from server.engine.sampling import SamplingParams
from server.engine.structured import GrammarCache


@dataclass
class SamplingState:
    """Per-sequence sampling inputs the runner keeps between steps."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: torch.Tensor  # 1-D, on the model's device
    output_token_ids: list[int]
    banned_token_ids: tuple[int, ...] = ()  # e.g. EOS until min_tokens is reached
    matcher: Any = None  # xgrammar GrammarMatcher for structured output
    grammars: GrammarCache | None = None


def apply_penalties(logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
    params = state.params
    device = logits.device
    output = torch.tensor(state.output_token_ids, dtype=torch.long, device=device)
    if params.repetition_penalty != 1.0:
        seen = torch.cat([state.prompt_token_ids, output]).unique()
        scores = logits[seen]
        scores = torch.where(
            scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty
        )
        logits[seen] = scores
    if (params.presence_penalty or params.frequency_penalty) and output.numel():
        counts = torch.bincount(output, minlength=logits.shape[-1])[: logits.shape[-1]]
        logits -= params.frequency_penalty * counts.to(logits.dtype)
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the ones before it already reach top_p (the first always stays).
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample_one(logits: torch.Tensor, state: SamplingState) -> int:
    """logits: [vocab] float32 for one sequence (banned tokens already masked)."""
    params = state.params
    logits = apply_penalties(logits, state)
    if params.is_greedy:
        return int(torch.argmax(logits))
    scaled = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    # Extreme (schema-valid) parameters can overflow: a row must never fail the whole batch.
    scaled = torch.nan_to_num(scaled, nan=float("-inf"), posinf=torch.finfo(scaled.dtype).max)
    probs = torch.softmax(scaled, dim=-1)
    if not torch.isfinite(probs).all() or float(probs.sum()) <= 0:
        return int(torch.argmax(torch.nan_to_num(logits, nan=float("-inf"))))
    return int(torch.multinomial(probs, 1, generator=state.generator))


def sample(logits: torch.Tensor, states: list[SamplingState]) -> list[int]:
    """logits: [batch, vocab]. Greedy rows without penalties share one batched argmax; the
    others (sampling, penalties) are done row by row with their own generator."""
    logits = logits.float()
    for row, state in enumerate(states):
        if state.matcher is not None and state.grammars is not None:
            state.grammars.mask_logits(state.matcher, logits[row])
    banned = [(row, token) for row, s in enumerate(states) for token in s.banned_token_ids]
    if banned:
        rows, tokens = zip(*banned, strict=True)
        logits[list(rows), list(tokens)] = float("-inf")
    plain_greedy = [s.params.is_greedy and not s.params.has_penalties for s in states]
    argmax = torch.argmax(logits, dim=-1).tolist() if any(plain_greedy) else []
    tokens = [
        argmax[i] if plain else sample_one(logits[i].clone(), state)
        for i, (plain, state) in enumerate(zip(plain_greedy, states, strict=True))
    ]
    for token, state in zip(tokens, states, strict=True):
        if state.matcher is not None and not state.matcher.is_terminated():
            state.matcher.accept_token(token)
    return tokens


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None  # the global generator: fresh randomness
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
