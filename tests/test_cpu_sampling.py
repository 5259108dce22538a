"""cpu_engine/sampling.py: sampling from candidates keeps exactly the tokens, with the probabilities, that
masking and sorting the whole vocabulary keeps."""

from __future__ import annotations

import pytest
import torch

from cpu_engine.sampling import NUCLEUS_CANDIDATES, Sampling, sample_top_k_top_p, sampling_distribution


def by_definition(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The definition over the whole vocabulary: temperature, mask all but the top k, softmax, sort
    everything, keep tokens while the mass before them is below top_p."""
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if not 0.0 < s.top_p < 1.0:
        return probs
    sorted_p, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_p, 0) - sorted_p < s.top_p
    return torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])


VOCAB = 262_144


def scattered(s: Sampling, logits: torch.Tensor) -> torch.Tensor:
    probs, ids = sampling_distribution(logits, s)
    return torch.zeros(VOCAB).scatter(0, ids, probs)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [
        (1.0, 0, 0.95),  # peaked: the nucleus is a few tokens
        (1.0, 64, 0.95),  # Gemma's recommended sampling
        (0.5, 64, 0.0),  # top-k alone
        (50.0, 0, 0.9),  # nearly flat: far more than the candidates, the full sort decides
        (1.0, 0, 0.5),
        (0.7, 0, 0.999),
        (1.0, 0, 1.0),  # no truncation: the whole vocabulary
    ],
)
def test_candidates_equal_the_definition(temperature: float, top_k: int, top_p: float) -> None:
    gen = torch.Generator().manual_seed(7)
    s = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    for _ in range(5):
        logits = torch.randn(VOCAB, generator=gen) * 4
        got, want = scattered(s, logits), by_definition(logits, s)
        assert torch.equal(got > 0, want > 0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)  # exp(x - logsumexp) vs softmax: rounding


def test_banned_tokens_are_never_candidates() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    logits[:-3] = float("-inf")  # a grammar leaving three tokens
    probs, ids = sampling_distribution(logits, Sampling(top_k=64, top_p=0.95))
    assert set(ids[probs > 0].tolist()) <= {VOCAB - 3, VOCAB - 2, VOCAB - 1}


def test_flat_distribution_keeps_more_than_the_candidates() -> None:
    probs, _ = sampling_distribution(torch.zeros(VOCAB), Sampling(top_p=0.5))
    assert len(probs) > NUCLEUS_CANDIDATES


def test_seeded_sampling_stays_in_the_nucleus_and_repeats() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * 4
    s = Sampling(temperature=1.0, top_p=0.3, seed=5)
    allowed = set(torch.nonzero(by_definition(logits, s)).flatten().tolist())
    draws = [sample_top_k_top_p(logits, s, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(draws)) == 1 and draws[0] in allowed
