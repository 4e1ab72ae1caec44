"""Safety singular value entropy and the safety-critical rank (LSSF Eqs. 5-7).

For singular values ``σ_1 ≥ … ≥ σ_n`` of a safety signal:

* ``p_i = σ_i² / Σ_j σ_j²``
* ``H(ρ) = −Σ_{i≤ρ} p_i ln p_i`` (with ``0 · ln 0 = 0``)
* ``r = min{ρ : H(ρ) ≥ η · H(n)}``
"""

from __future__ import annotations

import torch
from torch import Tensor

from lssf_lightning.validation import check_range

__all__ = [
    "check_eta",
    "cumulative_entropy",
    "safety_critical_rank",
    "safety_singular_value_entropy",
    "spectrum_probabilities",
]


def check_eta(eta: float) -> float:
    """``eta`` as a float if it is in ``(0, 1]`` (:func:`lssf_lightning.validation.check_range`)."""
    return check_range("eta", eta, 0.0, 1.0, low_open=True)


def _sorted_spectrum(singular_values: Tensor) -> Tensor:
    values = torch.as_tensor(singular_values).detach().reshape(-1).to(torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError("singular values must be finite")
    if (values < 0).any():
        raise ValueError(f"singular values must be non-negative, got minimum {values.min().item():.3g}")
    return values.sort(descending=True).values


def spectrum_probabilities(singular_values: Tensor) -> Tensor:
    """``p_i = σ_i² / Σ_j σ_j²`` in descending order (float64); all zeros for an all-zero spectrum."""
    energy = _sorted_spectrum(singular_values).square()
    total = energy.sum()
    return energy / total if total > 0 else energy


def cumulative_entropy(singular_values: Tensor) -> Tensor:
    """``H(ρ)`` for ``ρ = 1 … n`` as a float64 tensor of length ``n`` (non-decreasing)."""
    p = spectrum_probabilities(singular_values)
    terms = torch.where(p > 0, -p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(p))
    return terms.cumsum(0)


def safety_singular_value_entropy(singular_values: Tensor) -> Tensor:
    """The safety singular value entropy ``H(n)`` of a spectrum, as a float64 scalar tensor.

    Args:
        singular_values: the singular values of one safety signal, in any order.

    Returns:
        ``−Σ_i p_i ln p_i`` with ``p_i = σ_i² / Σ_j σ_j²``; ``0`` for an empty or all-zero spectrum.

    Example:
        >>> round(float(safety_singular_value_entropy(torch.tensor([3.0, 2.0, 1.0]))), 6)
        0.830472
    """
    h = cumulative_entropy(singular_values)
    return h[-1] if h.numel() else torch.zeros((), dtype=torch.float64)


def safety_critical_rank(singular_values: Tensor, eta: float) -> int:
    """The safety-critical rank ``r = min{ρ : H(ρ) ≥ η · H(n)}``.

    Args:
        singular_values: the singular values of one safety signal, in any order.
        eta: the share of the entropy to keep, in ``(0, 1]``.

    Returns:
        ``0`` for an all-zero spectrum (nothing to add), ``1`` when a single direction is non-zero,
        otherwise the smallest ``ρ`` whose partial entropy reaches ``η · H(n)``.

    Raises:
        ValueError: if ``eta`` is outside ``(0, 1]`` or the spectrum is negative or not finite.
    """
    eta = check_eta(eta)
    h = cumulative_entropy(singular_values)
    if h.numel() == 0 or not (_sorted_spectrum(singular_values)[0] > 0):
        return 0
    reached = torch.nonzero(h >= eta * h[-1])
    return int(reached[0].item()) + 1
