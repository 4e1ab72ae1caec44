import pytest
import torch

from lssf_lightning.core.basis import basis_weights, fuse_weight, fusion_factors, weighted_basis
from lssf_lightning.core.entropy import safety_critical_rank


def test_weights_of_3_2_1_by_hand():
    # α_i = 1 + (α₁ − 1)(σ_i − σ_r)/(σ₁ − σ_r) with σ = (3, 2, 1), r = 3.
    assert basis_weights(torch.tensor([3.0, 2.0, 1.0]), 2.0).tolist() == pytest.approx([2.0, 1.5, 1.0])
    assert basis_weights(torch.tensor([3.0, 2.0, 1.0]), 3.0).tolist() == pytest.approx([3.0, 2.0, 1.0])
    assert basis_weights(torch.tensor([3.0, 2.0, 1.0]), 1.0).tolist() == [1.0, 1.0, 1.0]


def test_weights_when_all_kept_values_are_equal():
    assert basis_weights(torch.tensor([5.0]), 2.5).tolist() == [2.5]
    assert basis_weights(torch.tensor([2.0, 2.0]), 1.5).tolist() == [1.5, 1.5]
    assert basis_weights(torch.zeros(0), 2.0).numel() == 0


@pytest.mark.parametrize("alpha_1", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_bad_alpha_1_is_rejected_by_name(alpha_1):
    with pytest.raises(ValueError, match="alpha_1"):
        basis_weights(torch.tensor([2.0, 1.0]), alpha_1)


def test_weighted_basis_scales_columns():
    basis = torch.eye(4)[:, :2]
    out = weighted_basis(basis, torch.tensor([3.0, 1.0]), alpha_1=2.0)
    assert torch.equal(out, torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="does not match"):
        weighted_basis(basis, torch.tensor([3.0, 2.0, 1.0]))


@pytest.mark.parametrize("alpha_1", [1.0, 2.5])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_fusion_matches_dense_formula_in_float64(shape, alpha_1):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator, dtype=torch.float64)
    delta = torch.randn(shape, generator=generator, dtype=torch.float64)
    u, s, _ = torch.linalg.svd(delta, full_matrices=False)
    r = safety_critical_rank(s, 0.6)
    alpha = 1.7
    left, right = fusion_factors(weighted_basis(u[:, :r], s[:r], alpha_1), delta)
    fused = fuse_weight(weight, left, right, alpha)
    weights = 1 + (alpha_1 - 1) * (s[:r] - s[r - 1]) / (s[0] - s[r - 1])
    u_prime = u[:, :r] @ torch.diag(weights)
    dense = weight + alpha * u_prime @ u_prime.T @ delta
    assert 0 < r < min(shape)
    assert (fused - dense).norm() / dense.norm() < 1e-12
    assert left.shape == (shape[0], r) and right.shape == (r, shape[1])


def test_fuse_weight_returns_new_tensor_in_weight_dtype():
    weight = torch.ones(3, 2, dtype=torch.bfloat16)
    before = weight.clone()
    out = fuse_weight(weight, torch.ones(3, 1), torch.ones(1, 2), alpha=0.5)
    assert out.dtype == torch.bfloat16 and torch.equal(weight, before)
    assert torch.equal(out, torch.full((3, 2), 1.5, dtype=torch.bfloat16))
    f32 = torch.zeros(3, 2)
    out32 = fuse_weight(f32, torch.ones(3, 1), torch.ones(1, 2))
    assert out32.data_ptr() != f32.data_ptr() and f32.abs().sum() == 0
    with pytest.raises(ValueError, match="does not match"):
        fuse_weight(torch.zeros(2, 2), torch.ones(3, 1), torch.ones(1, 2))


def test_all_finite_agrees_with_the_element_wise_mask_including_overflowing_sums():
    from lssf_lightning.core.checks import all_finite

    big = torch.full((4,), 3e38)  # finite values whose float32 sum overflows to inf
    cases = {
        "finite": (torch.randn(5, 3), True), "nan": (torch.tensor([1.0, float("nan")]), False),
        "inf": (torch.tensor([float("inf"), 1.0]), False), "both signs": (torch.tensor([float("inf"), -float("inf")]), False),
        "overflowing sum": (big, True), "overflow and nan": (torch.cat([big, torch.tensor([float("nan")])]), False),
        "bf16": (torch.randn(8).bfloat16(), True), "ints": (torch.arange(4), True), "empty": (torch.empty(0), True),
    }
    for name, (tensor, expected) in cases.items():
        assert all_finite(tensor) is expected, name
        assert expected is bool(torch.isfinite(tensor).all()), name
