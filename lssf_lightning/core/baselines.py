"""Per-matrix math of the baselines LSSF is compared with, on the same footing.

* RESTA (Bhardwaj et al., ACL 2024): add the whole safety vector back, ``W + β · δ``, optionally after DARE
  (drop each entry with probability ``p``, rescale the survivors by ``1 / (1 − p)``).
* SafeLoRA (Hsu et al., NeurIPS 2024): per LoRA layer, ``C = V Vᵀ / ‖V‖_F`` with
  ``V = W_aligned − W_unaligned``; when ``cos(vec(C·B·A), vec(B·A)) ≤ τ`` the adapter's ``B`` is replaced
  by ``C·B``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lssf_lightning.validation import check_drop_rate

__all__ = ["dare", "resta_weight", "safelora_project"]


def dare(delta: Tensor, drop_rate: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: zero each entry of ``delta`` with probability ``drop_rate`` and rescale the rest by
    ``1/(1 − p)``."""
    drop_rate = check_drop_rate("drop_rate", drop_rate)
    if drop_rate == 0.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device="cpu").to(delta.device) >= drop_rate
    return torch.where(keep, delta / (1.0 - drop_rate), torch.zeros_like(delta))


def resta_weight(
    weight: Tensor,
    delta: Tensor,
    beta: float = 1.0,
    drop_rate: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``W + β · DARE(δ)`` computed in float32 and cast back to ``weight``'s dtype (a new tensor)."""
    if tuple(weight.shape) != tuple(delta.shape):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match delta {tuple(delta.shape)}")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    sparse = dare(delta.to(device=weight.device, dtype=dtype), drop_rate, generator)
    return torch.add(weight.to(dtype), sparse, alpha=float(beta)).to(weight.dtype)


def safelora_project(
    lora_a: Tensor, lora_b: Tensor, safety_vector: Tensor, threshold: float = 0.5
) -> tuple[Tensor, float, bool]:
    """SafeLoRA's test and projection for one LoRA layer.

    Args:
        lora_a: ``A`` of shape ``(r, d_in)``.
        lora_b: ``B`` of shape ``(d_out, r)``.
        safety_vector: ``V = W_aligned − W_unaligned`` of shape ``(d_out, d_in)``.
        threshold: ``τ``; the layer is projected when the cosine is ``≤ τ``.

    Returns:
        ``(B', cosine, projected)`` where ``B' = C·B`` if projected, else ``B`` unchanged. ``C`` is never
        formed: ``C·B = V (Vᵀ B) / ‖V‖_F``.
    """
    if lora_b.shape[1] != lora_a.shape[0] or (lora_b.shape[0], lora_a.shape[1]) != tuple(safety_vector.shape):
        raise ValueError(
            f"LoRA factors B {tuple(lora_b.shape)} · A {tuple(lora_a.shape)} do not match the safety "
            f"vector {tuple(safety_vector.shape)}"
        )
    dtype = torch.promote_types(lora_b.dtype, torch.float32)
    a, b, v = (t.to(device=lora_b.device, dtype=dtype) for t in (lora_a, lora_b, safety_vector))
    norm = torch.linalg.matrix_norm(v)
    if norm == 0:
        return lora_b, 1.0, False
    projected_b = v @ (v.T @ b) / norm
    gram_a = a @ a.T
    inner = torch.trace(projected_b.T @ b @ gram_a)
    norm_update = torch.trace(b.T @ b @ gram_a).clamp_min(0).sqrt()
    norm_projected = torch.trace(projected_b.T @ projected_b @ gram_a).clamp_min(0).sqrt()
    denominator = float(norm_update * norm_projected)
    cosine = float(inner) / denominator if denominator > 0 else 1.0
    if not math.isfinite(cosine):
        raise ValueError("SafeLoRA cosine is not finite: the LoRA factors or the safety vector hold NaN/inf")
    if cosine <= threshold:
        return projected_b.to(lora_b.dtype), cosine, True
    return lora_b, cosine, False
