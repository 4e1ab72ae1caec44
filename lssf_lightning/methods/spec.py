"""What a realignment method declares: its parameters (:class:`Param`) and its registry entry
(:class:`MethodSpec`), and what its factory receives (:class:`MethodInputs`).

A parameter is declared once, in its method's module: name, type, range, default and help. The registry
(:mod:`lssf_lightning.methods.registry`) derives everything else from these declarations: the CLI flags of
``realign`` and ``sweep``, the validation of options (a parameter the method does not take is an error), the
sweep grid and the options ``realign`` feeds to the factory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lssf_lightning.config import SubspaceConfig
from lssf_lightning.io.weights import WeightStore
from lssf_lightning.validation import SettingError, check_int, check_range

__all__ = ["MAX_STRENGTH", "MethodInputs", "MethodSpec", "Param"]

MAX_STRENGTH = 100.0
"""The largest fusion strength (``α``, ``β``) a method option accepts. ``1`` adds the safety correction once
and the sweeps stay at ``≤ 2``; at ``100`` the correction already dwarfs the weights it edits, and a typo
such as ``1e30`` would overflow half-precision weights into ``inf``."""


@dataclass(frozen=True)
class Param:
    """One scalar parameter of a method.

    Args:
        name: the keyword (``alpha``); the CLI flag is ``--alpha`` (``_`` → ``-``).
        kind: ``float`` or ``int``.
        default: the value when the option is not given.
        help: one line for ``--help`` (the range and the default are appended).
        low, high: the inclusive bounds (``None``: unbounded on that side).
        high_open: ``high`` itself is excluded.
    """

    name: str
    kind: type
    default: float
    help: str
    low: float | None = None
    high: float | None = None
    high_open: bool = False

    @property
    def flag(self) -> str:
        """The CLI spelling, ``--input-share``."""
        return "--" + self.name.replace("_", "-")

    @property
    def interval(self) -> str:
        """The range as text, ``[0, 1)``."""
        if self.kind is int:
            return f">= {self.low:g}" if self.low is not None else "any integer"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"[{low}, {high}{')' if self.high_open or self.high is None else ']'}"

    def check(self, value: Any, name: str | None = None) -> Any:
        """``value`` converted and checked against the declared range (one-line ``SettingError`` naming
        ``name``, default the parameter's)."""
        name = name or self.name
        if self.kind is int:
            return check_int(name, value, minimum=int(self.low if self.low is not None else -(2**63)))
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        return check_range(name, value, low, high, high_open=self.high_open or self.high is None,
                           low_open=self.low is None)


@dataclass(frozen=True)
class MethodInputs:
    """What a method factory gets from ``realign_checkpoint`` or the sweep.

    Attributes:
        finetuned: the fine-tuned weights as opened (a :class:`~lssf_lightning.io.lora.MergedLoraStore` for a
            LoRA adapter directory); ``None`` in a sweep, which edits a live model.
        aligned, unaligned: the model pair (paths), when given.
        subspace: a precomputed subspace (object or file), when given.
        config: the subspace settings (also the target selection of the pair-based methods).
        options: the method's parameters, checked and completed with their defaults by the registry.
        allow_partial: edit only the weights all inputs have in common instead of refusing a mismatch.
        progress: show progress bars.
    """

    finetuned: WeightStore | None
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


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Args:
        name: the registry name (``--method NAME``).
        factory: ``MethodInputs ↦ Planner``.
        parameters: the declared parameters, in the order a sweep item lists values (``1+0.5``).
        grid: the sweep's default points, each a tuple of values for the first parameters.
        uses_subspace: the method edits with a safety subspace (the sweep gives it each grid subspace).
        lora_only: the method needs a LoRA fine-tune (the sweep offers it only for one).
        help: one line for the listings.
    """

    name: str
    factory: Callable[[MethodInputs], Any]
    parameters: tuple[Param, ...] = ()
    grid: tuple[tuple[float, ...], ...] = ()
    uses_subspace: bool = False
    lora_only: bool = False
    help: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        """The parameter names, in order."""
        return tuple(p.name for p in self.parameters)

    def point(self, values: tuple[float, ...]) -> dict[str, Any]:
        """A sweep item's values as ``{name: value}`` (the first parameters), checked."""
        if len(values) > len(self.parameters):
            raise SettingError(
                f"method {self.name!r} takes {len(self.parameters)} values ({', '.join(self.names)}), "
                f"got {values!r}"
            )
        return {p.name: p.check(v) for p, v in zip(self.parameters, values)}
