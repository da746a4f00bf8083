"""Chi-square goodness-of-fit for the statistical tests of the sampling rules (no scipy)."""

from __future__ import annotations

import torch
from torch import Tensor


def chi_square_pvalue(observed: Tensor, expected_probs: Tensor) -> tuple[float, float]:
    """Pearson's chi-square of counts against probabilities; returns (statistic, p-value).

    Cells with zero expected probability must have zero counts (else p-value 0).
    Degrees of freedom = cells with positive probability - 1. The p-value is the
    chi-square survival function, Q(dof / 2, stat / 2), the regularised upper
    incomplete gamma function.
    """
    observed = observed.double().flatten()
    probs = expected_probs.double().flatten()
    probs = probs / probs.sum()
    if bool((observed[probs == 0] > 0).any()):
        return float("inf"), 0.0
    keep = probs > 0
    expected = probs[keep] * observed.sum()
    if bool((expected < 5).any()):
        raise ValueError("chi-square needs >= 5 expected counts per cell; draw more samples")
    stat = ((observed[keep] - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(keep.sum() - 1), dtype=torch.float64)
    pvalue = torch.special.gammaincc(dof / 2, stat / 2)
    return float(stat), float(pvalue)


def pair_counts(first: Tensor, second: Tensor, vocab: int) -> Tensor:
    """long [vocab, vocab]: how often each (first, second) token pair occurred."""
    return torch.bincount(first * vocab + second, minlength=vocab * vocab).reshape(vocab, vocab)
