"""Where a fine-tune's update goes: the share of it inside the safety subspace, per layer group.

For a weight ``W`` (output-major ``d_out × d_in``) with the safety directions ``U`` (``d_out × r``,
orthonormal columns, unweighted: ``P = UUᵀ``) and an update ``ΔW`` (since fit start, or over one step),
the share inside the subspace is ``‖PΔW‖²_F / ‖ΔW‖²_F = ‖UᵀΔW‖²_F / ‖ΔW‖²_F``. Over several matrices the
energies add up (a group's share is ``Σ‖UᵀΔW‖² / Σ‖ΔW‖²``). The drift of the subspace component from the
aligned model is ``‖Uᵀ(W − W_aligned)‖_F``: zero while the subspace stays as the aligned model had it.
A share near 0 means the run leaves the subspace alone (the paper's premise); a share near ``r/d_out``
means the subspace is no more isolated than a random one of its size.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = [
    "ALL",
    "factored_energy",
    "layer_group",
    "orthonormal_basis",
    "orthonormal_rows",
    "share_by_group",
    "subspace_energy",
]

ALL = "all"
"""The key of the share over every matrix in :func:`share_by_group`'s result."""

_ATTENTION = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")
_MLP = ("mlp", "feed_forward", "ffn", "gate_proj", "up_proj", "down_proj", "c_fc", "fc1", "fc2", "w1", "w2",
        "w3")


def layer_group(name: str) -> str:
    """``"attention"``, ``"mlp"`` or ``"other"`` from the module names in a weight's key."""
    segments = set(re.split(r"[._]", name)) | set(name.split("."))
    if segments & set(_ATTENTION):
        return "attention"
    if segments & set(_MLP):
        return "mlp"
    return "other"


def orthonormal_basis(left: Tensor) -> Tensor:
    """Orthonormal columns spanning ``left`` (``U'`` → ``U_r``; the weighting ``α_i`` dropped), at least
    float32."""
    left = left.to(torch.promote_types(left.dtype, torch.float32))
    if left.shape[1] == 0:
        return left
    q, _ = torch.linalg.qr(left)
    return q


def orthonormal_rows(left_rows: Tensor, gram: Tensor) -> Tensor:
    """Rows of an orthonormal basis of ``span(U')`` from a block of rows ``U'[rows]`` and the Gram matrix
    ``G = U'ᵀU'`` (summed over every block): ``U'[rows]·L⁻ᵀ`` with ``G = LLᵀ``, the rows of the QR's ``Q``
    (:func:`orthonormal_basis`) up to column signs, without the other rows. At least float32."""
    dtype = torch.promote_types(left_rows.dtype, torch.float32)
    if left_rows.shape[1] == 0:
        return left_rows.to(dtype)
    lower = torch.linalg.cholesky(gram.double())
    rows = torch.linalg.solve_triangular(lower, left_rows.double().T, upper=False).T
    return rows.to(dtype)


def subspace_energy(
    basis: Tensor, update: Tensor, reduce: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
) -> tuple[float, float]:
    """``(‖UᵀΔW‖²_F, ‖ΔW‖²_F)`` for an output-major ``update``; ``basis``: orthonormal ``U``.

    A block of rows (and columns) of ``ΔW`` passes its rows of ``U`` and ``reduce``: it gets this block's
    ``(U[rows]ᵀΔW[rows, cols], ‖ΔW[rows, cols]‖²)`` and returns the whole ``UᵀΔW`` and ``‖ΔW‖²`` (summed
    over the blocks)."""
    if tuple(update.shape[:1]) != tuple(basis.shape[:1]):
        raise ValueError(
            f"update of shape {tuple(update.shape)} does not match a basis of {tuple(basis.shape)}"
        )
    update = update.to(device=basis.device, dtype=torch.promote_types(basis.dtype, update.dtype))
    coordinates, total = basis.T @ update, update.square().sum()
    if reduce is not None:
        coordinates, total = reduce(coordinates, total)
    return float(coordinates.square().sum()), float(total)


def factored_energy(basis: Tensor, left: Tensor, right: Tensor) -> tuple[float, float]:
    """:func:`subspace_energy` of ``ΔW = left·right`` (``d_out × k`` and ``k × d_in``, e.g. a LoRA update
    ``s·B·A`` minus the start's) without the dense matrix: ``‖(UᵀL)R‖²`` and ``‖LR‖² = Σ(LᵀL ∘ RRᵀ)``."""
    if left.shape[0] != basis.shape[0] or left.shape[1] != right.shape[0]:
        raise ValueError(f"factors of shapes {tuple(left.shape)} and {tuple(right.shape)} do not match a "
                         f"basis of {tuple(basis.shape)}")
    dtype = torch.promote_types(basis.dtype, torch.promote_types(left.dtype, right.dtype))
    basis, left, right = (t.to(device=basis.device, dtype=dtype) for t in (basis, left, right))
    inside = ((basis.T @ left) @ right).square().sum()
    total = ((left.T @ left) * (right @ right.T)).sum()
    return float(inside), float(total)


def share_by_group(
    energies: Mapping[str, tuple[float, float]], group: Callable[[str], str] = layer_group
) -> dict[str, float]:
    """``{ALL: share over every matrix, group: share over its matrices}`` from ``{name: (inside, total)}``
    (:func:`subspace_energy`); a group whose update is zero has share ``0``."""
    sums: dict[str, list[float]] = {ALL: [0.0, 0.0]}
    for name, (inside, total) in energies.items():
        for key in (ALL, group(name)):
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += inside
            acc[1] += total
    return {key: (inside / total if total > 0 else 0.0) for key, (inside, total) in sums.items()}
