"""The weighted safety basis (LSSF Eqs. 10-11) and the fusion term (Eq. 13).

``α_i = 1 + (α₁ − 1)(σ_i − σ_r)/(σ₁ − σ_r)`` for ``i ≤ r``, ``U' = U_r · diag(α_i)``, ``P' = U'U'ᵀ``.
The fused weight is ``W + α · U'(U'ᵀ δ)``: only the rank-``r`` pair ``(U', U'ᵀδ)`` is ever formed.
:func:`best_low_rank` caps that pair's rank (Eckart–Young–Mirsky) for the LoRA adapter export.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lssf_lightning.validation import check_int, check_positive

__all__ = [
    "add_correction",
    "basis_weights",
    "best_low_rank",
    "check_alpha_1",
    "compact_low_rank",
    "fusion_factors",
    "low_rank_product",
    "weighted_basis",
]


def check_alpha_1(alpha_1: float) -> float:
    """``alpha_1`` as a float if it is a finite number > 0
    (:func:`lssf_lightning.validation.check_positive`)."""
    return check_positive("alpha_1", alpha_1)


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
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not match the correction's {tuple(product.shape)}"
        )
    return torch.add(weight.to(product.dtype), product, alpha=float(alpha)).to(weight.dtype)


def best_low_rank(left: Tensor, right: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The best rank-``k`` approximation of ``left @ right`` from the factors alone (Eckart–Young–Mirsky).

    Eckart–Young–Mirsky: the truncated SVD ``U_k S_k V_kᵀ`` minimises ``‖M − X‖`` (Frobenius and spectral)
    over all ``X`` of rank ``≤ k``. For ``M = left @ right`` (inner size ``r``): ``left = Q_L R_L``,
    ``rightᵀ = Q_R R_R`` (thin QR), ``R_L R_Rᵀ = U S Vᵀ`` (an ``r × r`` SVD), so ``M = (Q_L U) S (Q_R V)ᵀ``
    is ``M``'s SVD; keeps ``k`` terms, split as ``(Q_L U_k √S_k, √S_k V_kᵀ Q_Rᵀ)``. No ``d_out × d_in``
    matrix is formed. Computed in float64.

    Returns:
        ``(left_k, right_k, kept)``: factors of shape ``(d_out, k')`` and ``(k', d_in)`` with
        ``k' = min(k, r)``, and ``kept = Σ_{i≤k} s_i² / Σ s_i²`` (the share of ``‖M‖_F²`` kept; 1 when nothing
        is cut). ``left`` and ``right`` are returned unchanged when ``r ≤ k``.
    """
    check_int("rank", rank, minimum=1)
    if left.shape[1] <= rank:
        return left, right, 1.0
    q_left, u, s, vh, q_right = _product_svd(left, right)
    root = s[:rank].sqrt()
    total = float(s.square().sum())
    kept = float(s[:rank].square().sum()) / total if total > 0 else 1.0
    return (q_left @ u[:, :rank]) * root, root[:, None] * (vh[:rank] @ q_right.T), kept


def _product_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``left @ right = (Q_L U) S (Q_R V)ᵀ`` as ``(Q_L, U, S, Vᵀ, Q_R)`` (see :func:`best_low_rank`);
    float64."""
    q_left, r_left = torch.linalg.qr(left.double())
    q_right, r_right = torch.linalg.qr(right.double().T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    return q_left, u, s, vh, q_right


def compact_low_rank(left: Tensor, right: Tensor, tolerance: float = 0.0) -> tuple[Tensor, Tensor]:
    """``left @ right`` re-factored at its numerical rank: singular values ``s_i ≤ max(tolerance,
    s_1·max(d_out, d_in)·ε₃₂)`` are dropped (the second bound is ``numpy.linalg.matrix_rank``'s rule at
    float32 precision; ``ε₃₂`` = float32's machine epsilon). By Eckart–Young–Mirsky the change is
    ``‖dropped s‖₂ ≤ √k·tolerance`` in Frobenius norm.

    Returns the inputs unchanged when nothing is dropped, else ``(Q_L U_k √S_k, √S_k V_kᵀ Q_Rᵀ)`` in float64
    (``k = 0`` for a numerically zero product). E.g. a reset of a LoRA fine-tune, ``−α·U'U'ᵀ(s·B·A)``, is
    stored with ``r`` columns but has rank at most the task LoRA's.
    """
    # exports read trainable LoRA factors: no graph is wanted (and the inputs come back as they are)
    q_left, u, s, vh, q_right = _product_svd(left.detach(), right.detach())
    top = float(s[0]) if s.numel() else 0.0
    threshold = max(tolerance, top * max(left.shape[0], right.shape[1]) * torch.finfo(torch.float32).eps)
    keep = int((s > threshold).sum())
    if keep == left.shape[1]:
        return left, right
    root = s[:keep].sqrt()
    return (q_left @ u[:, :keep]) * root, root[:, None] * (vh[:keep] @ q_right.T)
