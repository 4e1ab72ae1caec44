"""lssf_lightning: Low-Rank Safety Subspace Fusion (LSSF) for PyTorch Lightning.

The core (:mod:`lssf_lightning.core`, :class:`SafetySubspace`, :func:`realign_checkpoint`) needs no Lightning;
:class:`LSSFCallback` and the Lightning modules load lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from lssf_lightning.core.basis import basis_weights, fuse_weight, fusion_factors, weighted_basis
from lssf_lightning.core.entropy import safety_critical_rank, safety_singular_value_entropy
from lssf_lightning.subspace import SafetySubspace

__version__ = "0.1.0"

_LAZY = {
    "LSSFCallback": "lssf_lightning.lightning.callback",
    "CausalLMModule": "lssf_lightning.lightning.finetune",
    "ChatDataModule": "lssf_lightning.lightning.finetune",
    "HarmfulRefusalRate": "lssf_lightning.metrics.refusal",
    "harmful_refusal_rate": "lssf_lightning.metrics.refusal",
    "realign_checkpoint": "lssf_lightning.realign",
    "resta": "lssf_lightning.baselines",
    "safelora": "lssf_lightning.baselines",
    "safety_spectrum": "lssf_lightning.core.svd",
}

__all__ = [
    "SafetySubspace",
    "basis_weights",
    "fuse_weight",
    "fusion_factors",
    "safety_critical_rank",
    "safety_singular_value_entropy",
    "weighted_basis",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lssf_lightning' has no attribute {name!r}")
