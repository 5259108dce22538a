"""Per-request sampling, as TensorRT-LLM's sampling layers define it (one row of logits at a time)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from triton_io.sampling import Sampling


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
        probs = nucleus(probs, s.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


# The nucleus almost always lies within this many of the most likely tokens (with top-k, within k).
NUCLEUS_CANDIDATES = 1024


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` with only the smallest set of most likely tokens whose mass reaches `top_p` kept (the top
    token always), unnormalised.

    Sorting the whole vocabulary for every sampled row of every step costs, with several rows, about as
    much as the step's forward, so the candidates come from a partial sort: once their mass reaches
    `top_p`, no token outside them can be kept; otherwise the full sort decides.
    """
    candidates = min(NUCLEUS_CANDIDATES, probs.numel())
    sorted_p, order = torch.topk(probs, candidates)  # best first
    if candidates < probs.numel() and float(sorted_p.sum()) < top_p:
        sorted_p, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # always keeps the top token
    return torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
