"""Fusion forms beyond the paper's additive one, per matrix, as rank-``r`` corrections ``W ← W + L·R``.

Notation (output-major ``(d_out, d_in)`` layout): ``U'`` the weighted safety basis (``d_out × r``, Eq. 11),
``P' = U'U'ᵀ``, ``δ = W_aligned − W_unaligned``, ``W`` the fine-tuned weight, ``Δ = W − W_aligned`` the task
update. The subspace stores ``(U', U'ᵀδ)``; every form below needs in addition only ``U'ᵀW_aligned =
U'ᵀW_unaligned + U'ᵀδ`` (``r × d_in``, from the unaligned weight), so nothing dense beyond ``W`` is formed.

* **additive** (the paper, Eq. 13): ``W + α·P'δ``. Because ``W`` already holds ``δ`` (``W = W_aligned + Δ``),
  the safety subspace ends up with about ``(1 + α)·δ``: past the aligned model.
* **reset**: ``W − α·P'(W − W_aligned) + β·P'δ``. With ``α = 1`` (and ``α₁ = 1``) the safety subspace is put
  back to the aligned model's state instead of adding ``δ`` a second time; ``β > 0`` adds part of the
  additive term on top (``α = 0`` is the additive form with strength ``β``).
* **erosion**: only the part of the task update inside the safety subspace that *opposes* ``δ`` is undone.
  Per direction ``i``, with ``e_i = u'_iᵀΔ`` and ``s_i = u'_iᵀδ`` (rows of ``d_in``),
  ``c_i = min(⟨e_i, s_i⟩, 0) / ‖s_i‖²`` and ``W − α·Σ_i c_i·u'_i s_i + β·P'δ``: the coordinate of the task
  update along the safety row is brought back to the aligned model's where fine-tuning lowered it.
* **two-sided** reset: ``W − α·[P'Δ + ρ·(I − P')Δ·QQᵀ] + β·P'δ`` with ``Q`` an orthonormal basis of the row
  space of ``U'ᵀδ`` (the inputs the safety directions read; ``V_r`` for the data-free subspace). The reset
  also covers the task update's component that *reads* those inputs; ``ρ`` (``input_share``) scales that
  part. It needs ``W_aligned·Q`` besides, so the planner reads the aligned weights. Rank ``2r``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "aligned_coordinates",
    "coordinate_right",
    "erosion_factors",
    "reset_factors",
    "two_sided_reset_factors",
    "variant_factors",
]

VARIANTS = ("additive", "reset", "erosion")


def _compute(*tensors: Tensor) -> list[Tensor]:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    device = tensors[0].device
    return [t.to(device=device, dtype=dtype) for t in tensors]


def _check(left: Tensor, right: Tensor, weight: Tensor, unaligned: Tensor) -> None:
    shape = (left.shape[0], right.shape[1])
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
        raise ValueError(f"factors of shapes {tuple(left.shape)} and {tuple(right.shape)} do not chain")
    for name, tensor in (("weight", weight), ("unaligned weight", unaligned)):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} of shape {tuple(tensor.shape)} does not match the factors' {shape}")


def aligned_coordinates(left: Tensor, right: Tensor, unaligned: Tensor) -> Tensor:
    """``U'ᵀW_aligned = U'ᵀW_unaligned + U'ᵀδ`` (``r × d_in``) from the stored factors and the unaligned
    weight."""
    left, right, unaligned = _compute(left, right, unaligned)
    return left.T @ unaligned + right


def reset_factors(
    left: Tensor, right: Tensor, weight: Tensor, unaligned: Tensor, alpha: float = 1.0, add: float = 0.0
) -> tuple[Tensor, Tensor]:
    """``(L, R)`` with ``L·R = −α·P'(W − W_aligned) + β·P'δ`` (``β`` = ``add``), in at least float32.

    Args:
        left: ``U'`` (``d_out × r``).
        right: ``U'ᵀδ`` (``r × d_in``).
        weight: the fine-tuned ``W``.
        unaligned: ``W_unaligned``.
        alpha: reset strength (``1`` = back to the aligned model inside the subspace).
        add: strength of the additive term on top.
    """
    _check(left, right, weight, unaligned)
    left, right, weight, unaligned = _compute(left, right, weight, unaligned)
    erosion = left.T @ weight - (left.T @ unaligned + right)  # U'ᵀ(W − W_aligned)
    return left, coordinate_right("reset", erosion, right, alpha, add)


def erosion_factors(
    left: Tensor, right: Tensor, weight: Tensor, unaligned: Tensor, alpha: float = 1.0, add: float = 0.0
) -> tuple[Tensor, Tensor]:
    """``(L, R)`` with ``L·R = −α·Σ_i c_i·u'_i s_i + β·P'δ`` (see the module docstring), in at least
    float32."""
    _check(left, right, weight, unaligned)
    left, right, weight, unaligned = _compute(left, right, weight, unaligned)
    erosion = left.T @ weight - (left.T @ unaligned + right)
    return left, coordinate_right("erosion", erosion, right, alpha, add)


def coordinate_right(form: str, erosion: Tensor, right: Tensor, alpha: float, add: float) -> Tensor:
    """``R`` of the ``"reset"`` or ``"erosion"`` correction ``U'·R`` from the task update's coordinates
    ``erosion = U'ᵀ(W − W_aligned)`` and ``right = U'ᵀδ`` (both ``r × d_in``): what a caller holding those
    coordinates (e.g. a per-step guard) needs, without the dense weights."""
    if form == "reset":
        return add * right - alpha * erosion
    if form != "erosion":
        raise ValueError(f"coordinate form must be 'reset' or 'erosion', got {form!r}")
    energy = right.square().sum(dim=1)
    opposed = (erosion * right).sum(dim=1).clamp(max=0)
    coefficient = torch.where(energy > 0, opposed / energy.clamp_min(torch.finfo(energy.dtype).tiny), 0.0)
    return (add - alpha * coefficient)[:, None] * right


def input_basis(right: Tensor) -> Tensor:
    """``Q`` (``d_in × r``, orthonormal columns): the row space of ``U'ᵀδ``; zero rows are dropped."""
    (right,) = _compute(right)
    keep = right.square().sum(dim=1) > 0
    if not bool(keep.any()):
        return right.new_zeros((right.shape[1], 0))
    q, _ = torch.linalg.qr(right[keep].T)
    return q


def two_sided_reset_factors(
    left: Tensor,
    right: Tensor,
    weight: Tensor,
    aligned: Tensor,
    alpha: float = 1.0,
    input_share: float = 1.0,
    add: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """``(L, R)`` (rank ``2r``) with ``L·R = −α·[P'Δ + ρ·(I − P')Δ·QQᵀ] + β·P'δ``, ``Δ = W − W_aligned``.

    Args:
        left: ``U'`` (``d_out × r``).
        right: ``U'ᵀδ`` (``r × d_in``).
        weight: the fine-tuned ``W``.
        aligned: ``W_aligned``.
        alpha: reset strength ``α``.
        input_share: ``ρ``, the share of the input-side part that is reset.
        add: ``β``, strength of the additive term on top.
    """
    if tuple(aligned.shape) != tuple(weight.shape) or tuple(weight.shape) != (left.shape[0], right.shape[1]):
        raise ValueError(
            f"weight {tuple(weight.shape)} and aligned weight {tuple(aligned.shape)} must both be "
            f"{(left.shape[0], right.shape[1])}"
        )
    left, right, weight, aligned = _compute(left, right, weight, aligned)
    task = weight - aligned
    q = input_basis(right)
    reads = task @ q  # Δ·Q, d_out × r
    outside = reads - left @ (left.T @ reads)  # (I − P')Δ·Q
    factor_left = torch.cat([left, outside], dim=1)
    factor_right = torch.cat([add * right - alpha * (left.T @ task), -alpha * input_share * q.T], dim=0)
    return factor_left, factor_right


def variant_factors(
    form: str,
    left: Tensor,
    right: Tensor,
    weight: Tensor,
    unaligned: Tensor | None,
    alpha: float,
    add: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The correction factors of ``form`` (one of ``"additive"``, ``"reset"``, ``"erosion"``).

    ``"additive"`` is ``(U', α·U'ᵀδ)`` and needs no unaligned weight (``add`` is ignored).
    """
    if form == "additive":
        left, right = _compute(left, right)
        return left, alpha * right
    if unaligned is None:
        raise ValueError(f"the {form!r} fusion needs the unaligned weight")
    if form == "reset":
        return reset_factors(left, right, weight, unaligned, alpha, add)
    if form == "erosion":
        return erosion_factors(left, right, weight, unaligned, alpha, add)
    raise ValueError(f"fusion form must be one of {VARIANTS}, got {form!r}")
