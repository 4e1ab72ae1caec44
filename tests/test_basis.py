import pytest
import torch

from lssf_lightning.core.basis import (
    basis_weights,
    best_low_rank,
    compact_low_rank,
    fusion_factors,
    weighted_basis,
)
from lssf_lightning.core.entropy import safety_critical_rank
from lssf_lightning.core.factors import SubspaceEntry


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
    fused = SubspaceEntry(left, right, s[:r], 0.0, 0.0).fuse(weight, alpha)
    weights = 1 + (alpha_1 - 1) * (s[:r] - s[r - 1]) / (s[0] - s[r - 1])
    u_prime = u[:, :r] @ torch.diag(weights)
    dense = weight + alpha * u_prime @ u_prime.T @ delta
    assert 0 < r < min(shape)
    assert (fused - dense).norm() / dense.norm() < 1e-12
    assert left.shape == (shape[0], r) and right.shape == (r, shape[1])


def test_entry_fusion_returns_a_new_tensor_in_the_weight_dtype():
    entry = SubspaceEntry(torch.ones(3, 1), torch.ones(1, 2), torch.ones(1), 0.0, 1.0)
    weight = torch.ones(3, 2, dtype=torch.bfloat16)
    before = weight.clone()
    out = entry.fuse(weight, alpha=0.5)
    assert out.dtype == torch.bfloat16 and torch.equal(weight, before)
    assert torch.equal(out, torch.full((3, 2), 1.5, dtype=torch.bfloat16))
    f32 = torch.zeros(3, 2)
    out32 = entry.fuse(f32)
    assert out32.data_ptr() != f32.data_ptr() and f32.abs().sum() == 0
    with pytest.raises(ValueError, match="does not match"):
        entry.fuse(torch.zeros(2, 2))


def test_all_finite_agrees_with_the_element_wise_mask_including_overflowing_sums():
    from lssf_lightning.core.checks import all_finite

    big = torch.full((4,), 3e38)  # finite values whose float32 sum overflows to inf
    cases = {
        "finite": (torch.randn(5, 3), True),
        "nan": (torch.tensor([1.0, float("nan")]), False),
        "inf": (torch.tensor([float("inf"), 1.0]), False),
        "both signs": (torch.tensor([float("inf"), -float("inf")]), False),
        "overflowing sum": (big, True),
        "overflow and nan": (torch.cat([big, torch.tensor([float("nan")])]), False),
        "bf16": (torch.randn(8).bfloat16(), True),
        "ints": (torch.arange(4), True),
        "empty": (torch.empty(0), True),
    }
    for name, (tensor, expected) in cases.items():
        assert all_finite(tensor) is expected, name
        assert expected is bool(torch.isfinite(tensor).all()), name


# The non-finite bit patterns of each float8 format (OCP FP8 / MX specs, and the "fnuz" variants whose only
# special value is the negative-zero pattern 0x80 = NaN).
_FLOAT8_NON_FINITE = {
    "float8_e4m3fn": {0x7F, 0xFF},  # NaN only, no inf
    "float8_e5m2": {0x7C, 0xFC} | set(range(0x7D, 0x80)) | set(range(0xFD, 0x100)),  # ±inf, 6 NaNs
    "float8_e4m3fnuz": {0x80},
    "float8_e5m2fnuz": {0x80},
    "float8_e8m0fnu": {0xFF},
}


@pytest.mark.parametrize("dtype_name", sorted(_FLOAT8_NON_FINITE))
def test_all_finite_on_every_float8_bit_pattern(dtype_name):
    from lssf_lightning.core.checks import all_finite

    dtype = getattr(torch, dtype_name)
    patterns = torch.arange(256, dtype=torch.uint8)
    flagged = {int(p) for p in patterns if not all_finite(p.reshape(1).view(dtype))}
    assert flagged == _FLOAT8_NON_FINITE[dtype_name]
    finite = patterns[[int(p) not in flagged for p in patterns]].view(dtype)
    assert all_finite(finite) and all_finite(finite.reshape(-1, 1).t())  # non-contiguous too
    bad = min(_FLOAT8_NON_FINITE[dtype_name])
    mixed = torch.cat([finite, torch.tensor([bad], dtype=torch.uint8).view(dtype)])
    assert not all_finite(mixed, chunk=7)  # the bad value sits in the last, partial chunk


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_all_finite_on_narrow_and_non_float_dtypes():
    from lssf_lightning.core.checks import all_finite

    top = torch.full((4,), 0xFE, dtype=torch.uint8).view(
        torch.float8_e8m0fnu
    )  # 2**127 each: the sum overflows
    assert all_finite(top)
    half_complex = torch.tensor([1 + 2j, 3 - 1j]).to(torch.complex32)
    assert all_finite(half_complex)
    assert not all_finite(torch.tensor([1 + 2j, complex(float("nan"), 0)]).to(torch.complex32))
    assert all_finite(
        torch.arange(256, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    )  # E2M1: no NaN, no inf
    for dtype in (torch.bool, torch.int8, torch.uint16, torch.bits8, torch.uint4):
        assert all_finite(
            torch.zeros(3, dtype=torch.uint8).view(dtype)
            if dtype.itemsize == 1
            else torch.zeros(3, dtype=dtype)
        ), dtype


def test_best_low_rank_is_the_truncated_svd():
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    right = torch.randn(6, 30, generator=generator, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(left @ right)
    small_left, small_right, kept = best_low_rank(left, right, 2)
    assert small_left.shape == (40, 2) and small_right.shape == (2, 30)
    torch.testing.assert_close(small_left @ small_right, u[:, :2] * s[:2] @ vh[:2], rtol=1e-9, atol=1e-9)
    assert kept == pytest.approx(float(s[:2].square().sum() / s.square().sum()), rel=1e-9)
    assert best_low_rank(left, right, 6)[2] == 1.0


def test_compact_low_rank_drops_only_numerically_zero_directions():
    generator = torch.Generator().manual_seed(4)
    left, right = torch.randn(12, 5, generator=generator), torch.randn(5, 9, generator=generator)
    same_left, same_right = compact_low_rank(left, right)
    assert same_left is left and same_right is right  # full rank 5: the very same factors back
    deficient = torch.cat([left[:, :2], left[:, :2] @ torch.randn(2, 3, generator=generator)], 1)
    small_left, small_right = compact_low_rank(deficient, right)  # 5 columns, rank 2
    assert small_left.shape == (12, 2) and small_right.shape == (2, 9)
    expected = deficient.double() @ right.double()
    torch.testing.assert_close(small_left @ small_right, expected, rtol=1e-5, atol=1e-5)  # float32 noise gone
    # Rank above min(d_out, d_in): the same product at rank min(d_out, d_in).
    wide_left, wide_right = torch.randn(4, 7, generator=generator), torch.randn(7, 6, generator=generator)
    assert compact_low_rank(wide_left, wide_right)[0].shape == (4, 4)
    zero_left, zero_right = compact_low_rank(left, torch.zeros(5, 9))
    assert zero_left.shape == (12, 0) and zero_right.shape == (0, 9)
    # An explicit tolerance drops the directions below it, by the singular values of the product.
    s = torch.linalg.svdvals(left.double() @ right.double())
    kept_left, _ = compact_low_rank(left, right, tolerance=float(s[1] + s[2]) / 2)
    assert kept_left.shape[1] == 2
