"""lssf_lightning: Low-Rank Safety Subspace Fusion (LSSF) for PyTorch Lightning.

The core (:class:`SafetySubspace`, :func:`realign_checkpoint`, the methods in :mod:`lssf_lightning.methods`)
needs no Lightning. Every public name is imported on first use, so ``import lssf_lightning`` (and the
``lssf-lightning`` command's start-up) costs nothing; the ``TYPE_CHECKING`` block below shows IDEs and type
checkers where each name lives.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("lssf-lightning")  # the one place the version is written: pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from lssf_lightning.config import AutoAlphaConfig, SubspaceConfig
    from lssf_lightning.core.basis import basis_weights, fusion_factors, weighted_basis
    from lssf_lightning.core.entropy import safety_critical_rank, safety_singular_value_entropy
    from lssf_lightning.core.svd import safety_spectrum
    from lssf_lightning.integrations.hf_trainer import LSSFTrainerCallback
    from lssf_lightning.lightning.callback import LSSFCallback
    from lssf_lightning.lightning.data import ChatDataModule
    from lssf_lightning.lightning.module import CausalLMModule
    from lssf_lightning.lightning.monitor import RefusalMonitor
    from lssf_lightning.methods import LSSF, Resta, SafeLoRA, apply_edits, resta, safelora
    from lssf_lightning.metrics.refusal import (
        RefusalRate,
        refusal_rate,
    )
    from lssf_lightning.realign import realign_checkpoint
    from lssf_lightning.subspace import SafetySubspace

_EXPORTS = {
    "AutoAlphaConfig": "lssf_lightning.config",
    "SubspaceConfig": "lssf_lightning.config",
    "basis_weights": "lssf_lightning.core.basis",
    "fusion_factors": "lssf_lightning.core.basis",
    "weighted_basis": "lssf_lightning.core.basis",
    "safety_critical_rank": "lssf_lightning.core.entropy",
    "safety_singular_value_entropy": "lssf_lightning.core.entropy",
    "safety_spectrum": "lssf_lightning.core.svd",
    "LSSFTrainerCallback": "lssf_lightning.integrations.hf_trainer",
    "LSSFCallback": "lssf_lightning.lightning.callback",
    "CausalLMModule": "lssf_lightning.lightning.module",
    "ChatDataModule": "lssf_lightning.lightning.data",
    "RefusalMonitor": "lssf_lightning.lightning.monitor",
    "LSSF": "lssf_lightning.methods",
    "Resta": "lssf_lightning.methods",
    "SafeLoRA": "lssf_lightning.methods",
    "apply_edits": "lssf_lightning.methods",
    "resta": "lssf_lightning.methods",
    "safelora": "lssf_lightning.methods",
    "RefusalRate": "lssf_lightning.metrics.refusal",
    "refusal_rate": "lssf_lightning.metrics.refusal",
    "realign_checkpoint": "lssf_lightning.realign",
    "SafetySubspace": "lssf_lightning.subspace",
}

__all__ = [
    "LSSF",
    "AutoAlphaConfig",
    "CausalLMModule",
    "ChatDataModule",
    "LSSFCallback",
    "LSSFTrainerCallback",
    "RefusalMonitor",
    "RefusalRate",
    "Resta",
    "SafeLoRA",
    "SafetySubspace",
    "SubspaceConfig",
    "apply_edits",
    "basis_weights",
    "fusion_factors",
    "realign_checkpoint",
    "refusal_rate",
    "resta",
    "safelora",
    "safety_critical_rank",
    "safety_singular_value_entropy",
    "safety_spectrum",
    "weighted_basis",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lssf_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
