"""Realignment methods as planners (:mod:`~lssf_lightning.methods.base`), and the registry ``realign`` uses.

A method is one planner class plus one :func:`register_method` entry: a factory that receives the settings
``realign_checkpoint`` parsed (:class:`MethodInputs`) and returns a
:class:`~lssf_lightning.methods.base.Planner`. ``realign_checkpoint(method=name)`` and the CLI's ``--method``
accept every registered name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lssf_lightning.config import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_DROP_RATE,
    DEFAULT_SEED,
    DEFAULT_THRESHOLD,
    SubspaceConfig,
)
from lssf_lightning.io.lora import MergedLoraStore
from lssf_lightning.io.weights import WeightStore
from lssf_lightning.methods.base import Correction, Edit, LowRankPlanner, Planner, apply_edits
from lssf_lightning.methods.lssf import LSSF
from lssf_lightning.methods.resta import Resta, resta
from lssf_lightning.methods.safelora import SafeLoRA, safelora
from lssf_lightning.validation import SettingError, check_choice

__all__ = [
    "LSSF",
    "METHODS",
    "Correction",
    "Edit",
    "LSSFErosion",
    "LSSFReset",
    "LSSFTwoSided",
    "LowRankPlanner",
    "MethodInputs",
    "Planner",
    "Resta",
    "SafeLoRA",
    "apply_edits",
    "make_planner",
    "register_method",
    "resta",
    "safelora",
]


@dataclass(frozen=True)
class MethodInputs:
    """What a method factory gets from ``realign_checkpoint``.

    Attributes:
        finetuned: the fine-tuned weights as opened (a :class:`~lssf_lightning.io.lora.MergedLoraStore` for a
            LoRA adapter directory).
        aligned, unaligned: the model pair (paths), when given.
        subspace: a precomputed subspace (object or file), when given.
        config: the subspace settings (also the target selection of the pair-based methods).
        options: the methods' scalar settings (``alpha``, ``beta``, ``drop_rate``, ``seed``, ``threshold`` and
            whatever a registered method adds); each factory reads its own.
        allow_partial: edit only the weights all inputs have in common instead of refusing a mismatch.
        progress: show progress bars.
    """

    finetuned: WeightStore
    aligned: str | os.PathLike | None = None
    unaligned: str | os.PathLike | None = None
    subspace: Any = None
    config: SubspaceConfig = field(default_factory=SubspaceConfig)
    options: Mapping[str, Any] = field(default_factory=dict)
    allow_partial: bool = False
    progress: bool = True

    def require_pair(self, method: str, hint: str = "") -> None:
        """Refuse a run without both ``aligned`` and ``unaligned``."""
        if self.aligned is None or self.unaligned is None:
            raise SettingError(f"method {method!r} needs both --aligned and --unaligned{hint}")


Factory = Callable[[MethodInputs], Planner]
METHODS: dict[str, Factory] = {}


def register_method(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register ``factory`` as the method ``name`` (replacing an earlier one of that name)."""

    def register(factory: Factory) -> Factory:
        METHODS[name] = factory
        return factory

    return register


def make_planner(method: str, inputs: MethodInputs) -> Planner:
    """The planner of the registered ``method`` for ``inputs`` (validates the method's settings)."""
    check_choice("method", method, tuple(METHODS))
    return METHODS[method](inputs)


@register_method("lssf")
def _lssf(inputs: MethodInputs) -> LSSF:
    alpha = inputs.options.get("alpha", DEFAULT_ALPHA)
    if inputs.subspace is not None:
        return LSSF(inputs.subspace, alpha, allow_partial=inputs.allow_partial)
    inputs.require_pair("lssf", " (or a precomputed --subspace)")
    return LSSF.from_pair(
        inputs.aligned,
        inputs.unaligned,
        inputs.config,
        alpha,
        allow_partial=inputs.allow_partial,
        progress=inputs.progress,
    )


@register_method("resta")
def _resta(inputs: MethodInputs) -> Resta:
    options = inputs.options
    inputs.require_pair("resta")
    return Resta(
        inputs.aligned,
        inputs.unaligned,
        options.get("beta", DEFAULT_BETA),
        options.get("drop_rate", DEFAULT_DROP_RATE),
        options.get("seed", DEFAULT_SEED),
        inputs.config.target_modules,
        inputs.config.exclude_modules,
        allow_partial=inputs.allow_partial,
    )


@register_method("safelora")
def _safelora(inputs: MethodInputs) -> SafeLoRA:
    inputs.require_pair("safelora")
    if not isinstance(inputs.finetuned, MergedLoraStore):
        raise SettingError(
            f"safelora needs a LoRA run: {inputs.finetuned.location} is not a peft adapter directory"
        )
    return SafeLoRA(inputs.aligned, inputs.unaligned, inputs.options.get("threshold", DEFAULT_THRESHOLD))


# The fusion variants register themselves on import: lssf-reset, lssf-erosion, lssf-two-sided. Imported
# last (they use register_method, defined above), so `import lssf_lightning.methods` lists every method.
from lssf_lightning.methods.variants import LSSFErosion, LSSFReset, LSSFTwoSided  # noqa: E402
