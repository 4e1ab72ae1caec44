"""The weighted safety basis (LSSF Eqs. 10-11) and the fusion term (Eq. 13).

``α_i = 1 + (α₁ − 1)(σ_i − σ_r)/(σ₁ − σ_r)`` for ``i ≤ r``, ``U' = U_r · diag(α_i)``, ``P' = U'U'ᵀ``.
The fused weight is ``W + α · U'(U'ᵀ δ)``: only the rank-``r`` pair ``(U', U'ᵀδ)`` is ever formed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "add_correction",
    "basis_weights",
    "check_alpha_1",
    "fuse_weight",
    "fusion_factors",
    "low_rank_product",
    "weighted_basis",
]


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_alpha_1(alpha_1: float) -> float:
    """Return ``alpha_1`` as a float, or raise ``ValueError`` naming it unless it is a finite number > 0."""
    return _check_positive("alpha_1", alpha_1)


def basis_weights(singular_values: Tensor, alpha_1: float = 1.0) -> Tensor:
    """The direction weights ``α_i`` of Eq. 10 for the kept singular values ``σ_1 ≥ … ≥ σ_r``.

    ``α_1 = alpha_1`` for the strongest direction, falling linearly in ``σ`` to ``1`` at ``σ_r``.
    When all kept values are equal (``σ_1 = σ_r``, e.g. ``r = 1``) every direction is as strong as the
    first and gets ``alpha_1``. ``alpha_1 = 1`` switches the weighting off.

    Args:
        singular_values: the kept singular values, descending.
        alpha_1: the weight of the first direction, ``> 0``.

    Returns:
        A float64 tensor of shape ``(r,)`` on the device of ``singular_values``.
    """
    alpha_1 = check_alpha_1(alpha_1)
    sigma = torch.as_tensor(singular_values).to(torch.float64).reshape(-1)
    if sigma.numel() == 0:
        return sigma
    spread = sigma[0] - sigma[-1]
    if alpha_1 == 1.0:
        weights = torch.ones_like(sigma)
    elif spread <= 0:
        weights = torch.full_like(sigma, alpha_1)
    else:
        weights = 1.0 + (alpha_1 - 1.0) * (sigma - sigma[-1]) / spread
    return weights


def weighted_basis(basis: Tensor, singular_values: Tensor, alpha_1: float = 1.0) -> Tensor:
    """``U' = U_r · diag(α_i)`` (Eq. 11); ``basis`` holds ``U_r`` as columns, shape ``(d_out, r)``."""
    if basis.ndim != 2 or basis.shape[1] != singular_values.numel():
        raise ValueError(
            f"basis of shape {tuple(basis.shape)} does not match {singular_values.numel()} singular values"
        )
    weights = basis_weights(singular_values, alpha_1).to(device=basis.device, dtype=basis.dtype)
    return basis * weights


def fusion_factors(weighted: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """The rank-``r`` factors ``(U', U'ᵀδ)`` whose product is ``P'δ``; computed in at least float32.

    Args:
        weighted: ``U'`` of shape ``(d_out, r)``.
        delta: the safety vector ``δ`` of shape ``(d_out, d_in)``.

    Returns:
        ``left`` of shape ``(d_out, r)`` and ``right`` of shape ``(r, d_in)``.
    """
    if weighted.shape[0] != delta.shape[0]:
        raise ValueError(f"basis has {weighted.shape[0]} rows but delta has shape {tuple(delta.shape)}")
    dtype = torch.promote_types(weighted.dtype, torch.float32)
    left = weighted.to(dtype)
    right = left.T @ delta.to(device=left.device, dtype=dtype)
    return left, right


def low_rank_product(left: Tensor, right: Tensor, like: Tensor) -> Tensor:
    """``left @ right`` in at least float32 (and at least ``like``'s precision), on ``like``'s device."""
    dtype = torch.promote_types(torch.promote_types(like.dtype, left.dtype), torch.float32)
    return left.to(device=like.device, dtype=dtype) @ right.to(device=like.device, dtype=dtype)


def add_correction(weight: Tensor, product: Tensor, alpha: float = 1.0) -> Tensor:
    """``W + α · product`` in ``product``'s dtype, cast back to ``weight``'s dtype (a new tensor).

    The one place fusion rounds: adding ``-α`` to the result with the same ``product`` retraces the same
    operation, which is what lets a resume recover the raw weights (see ``LSSFCallback``).
    """
    if tuple(weight.shape) != tuple(product.shape):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match the correction's {tuple(product.shape)}")
    return torch.add(weight.to(product.dtype), product, alpha=float(alpha)).to(weight.dtype)


def fuse_weight(weight: Tensor, left: Tensor, right: Tensor, alpha: float = 1.0) -> Tensor:
    """``W + α · left @ right`` computed in float32 (or wider) and cast back to ``weight``'s dtype.

    Returns a new tensor; ``weight`` is not modified.
    """
    expected = (left.shape[0], right.shape[1])
    if tuple(weight.shape) != expected:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match the factors' {expected}")
    return add_correction(weight, low_rank_product(left, right, weight), alpha)
