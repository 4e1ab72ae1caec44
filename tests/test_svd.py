import math

import pytest
import torch

import lssf_lightning.core.svd as svd_module
from lssf_lightning.core.entropy import safety_critical_rank, safety_singular_value_entropy
from lssf_lightning.core.svd import (
    certify_rank,
    safety_spectrum,
    subspace_agreement,
    tail_entropy_bounds,
)


def matrix_with_spectrum(d_out: int, d_in: int, sigma, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """``U·diag(σ)·Vᵀ`` with random orthonormal ``U``, ``V`` (built in float64)."""
    generator = torch.Generator().manual_seed(seed)
    n = min(d_out, d_in)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    sigma = torch.cat([sigma, sigma.new_zeros(n - sigma.numel())])
    u = torch.linalg.qr(torch.randn(d_out, n, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(d_in, n, generator=generator, dtype=torch.float64)).Q
    return ((u * sigma) @ v.T).to(dtype)


def low_rank_plus_noise(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 100)
    signal = matrix_with_spectrum(d_out, d_in, 4 / torch.arange(1, 9, dtype=torch.float64).sqrt(), seed)
    return signal + 0.05 * torch.randn(d_out, d_in, generator=generator)


N = 96
INDEX = torch.arange(1, N + 1, dtype=torch.float64)
SPECTRA = {
    "power-law": INDEX.pow(-0.75),
    "steep power-law": INDEX.pow(-1.5),
    "exactly rank 12": torch.where(INDEX <= 12, 1 / INDEX, torch.zeros_like(INDEX)),
    "single direction": torch.tensor([2.5]),
    "flat": torch.ones(N, dtype=torch.float64),
}
SHAPES = [(N, 160), (160, N)]


def reference_rank(matrix: torch.Tensor, eta: float) -> int:
    """The rank of the float64 spectrum, values under the numerical floor ``max(shape)·ε₃₂·σ_1`` zeroed."""
    sigma = torch.linalg.svdvals(matrix.double())
    floor = max(matrix.shape) * torch.finfo(torch.float32).eps * float(sigma[0])
    return safety_critical_rank(torch.where(sigma > floor, sigma, torch.zeros_like(sigma)), eta)


@pytest.fixture
def float32_gram(monkeypatch):
    """Treat every matrix as large: the float32 Gram path and the randomised attempts of ``auto`` run."""
    monkeypatch.setattr(svd_module, "_SMALL_GRAM_FLOPS", 0)


@pytest.mark.parametrize("shape", SHAPES, ids=["wide", "tall"])
@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("method", ["auto", "gram", "randomized"])
def test_rank_and_entropy_equal_the_exact_path(method, name, shape):
    matrix = matrix_with_spectrum(*shape, SPECTRA[name])
    for eta in (0.5, 0.9):
        exact = safety_spectrum(matrix, eta, method="exact")
        fast = safety_spectrum(matrix, eta, method=method)
        assert exact.rank == reference_rank(matrix, eta)
        assert fast.rank == exact.rank, (method, name, eta)
        # The randomised path reports the midpoint of its certified bounds on H(n).
        assert fast.entropy == pytest.approx(exact.entropy, abs=2e-3 if method != "randomized" else 0.05)
        assert fast.total_energy == pytest.approx(float(matrix.double().square().sum()), rel=1e-12)
        assert fast.basis.shape == (shape[0], fast.rank) and fast.singular_values.shape == (fast.rank,)


@pytest.mark.parametrize("method", ["auto", "gram", "randomized"])
def test_float32_gram_and_randomized_attempts_match_exact(float32_gram, method):
    cases = [
        matrix_with_spectrum(120, 200, SPECTRA["power-law"]),
        matrix_with_spectrum(200, 120, SPECTRA["steep power-law"]),
        matrix_with_spectrum(120, 200, SPECTRA["exactly rank 12"]),
        low_rank_plus_noise(200, 120),
    ]
    for matrix in cases:
        for eta in (0.5, 0.8, 0.9):
            exact = safety_spectrum(matrix, eta, method="exact")
            fast = safety_spectrum(matrix, eta, method=method)
            assert fast.rank == exact.rank
            assert subspace_agreement(fast.basis, exact.basis) > 0.99


def test_float32_gram_falls_back_to_float64_on_a_rank_one_matrix(float32_gram):
    # float32 Gram eigenvalues of a rank-1 matrix carry noise of ~3e-4·σ_1, above the numerical floor
    # (200·ε₃₂·σ_1 = 2.4e-5·σ_1); taken at face value its entropy would give a rank of dozens.
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(120, 1, generator=generator) @ torch.randn(1, 200, generator=generator)
    lam = torch.linalg.eigvalsh(matrix @ matrix.T).flip(0).clamp_min(0)
    assert safety_critical_rank(lam.sqrt(), 0.9) > 10
    spectrum = safety_spectrum(matrix, 0.9, method="gram")
    assert spectrum.rank == 1 and spectrum.method == "gram"


def test_numerical_floor_makes_a_float32_outer_product_rank_one():
    generator = torch.Generator().manual_seed(4)
    matrix = torch.randn(80, 1, generator=generator) @ torch.randn(1, 50, generator=generator)
    raw = torch.linalg.svdvals(matrix)
    assert raw[1] > 0 and safety_critical_rank(raw, 0.9) > 1  # rounding alone makes it "full rank"
    for method in ("exact", "auto", "gram", "randomized"):
        spectrum = safety_spectrum(matrix, 0.9, method=method)
        assert spectrum.rank == 1 and spectrum.entropy == pytest.approx(0.0, abs=1e-6)
        assert spectrum.singular_values.item() == pytest.approx(float(raw[0]), rel=1e-5)


@pytest.mark.parametrize("method", ["auto", "gram", "randomized"])
def test_basis_and_singular_values_agree_with_svd(method):
    matrix = low_rank_plus_noise(150, 90)
    exact = safety_spectrum(matrix, 0.8, method="exact")
    fast = safety_spectrum(matrix, 0.8, method=method)
    assert fast.rank == exact.rank > 8
    assert subspace_agreement(fast.basis, exact.basis) > 0.999
    sigma = torch.linalg.svdvals(matrix.double())[: fast.rank]
    assert torch.allclose(fast.singular_values.double(), sigma, rtol=1e-4)
    gram = fast.basis.double().T @ fast.basis.double()
    assert torch.allclose(gram, torch.eye(fast.rank, dtype=torch.float64), atol=1e-5)
    assert fast.kept_energy == pytest.approx(float(sigma.square().sum()), rel=1e-4)
    assert fast.n == 90 and fast.basis.dtype == torch.float32 and fast.singular_values.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    matrix = low_rank_plus_noise(64, 128).to(dtype)
    upcast = matrix.float()
    for eta in (0.5, 0.9):
        spectrum = safety_spectrum(matrix, eta)
        assert spectrum.rank == reference_rank(upcast, eta)
        assert spectrum.basis.dtype == torch.float32
        assert subspace_agreement(spectrum.basis, safety_spectrum(upcast, eta, method="exact").basis) > 0.99


@pytest.mark.parametrize("method", ["auto", "exact", "gram", "randomized"])
def test_max_rank_caps_the_rank(method):
    matrix = matrix_with_spectrum(100, 140, SPECTRA["power-law"])
    uncapped = safety_spectrum(matrix, 0.9, method="exact").rank
    capped = safety_spectrum(matrix, 0.9, method=method, max_rank=5)
    assert uncapped > 5 and capped.rank == 5 and capped.basis.shape == (100, 5)
    assert safety_spectrum(matrix, 0.9, method=method, max_rank=1000).rank == uncapped
    exact_top = torch.linalg.svd(matrix.double(), full_matrices=False).U[:, :5].float()
    assert subspace_agreement(capped.basis, exact_top) > 0.99


@pytest.mark.parametrize("method", ["auto", "exact", "gram", "randomized"])
@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (0, 5)])
def test_zero_matrix_has_rank_zero(method, shape):
    spectrum = safety_spectrum(torch.zeros(shape), 0.9, method=method)
    assert spectrum.rank == 0 and spectrum.basis.shape == (shape[0], 0)
    assert spectrum.singular_values.numel() == 0 and spectrum.entropy == 0.0 and spectrum.total_energy == 0.0


def test_seed_makes_the_randomized_path_deterministic():
    matrix = low_rank_plus_noise(120, 90)
    first = safety_spectrum(matrix, 0.5, method="randomized", seed=7)
    again = safety_spectrum(matrix, 0.5, method="randomized", seed=7)
    other = safety_spectrum(matrix, 0.5, method="randomized", seed=8)
    assert torch.equal(first.basis, again.basis) and torch.equal(first.singular_values, again.singular_values)
    assert first.rank == other.rank and not torch.equal(first.basis, other.basis)
    assert subspace_agreement(first.basis, other.basis) > 0.999


def test_float64_input_is_accepted_and_returns_float32():
    matrix = matrix_with_spectrum(40, 60, SPECTRA["power-law"][:40], dtype=torch.float64)
    spectrum = safety_spectrum(matrix, 0.9)
    assert spectrum.rank == reference_rank(matrix, 0.9) and spectrum.basis.dtype == torch.float32


# --- the certificate ----------------------------------------------------------------------------------------


def test_tail_entropy_bounds_by_hand():
    # 4 values ≤ 0.3 summing to 0.5: packed = {0.3, 0.2, 0, 0}, uniform = 4 × 0.125.
    low, high = tail_entropy_bounds(0.5, 4, 0.3)
    assert low == pytest.approx(-(0.3 * math.log(0.3) + 0.2 * math.log(0.2)), abs=1e-12)
    assert high == pytest.approx(-0.5 * math.log(0.125), abs=1e-12)
    assert tail_entropy_bounds(0.0, 4, 0.3) == (0.0, 0.0)
    assert tail_entropy_bounds(0.5, 0, 0.3) == (0.0, 0.0)
    assert tail_entropy_bounds(0.5, 4, 0.3, floor=0.3) == (0.0, 0.0)  # all under the floor: zeros
    low_floor, high_floor = tail_entropy_bounds(0.5, 4, 0.3, floor=0.05)
    assert low_floor < low and high_floor == pytest.approx(high)


def test_tail_entropy_bounds_contain_random_tails():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        count = int(torch.randint(1, 30, (1,), generator=generator))
        tail = torch.rand(count, generator=generator, dtype=torch.float64)
        tail = tail * float(torch.rand(1, generator=generator, dtype=torch.float64)) / tail.sum()
        entropy = float(-(tail * tail.log()).sum())
        low, high = tail_entropy_bounds(float(tail.sum()), tail.numel(), float(tail.max()))
        assert low - 1e-12 <= entropy <= high + 1e-12


def test_certificate_on_a_hand_built_spectrum():
    # σ = (3, 2, 1, 1, 1, 1), T = 17, with only σ_1, σ_2 known. The unseen tail (4 values ≤ 4/17 holding 4/17)
    # is really uniform, so the upper bound is exact; the packed lower bound puts all 4/17 in one value.
    sigma = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    p1, p2, tail = 9 / 17, 4 / 17, 4 / 17
    h1 = -p1 * math.log(p1)  # 0.3364
    h2 = h1 - p2 * math.log(p2)  # 0.6770
    low, high = h2 - tail * math.log(tail), h2 - tail * math.log(tail / 4)  # 1.0175, 1.3438
    assert high == pytest.approx(float(safety_singular_value_entropy(sigma)), abs=1e-12)
    certificate = certify_rank(sigma[:2], 17.0, 6, 0.5)
    assert (certificate.entropy_low, certificate.entropy_high) == pytest.approx((low, high), abs=1e-9)
    # η = 0.5: thresholds 0.509 and 0.672 both lie in (H(1), H(2)]: rank 2, decided.
    assert certificate.rank == 2 == safety_critical_rank(sigma, 0.5)
    # η = 0.2: 0.204 and 0.269 both ≤ H(1): rank 1.
    assert certify_rank(sigma[:2], 17.0, 6, 0.2).rank == 1 == safety_critical_rank(sigma, 0.2)
    # η = 0.3: 0.305 ≤ H(1) < 0.403: undecided, and only rank ≥ 1 is proven.
    undecided = certify_rank(sigma[:2], 17.0, 6, 0.3)
    assert undecided.rank is None and undecided.min_rank == 1
    # η = 0.9: even the lower threshold 0.916 exceeds H(2): the rank is proven > 2 (it is 6).
    beyond = certify_rank(sigma[:2], 17.0, 6, 0.9)
    assert beyond.rank is None and beyond.min_rank == 3 and safety_critical_rank(sigma, 0.9) == 6
    # …which decides a cap of 2 (and one of 3 once σ_3 is known too).
    assert certify_rank(sigma[:2], 17.0, 6, 0.9, max_rank=2).rank == 2
    assert certify_rank(sigma[:2], 17.0, 6, 0.9, max_rank=3).rank is None
    assert certify_rank(sigma[:3], 17.0, 6, 0.9, max_rank=3).rank == 3
    # Knowing every value decides every η.
    for eta in (0.2, 0.3, 0.5, 0.9, 1.0):
        assert certify_rank(sigma, 17.0, 6, eta).rank == safety_critical_rank(sigma, eta)


def test_certified_ranks_are_never_wrong():
    generator = torch.Generator().manual_seed(1)
    decided = 0
    for trial in range(300):
        n = int(torch.randint(5, 60, (1,), generator=generator))
        steepness = float(1 + 6 * torch.rand(1, generator=generator))
        sigma = torch.rand(n, generator=generator, dtype=torch.float64).pow(steepness)
        sigma = sigma.sort(descending=True).values
        known = int(torch.randint(1, n + 1, (1,), generator=generator))
        eta = float(torch.rand(1, generator=generator)) * 0.95 + 0.05
        certificate = certify_rank(sigma[:known], float(sigma.square().sum()), n, eta)
        true_rank = safety_critical_rank(sigma, eta)
        entropy = float(safety_singular_value_entropy(sigma))
        assert certificate.entropy_low - 1e-9 <= entropy <= certificate.entropy_high + 1e-9
        assert certificate.min_rank <= true_rank
        if certificate.rank is not None:
            decided += 1
            assert certificate.rank == true_rank, trial
    assert decided > 100


def test_subspace_agreement_by_hand():
    eye = torch.eye(4)
    assert subspace_agreement(eye[:, :2], eye[:, [1, 0]]) == pytest.approx(1.0)
    assert subspace_agreement(eye[:, :2], eye[:, 2:]) == pytest.approx(0.0)
    assert subspace_agreement(eye[:, :2], eye[:, [0, 2]]) == pytest.approx(0.5)
    assert subspace_agreement(eye[:, :0], eye[:, :0]) == 1.0
    assert subspace_agreement(eye[:, :1], eye[:, :0]) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eta": 0.0}, "eta"),
        ({"eta": 1.5}, "eta"),
        ({"method": "lanczos"}, "method"),
        ({"max_rank": 0}, "max_rank"),
        ({"max_rank": 2.5}, "max_rank"),
    ],
)
def test_bad_arguments_are_rejected_by_name(kwargs, match):
    arguments = {"eta": 0.9, **kwargs}
    with pytest.raises(ValueError, match=match):
        safety_spectrum(torch.ones(3, 4), **arguments)


def test_bad_matrices_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        safety_spectrum(torch.ones(3), 0.9)
    with pytest.raises(ValueError, match="floating point"):
        safety_spectrum(torch.ones(3, 4, dtype=torch.int64), 0.9)
    with pytest.raises(ValueError, match="NaN"):
        safety_spectrum(torch.tensor([[1.0, float("nan")]]), 0.9)


def test_tail_entropy_bounds_hold_over_the_hidden_and_uncertain_mass():
    # Values ≤ floor count as zero and the mass is known to ± error: every tail with values in
    # {0} ∪ (floor, cap] and a mass in [t − count·floor − error, t + error] must lie within the bounds.
    generator = torch.Generator().manual_seed(2)
    for count, cap, floor, error in ((3, 0.6, 0.1, 0.0), (40, 0.05, 0.01, 0.05), (40, 0.05, 0.0, 0.2)):
        low, high = tail_entropy_bounds(0.9, count, cap, floor, mass_error=error)
        checked = 0
        for _ in range(2000):
            values = floor + (cap - floor) * torch.rand(count, generator=generator, dtype=torch.float64)
            values = values * (torch.rand(count, generator=generator) < 0.8)
            mass = float(values.sum())
            if not 0.9 - count * floor - error <= mass <= 0.9 + error or mass == 0:
                continue
            checked += 1
            entropy = float(-(values[values > 0] * values[values > 0].log()).sum())
            assert low - 1e-12 <= entropy <= high + 1e-12
        assert checked > 20


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_entries_are_rejected(bad):
    matrix = torch.ones(5, 7)
    matrix[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        safety_spectrum(matrix, 0.9)
    assert safety_spectrum(torch.full((5, 7), 3e38), 0.9).rank == 1  # large but finite: no overflow
