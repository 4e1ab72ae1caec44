"""Input checks shared by the streaming paths."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_finite"]

# Floating formats with no NaN or inf encoding at all (OCP MX E2M1: every bit pattern is a finite number).
_ALWAYS_FINITE = frozenset(getattr(torch, name) for name in ("float4_e2m1fn_x2",) if hasattr(torch, name))


def all_finite(tensor: Tensor, chunk: int = 1 << 24) -> bool:
    """Whether ``tensor`` holds no NaN or inf, for every dtype.

    One sum first (NaN and inf always propagate into it), about 15x cheaper than an element-wise mask; only a
    non-finite sum, which a finite tensor can also reach by overflow, falls back to the exact mask. Integer,
    bool and bit dtypes cannot hold NaN or inf. Float8 and complex32 have no ``sum`` kernel on CPU: they are
    checked in float32 / complex64 chunks of ``chunk`` elements (a widening cast keeps NaN and inf), so the
    copy stays bounded by ``4 * chunk`` bytes.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.dtype in _ALWAYS_FINITE:
        return True
    if tensor.element_size() == 1 or tensor.dtype == torch.complex32:
        wide = torch.complex64 if tensor.is_complex() else torch.float32
        flat = tensor.reshape(-1)
        return all(_sum_finite(flat[i : i + chunk].to(wide)) for i in range(0, flat.numel(), chunk))
    return _sum_finite(tensor)


def _sum_finite(tensor: Tensor) -> bool:
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())
