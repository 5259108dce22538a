"""Per-request sampling, as TensorRT-LLM's sampling layers define it (one row of logits at a time)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1 or (self.top_k <= 0 and self.top_p <= 0.0)


def ban_bad_words(logits: torch.Tensor, bad_words: Sequence[list[int]], generated: Sequence[int]) -> None:
    gen = list(generated)
    for word in bad_words:
        prefix = word[:-1]
        if not prefix or (len(prefix) <= len(gen) and gen[-len(prefix) :] == prefix):
            logits[word[-1]] = float("-inf")


def apply_penalties(
    logits: torch.Tensor, prompt: Sequence[int], generated: Sequence[int], s: Sampling
) -> torch.Tensor:
    # vLLM/OpenAI semantics: repetition over prompt + output, presence/frequency over the output only.
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(generated)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if generated and (s.presence_penalty or s.frequency_penalty):
        ids, counts = torch.unique(torch.tensor(list(generated), dtype=torch.long), return_counts=True)
        logits[ids] -= s.presence_penalty + s.frequency_penalty * counts.float()
    return logits


def sample_top_k_top_p(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    logits = logits / max(s.temperature, 1e-5)
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < s.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
