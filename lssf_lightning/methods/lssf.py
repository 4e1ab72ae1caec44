"""LSSF as a planner: ``W ← W + α·U'(U'ᵀδ)`` (Eq. 13) on every weight of a safety subspace.

The factors come from a built :class:`~lssf_lightning.subspace.SafetySubspace` (or its file), or from a
:class:`~lssf_lightning.subspace.SubspaceBuilder` that builds each entry just when its weight is edited and
drops it after, so a streamed realignment never holds the factors of the whole model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from lssf_lightning.config import DEFAULT_ALPHA, SubspaceConfig
from lssf_lightning.io.names import KeyMatcher
from lssf_lightning.io.weights import WeightsLike, WeightStore
from lssf_lightning.methods.base import Correction, Edit
from lssf_lightning.methods.spec import MAX_STRENGTH, MethodInputs, MethodSpec, Param
from lssf_lightning.subspace import (
    SafetySubspace,
    SubspaceBuilder,
    SubspaceEntry,
    check_correspondence,
    target_keys,
)
from lssf_lightning.validation import check_finite

__all__ = ["ALPHA", "LSSF", "SPEC"]

ALPHA = Param(
    "alpha", float, DEFAULT_ALPHA,
    f"fusion strength (0 = no change; at most {MAX_STRENGTH:g}: beyond it the correction swamps the weights)",
    low=0.0, high=MAX_STRENGTH,
)


class LSSF:
    """The LSSF fusion as a planner.

    Args:
        subspace: a :class:`SafetySubspace`, the path of a saved one, or a :class:`SubspaceBuilder`.
        alpha: the fusion strength ``α`` (``0`` = no change).
        allow_partial: edit the weights the target and the subspace have in common (a warning gives the
            counts) instead of refusing a target whose targeted weights do not correspond.
    """

    reads_weights = False  # the additive term does not depend on the weight it corrects

    def __init__(
        self,
        subspace: SafetySubspace | SubspaceBuilder | str | os.PathLike,
        alpha: float = DEFAULT_ALPHA,
        *,
        allow_partial: bool = False,
    ) -> None:
        self.alpha = check_finite("alpha", alpha)
        self.subspace_file = None  # the file the subspace was read from, for messages
        if isinstance(subspace, (str, os.PathLike)):
            self.subspace_file = os.fspath(subspace)
            subspace = SafetySubspace.load(subspace)
        if not isinstance(subspace, (SafetySubspace, SubspaceBuilder)):
            raise TypeError(
                f"subspace must be a SafetySubspace, its file or a SubspaceBuilder, got "
                f"{type(subspace).__name__}"
            )
        self.subspace = subspace
        self.allow_partial = allow_partial

    @classmethod
    def from_pair(
        cls,
        aligned: WeightsLike,
        unaligned: WeightsLike,
        config: SubspaceConfig | Mapping[str, Any] | None = None,
        alpha: float = DEFAULT_ALPHA,
        *,
        allow_partial: bool = False,
        **builder_options: Any,
    ) -> LSSF:
        """LSSF whose entries are built lazily from ``aligned``/``unaligned`` (see
        :class:`SubspaceBuilder`)."""
        alpha = check_finite("alpha", alpha)  # before the builder opens any file
        builder = SubspaceBuilder(aligned, unaligned, config, allow_partial=allow_partial, **builder_options)
        return cls(builder, alpha, allow_partial=allow_partial)

    def input_paths(self) -> list:
        """What it reads: the subspace (its file, or the builder's models) and the reference weights of the
        reset forms (for the output guard)."""
        return [self.subspace, getattr(self, "unaligned", None), getattr(self, "aligned", None)]

    @property
    def names(self) -> list[str]:
        """The subspace's matrices."""
        return self.subspace.names if isinstance(self.subspace, SubspaceBuilder) else self.subspace.keys()

    def _entry(self, name: str) -> SubspaceEntry:
        if isinstance(self.subspace, SubspaceBuilder):
            return self.subspace.build(name)
        return self.subspace[name]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{matrix: its stored shape}``."""
        if isinstance(self.subspace, SubspaceBuilder):
            return {n: tuple(self.subspace.aligned.shape(k)) for n, (k, _) in self.subspace.pairs.items()}
        return {n: e.shape for n, e in self.subspace.entries.items()}

    def plan(self, target: WeightStore) -> dict[str, Edit]:
        """``{key of target: W ↦ W + α·U'U'ᵀδ}``, after checking that target and subspace correspond.

        Every subspace matrix needs a weight in ``target``, and every weight of ``target`` that the
        subspace's selection (its recorded ``target_modules`` / ``exclude_modules``) targets needs a subspace
        matrix, unless ``allow_partial``.
        """
        return {key: self._edit(name) for key, name in self._match(target).items()}

    def low_rank_plan(self, target: WeightStore) -> dict[str, Callable[[Tensor | None], Correction | None]]:
        """As :meth:`plan`, each edit as its rank-``r`` factors (for a LoRA adapter)."""
        return {key: functools.partial(self._low_rank, name) for key, name in self._match(target).items()}

    def _match(self, target: WeightStore) -> dict[str, str]:
        """``{target key: subspace name}``; refuses a target that does not correspond (see :meth:`plan`)."""
        names = self.names
        two_d = [k for k in target if len(target.shape(k)) == 2]
        matched = KeyMatcher(names).match_all(two_d)
        selection = self.subspace.config  # None for a subspace without recorded settings: one direction only
        targeted = (
            list(matched)
            if selection is None
            else target_keys(
                target, selection.target_modules, selection.exclude_modules, known_linear=matched
            )
        )
        check_correspondence(
            targeted,
            names,
            target.location,
            "the safety subspace",
            allow_partial=self.allow_partial,
            pool=two_d,
        )
        shapes = self.shapes
        bad = [
            f"{k}: {tuple(target.shape(k))} vs {shapes[n]}"
            for k, n in matched.items()
            if tuple(target.shape(k)) != shapes[n]
        ]
        if bad:
            raise ValueError(
                f"weights of {target.location} do not have the subspace's shapes, e.g. {bad[:3]}"
            )
        return matched

    def _edit(self, name: str) -> Edit:
        return lambda weight: self._entry(name).fuse(weight, self.alpha, name)

    def _low_rank(self, name: str, weight: Tensor | None) -> Correction | None:
        """Eq. 13's term as ``(α·U', U'ᵀδ)`` (float64; ``weight`` is not needed)."""
        entry = self._entry(name)
        if entry.rank == 0 or self.alpha == 0:
            return None
        left, right = self.alpha * entry.left.double(), entry.right.double()
        return Correction(left, right, entry.conv1d, entry.left.dtype)

    def summary(self) -> dict[str, Any]:
        """``α`` and the mean rank of the entries used (a builder's fill in as they are built)."""
        ranks = self.subspace.ranks
        return {"alpha": self.alpha, "mean_rank": round(sum(ranks.values()) / max(len(ranks), 1), 1)}


def _factory(inputs: MethodInputs) -> LSSF:
    alpha = inputs.options["alpha"]
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


SPEC = MethodSpec(
    "lssf", _factory, (ALPHA,), grid=((0.5,), (1.0,)), uses_subspace=True,
    help="the paper's additive fusion W + alpha*P'delta",
)
