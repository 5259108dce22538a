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
    probs, ids = sampling_distribution(logits, s)
    return int(ids[torch.multinomial(probs, 1, generator=generator)])


# The nucleus almost always lies within this many of the most likely tokens (with top-k, within k).
NUCLEUS_CANDIDATES = 1024


def sampling_distribution(logits: torch.Tensor, s: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens `s` may sample from one row of logits and their probabilities (unnormalised once top-p
    has cut them): temperature, then top-k, then the top-p nucleus, as TensorRT-LLM applies them.

    Why candidates: sorting, masking or drawing from the whole vocabulary for every sampled row of every
    step costs, with several rows, about as much as the step's forward. Top-k keeps k tokens, and the
    nucleus almost always lies within the few most likely ones: once their mass reaches `top_p`, no token
    outside them can be kept. Only a flat distribution (or no truncation at all) takes the whole vocabulary.
    """
    scaled = logits / max(s.temperature, 1e-5)
    top_p = s.top_p if 0.0 < s.top_p < 1.0 else 1.0
    if s.top_k > 0:
        values, ids = torch.topk(scaled, min(s.top_k, scaled.numel()))  # best first
        probs = torch.softmax(values, dim=-1)
    elif top_p == 1.0:  # no truncation: the whole vocabulary, in any order
        return torch.softmax(scaled, dim=-1), torch.arange(scaled.numel())
    else:
        values, ids = torch.topk(scaled, min(NUCLEUS_CANDIDATES, scaled.numel()))
        probs = torch.exp(values - torch.logsumexp(scaled, dim=-1))  # their share of the whole vocabulary
        if float(probs.sum()) < top_p:  # a flat distribution: the nucleus reaches past them
            probs, ids = torch.sort(torch.softmax(scaled, dim=-1), descending=True)
    if top_p < 1.0:
        keep = torch.cumsum(probs, dim=-1) - probs < top_p  # always keeps the top token
        probs, ids = probs[keep], ids[keep]
    return probs, ids
