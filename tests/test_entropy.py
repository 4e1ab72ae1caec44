import math

import pytest
import torch

from lssf_lightning.core.entropy import (
    cumulative_entropy,
    safety_critical_rank,
    safety_singular_value_entropy,
    spectrum_probabilities,
)

SIGMA = torch.tensor([3.0, 2.0, 1.0])
P = (9 / 14, 4 / 14, 1 / 14)
H_PARTIAL = [sum(-p * math.log(p) for p in P[:k]) for k in (1, 2, 3)]  # 0.28398, 0.64194, 0.83047


def test_entropy_of_3_2_1_by_hand():
    assert H_PARTIAL[-1] == pytest.approx(0.8304717124, abs=1e-9)
    assert float(safety_singular_value_entropy(SIGMA)) == pytest.approx(H_PARTIAL[-1], abs=1e-12)
    assert cumulative_entropy(SIGMA).tolist() == pytest.approx(H_PARTIAL, abs=1e-12)
    assert spectrum_probabilities(SIGMA).tolist() == pytest.approx(P, abs=1e-15)


@pytest.mark.parametrize(
    ("eta", "rank"),
    [(0.3, 1), (0.34, 1), (0.35, 2), (0.5, 2), (0.77, 2), (0.78, 3), (0.9, 3), (1.0, 3)],
)
def test_rank_of_3_2_1_by_hand(eta, rank):
    # r = min{ρ : H(ρ) ≥ η·H(3)}; thresholds: H(1)/H(3) = 0.3420, H(2)/H(3) = 0.7730.
    assert safety_critical_rank(SIGMA, eta) == rank


def test_order_of_singular_values_does_not_matter():
    assert safety_critical_rank(torch.tensor([1.0, 3.0, 2.0]), 0.5) == 2
    assert float(safety_singular_value_entropy(torch.tensor([2.0, 1.0, 3.0]))) == pytest.approx(H_PARTIAL[-1])


def test_uniform_spectrum():
    n = 10
    sigma = torch.ones(n)
    assert float(safety_singular_value_entropy(sigma)) == pytest.approx(math.log(n))
    for eta in (0.1, 0.45, 0.5, 0.95, 1.0):
        assert safety_critical_rank(sigma, eta) == math.ceil(round(eta * n, 9))


def test_all_zero_spectrum_has_rank_zero_and_entropy_zero():
    assert safety_critical_rank(torch.zeros(5), 0.9) == 0
    assert float(safety_singular_value_entropy(torch.zeros(5))) == 0.0
    assert safety_critical_rank(torch.zeros(0), 0.9) == 0


def test_single_nonzero_direction_has_rank_one():
    assert safety_critical_rank(torch.tensor([0.0, 4.0, 0.0]), 0.9) == 1
    assert safety_critical_rank(torch.tensor([4.0, 0.0]), 1.0) == 1
    assert float(safety_singular_value_entropy(torch.tensor([4.0, 0.0]))) == 0.0


def test_trailing_zeros_add_no_rank():
    assert safety_critical_rank(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0]), 1.0) == 3


@pytest.mark.parametrize("eta", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.9", None])
def test_eta_outside_unit_interval_is_rejected_by_name(eta):
    with pytest.raises(ValueError, match="eta"):
        safety_critical_rank(SIGMA, eta)


def test_bad_spectra_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        safety_critical_rank(torch.tensor([1.0, -1.0]), 0.9)
    with pytest.raises(ValueError, match="finite"):
        safety_singular_value_entropy(torch.tensor([1.0, float("nan")]))
