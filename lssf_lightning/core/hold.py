"""The per-step guard's rank-``r`` edits: the safety subspace back to the aligned state, no dense copy.

``W ← W − α·U'(U'ᵀW − U'ᵀW_aligned)`` is the reset form (:mod:`lssf_lightning.core.variants`) written as
an in-place rank-``r`` update; with ``α = 1`` and orthonormal ``U`` (``α₁ = 1``) it leaves
``Uᵀ(W − W_aligned) = 0``. For a LoRA layer on the aligned model, ``W = W_aligned + s·B·A``, the same reset
is ``B ← B − α·U'(U'ᵀB)``: the adapter held out of the subspace, exact and still a LoRA adapter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["hold_out_adapter_", "reset_in_place_"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def reset_in_place_(
    weight: Tensor, left: Tensor, aligned_coordinates: Tensor, alpha: float = 1.0, *, conv1d: bool = False
) -> Tensor:
    """``W ← W − α·U'(U'ᵀW − U'ᵀW_aligned)`` in place (``weight`` stored transposed when ``conv1d``).

    Args:
        weight: the whole live weight (``U'ᵀW`` sums over every row: a row shard needs an all-reduce).
        left: ``U'`` (``d_out × r``).
        aligned_coordinates: ``U'ᵀW_aligned`` (``r × d_in``).
        alpha: reset strength.

    Returns ``U'ᵀW − U'ᵀW_aligned`` before the edit (``r × d_in``), e.g. to measure how far it had drifted.
    """
    matrix = weight.T if conv1d else weight
    dtype = _compute_dtype(weight, left, aligned_coordinates)
    left = left.to(device=weight.device, dtype=dtype)
    drift = left.T @ matrix.to(dtype) - aligned_coordinates.to(device=weight.device, dtype=dtype)
    if weight.dtype == dtype:
        matrix.addmm_(left, drift, alpha=-alpha)
    else:
        matrix.copy_(torch.addmm(matrix.to(dtype), left, drift, alpha=-alpha).to(weight.dtype))
    return drift


def hold_out_adapter_(
    lora_b: Tensor, left: Tensor, alpha: float = 1.0, reduce: Callable[[Tensor], Tensor] | None = None
) -> None:
    """``B ← B − α·U'(U'ᵀB)`` in place for a LoRA ``B`` (``d_out × r_lora``): the reset of the adapter's
    update ``s·B·A`` inside the safety subspace (``P'`` acts on the output side, ``B``'s rows).

    A row shard of ``B`` passes its rows of ``U'`` and ``reduce``: ``U'ᵀB`` is then the sum over every
    rank's ``U'[rows]ᵀB[rows]`` (``reduce`` gets this rank's ``r × r_lora`` part, returns the sum)."""
    dtype = _compute_dtype(lora_b, left)
    left = left.to(device=lora_b.device, dtype=dtype)
    coordinates = left.T @ lora_b.to(dtype)
    if reduce is not None:
        coordinates = reduce(coordinates)
    edited = lora_b.to(dtype) - alpha * left @ coordinates
    lora_b.copy_(edited.to(lora_b.dtype))
