"""Prompt logprobs (vLLM's `prompt_logprobs`; what /v1/completions' echo with logprobs shows):
each prompt token's logprob given the tokens before it, and the k most likely tokens there,
from the model's raw distribution like the sampled tokens' logprobs.

A prompt chunk's hidden state at position p predicts token p + 1, so a chunk [start, end)
scores prompt tokens start + 1 .. min(end, num_prompt - 1): the last prompt position predicts
the first output token, which the sampler handles. Such a prompt takes no prefix-cache hits
(every position's logits are needed). The values cross to the host beside the step's sampled
ids, in one more non-blocking transfer (`PromptScores`), only in steps that hold such a chunk;
the engine stores them when it reads that step's tokens, before their first output. After a
preemption the prompt is computed again; what was recorded already is kept once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.sampler import MIN_LOGPROB
from server.engine.sampling import TokenLogprobs
from server.engine.sequence import Sequence
from server.engine.transfer import HostCopy, to_device

# Prompt rows scored at once: their logits are [rows, vocabulary] in fp32 (256 x 151,936 x 4 B
# = 156 MB, within what the memory profile's worst-case step leaves).
ROWS_AT_ONCE = 256


@dataclass
class Scored:
    """The prompt tokens one sequence gets scored in a step."""

    seq: Sequence
    first: int  # prompt index of the first token scored
    rows: range  # the step's rows whose hidden states predict them

    @property
    def targets(self) -> list[int]:
        return self.seq.token_ids(self.first, self.first + len(self.rows))


def scored_in(seqs: list[Sequence], num_new: list[int], query_start: list[int]) -> list[Scored]:
    out = []
    for i, (seq, num) in enumerate(zip(seqs, num_new, strict=True)):
        start = seq.num_computed_tokens
        last = min(start + num, seq.inputs.num_prompt_tokens - 1)
        if seq.sampling.prompt_logprobs is not None and start < last:
            out.append(Scored(seq, start + 1, range(query_start[i], query_start[i] + last - start)))
    return out


def indices(scored: list[Scored], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The step rows and target token ids, on the device (copied before the step's kernels)."""
    rows = to_device([r for s in scored for r in s.rows], device, torch.long)
    targets = to_device([t for s in scored for t in s.targets], device, torch.long)
    return rows, targets


def compute(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    scored: list[Scored],
    rows: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """[rows, 2 + 2k] on the device: each scored token's logprob and rank, the top k's
    logprobs and ids.
    In slices of ROWS_AT_ONCE rows: a whole chunk's full-vocabulary logits (8192 x 151,936
    in fp32 is 5 GB) are more than the memory profile leaves room for."""
    k = max(s.seq.sampling.prompt_logprobs or 0 for s in scored)
    parts = []
    for start in range(0, rows.shape[0], ROWS_AT_ONCE):
        part = slice(start, start + ROWS_AT_ONCE)
        logits = lm_head(hidden.index_select(0, rows[part])).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, targets[part, None])
        rank = (logprobs > chosen).sum(dim=-1, keepdim=True).to(logprobs.dtype) + 1
        top = logprobs.topk(k, dim=-1)
        parts.append(torch.cat([chosen, rank, top.values, top.indices.to(logprobs.dtype)], dim=1))
    packed = torch.cat(parts)
    return packed.nan_to_num_(nan=MIN_LOGPROB).clamp_(min=MIN_LOGPROB)


@dataclass
class PromptScores:
    """A step's prompt logprobs on their way to the host."""

    scored: list[Scored]
    packed: HostCopy

    def store(self) -> None:
        store(self.scored, self.packed.get())


def store(scored: list[Scored], packed: torch.Tensor) -> None:
    """Host values onto each sequence."""
    values = packed.tolist()
    k = (len(values[0]) - 2) // 2 if values else 0
    row = 0
    for item in scored:
        wanted = item.seq.sampling.prompt_logprobs or 0
        for index in range(item.first, item.first + len(item.rows)):
            chosen, rank, *rest = values[row]
            row += 1
            if index - 1 == len(item.seq.prompt_logprobs):  # not recorded before a preemption
                top = ((int(rest[k + j]), rest[j]) for j in range(wanted))
                item.seq.prompt_logprobs.append(TokenLogprobs.of(chosen, top, int(rank)))
