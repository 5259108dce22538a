"""cpu_engine/sampling.py: the nucleus from a partial sort keeps exactly what sorting the vocabulary keeps."""

from __future__ import annotations

import pytest
import torch

from cpu_engine.sampling import NUCLEUS_CANDIDATES, Sampling, nucleus, sample_top_k_top_p


def full_sort_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The definition: sort everything, keep tokens while the mass before them is below top_p."""
    sorted_p, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
    return torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])


VOCAB = 262_144


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [
        (1.0, 0, 0.95),  # peaked: the nucleus is a few tokens
        (1.0, 64, 0.95),  # Gemma's recommended sampling
        (50.0, 0, 0.9),  # nearly flat: far more than the candidates, the full sort decides
        (1.0, 0, 0.5),
        (0.7, 0, 0.999),
    ],
)
def test_nucleus_equals_full_sort(temperature: float, top_k: int, top_p: float) -> None:
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        logits = torch.randn(VOCAB, generator=gen) * 4 / temperature
        if top_k:
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        got, want = nucleus(probs, top_p), full_sort_nucleus(probs, top_p)
        assert torch.equal(got > 0, want > 0)
        assert torch.equal(got, want)


def test_flat_distribution_keeps_more_than_the_candidates() -> None:
    probs = torch.full((VOCAB,), 1.0 / VOCAB)
    assert int((nucleus(probs, 0.5) > 0).sum()) > NUCLEUS_CANDIDATES


def test_seeded_sampling_stays_in_the_nucleus_and_repeats() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * 4
    s = Sampling(temperature=1.0, top_p=0.3, seed=5)
    allowed = set(torch.nonzero(full_sort_nucleus(torch.softmax(logits, -1), 0.3)).flatten().tolist())
    draws = [sample_top_k_top_p(logits, s, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(draws)) == 1 and draws[0] in allowed
