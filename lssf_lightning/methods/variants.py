"""The reset and erosion fusion forms as planners (the math: :mod:`lssf_lightning.core.variants`).

Both edit the same weights as :class:`~lssf_lightning.methods.lssf.LSSF` with the same safety subspace, and
need the unaligned weights besides (for ``U'ᵀW_aligned = U'ᵀW_unaligned + U'ᵀδ``; nothing dense is stored):

* :class:`LSSFReset` — ``W − α·P'(W − W_aligned) + β·P'δ``: the safety subspace back to the aligned state.
* :class:`LSSFErosion` — undo only the part of the task update inside the subspace that opposes ``δ``.
* :class:`LSSFTwoSided` — the reset on both sides: also the part of the task update that reads the subspace's
  inputs (needs the aligned weights instead).

Declared for the registry as ``"lssf-reset"`` and ``"lssf-erosion"`` (parameters ``alpha`` and ``add``) and
``"lssf-two-sided"`` (``alpha``, ``input_share``, ``add``): :data:`RESET`, :data:`EROSION`, :data:`TWO_SIDED`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lssf_lightning.config import DEFAULT_ADD, DEFAULT_ALPHA, DEFAULT_INPUT_SHARE, SubspaceConfig
from lssf_lightning.core.basis import add_correction
from lssf_lightning.core.factors import SubspaceEntry
from lssf_lightning.core.variants import two_sided_reset_factors, variant_factors
from lssf_lightning.io.names import KeyMatcher
from lssf_lightning.io.weights import WeightsLike, WeightStore, open_weights
from lssf_lightning.methods.base import Correction, Edit
from lssf_lightning.methods.lssf import ALPHA, LSSF
from lssf_lightning.methods.spec import MAX_STRENGTH, MethodInputs, MethodSpec, Param
from lssf_lightning.subspace import SafetySubspace, SubspaceBuilder, check_input_weight
from lssf_lightning.validation import SettingError, check_finite

__all__ = ["EROSION", "RESET", "TWO_SIDED", "LSSFErosion", "LSSFReset", "LSSFTwoSided"]

ADD = Param("add", float, DEFAULT_ADD, "strength of the additive term on top", low=0.0, high=MAX_STRENGTH)
INPUT_SHARE = Param("input_share", float, DEFAULT_INPUT_SHARE, "share rho of the input-side reset",
                    low=0.0, high=1.0)


class _ReferenceFusion(LSSF):
    """An LSSF-subspace fusion form whose correction of each matrix also reads that matrix in one model of the
    pair (:attr:`reference`: ``"unaligned"`` or ``"aligned"``); the form itself is :meth:`_factors`."""

    form = "additive"
    method = "lssf"
    reference = "unaligned"
    reads_weights = True
    # The declared parameters, in the order the constructor takes them after the reference weights.
    parameters: tuple[Param, ...] = (ALPHA, ADD)

    def _open_reference(self, weights: WeightsLike | None, title: str) -> WeightStore:
        """``weights`` (default: the builder's of the pair); ``title`` names the form in the error."""
        if weights is None and isinstance(self.subspace, SubspaceBuilder):
            store = getattr(self.subspace, self.reference)
        elif weights is None:
            raise ValueError(f"{title} needs the {self.reference} weights ({self.reference}=...)")
        else:
            store = open_weights(weights, name=self.reference)
        self._reference_keys = KeyMatcher(store.keys())
        return store

    def _reference_weight(self, name: str) -> Tensor:
        store = getattr(self, self.reference)
        if isinstance(self.subspace, SubspaceBuilder) and store is getattr(self.subspace, self.reference):
            aligned_key, unaligned_key = self.subspace.pairs[name]
            return store.get(aligned_key if self.reference == "aligned" else unaligned_key)
        key = self._reference_keys.match(name)
        if key is None:
            raise ValueError(f"{name} has no counterpart in the {self.reference} weights {store.location}")
        weight = store.get(key)
        check_input_weight(self.subspace, self.reference, name, weight, store.location,
                           subspace_file=getattr(self, "subspace_file", None))
        return weight

    def _factors(self, entry: SubspaceEntry, weight: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        """``(L, R)`` of the correction ``W ← W + L·R`` (output-major ``weight`` and ``reference``)."""
        raise NotImplementedError

    def _low_rank(self, name: str, weight: Tensor | None) -> Correction | None:
        """The form's ``(L, R)`` for the stored ``weight`` of ``name`` (``None`` for a rank-0 matrix)."""
        entry = self._entry(name)
        if weight is None or tuple(weight.shape) != entry.shape:
            shape = None if weight is None else tuple(weight.shape)
            raise ValueError(f"{name}: weight of shape {shape} does not match the subspace's {entry.shape}")
        if entry.rank == 0:
            return None
        reference = self._reference_weight(name)
        if entry.conv1d:
            weight, reference = weight.detach().T, reference.T
        left, right = self._factors(entry, weight.detach(), reference)
        return Correction(left, right, entry.conv1d, entry.left.dtype)

    def _edit(self, name: str) -> Edit:
        def edit(weight: Tensor) -> Tensor:
            correction = self._low_rank(name, weight)
            if correction is None:
                return weight.detach().clone()
            product = correction.left @ correction.right
            return add_correction(weight.detach(), product.T if correction.conv1d else product)

        return edit


class _VariantFusion(_ReferenceFusion):
    """A fusion form of :func:`lssf_lightning.core.variants.variant_factors` over an LSSF safety subspace."""

    def __init__(
        self,
        subspace: SafetySubspace | SubspaceBuilder | str | os.PathLike,
        unaligned: WeightsLike | None = None,
        alpha: float = DEFAULT_ALPHA,
        add: float = DEFAULT_ADD,
        *,
        allow_partial: bool = False,
    ) -> None:
        super().__init__(subspace, alpha, allow_partial=allow_partial)
        self.add = check_finite("add", add)
        self.unaligned = self._open_reference(unaligned, f"the {self.form} fusion")

    @classmethod
    def from_pair(
        cls,
        aligned: WeightsLike,
        unaligned: WeightsLike,
        config: SubspaceConfig | Mapping[str, Any] | None = None,
        alpha: float = DEFAULT_ALPHA,
        add: float = DEFAULT_ADD,
        *,
        allow_partial: bool = False,
        **builder_options: Any,
    ) -> _VariantFusion:
        """The form over entries built lazily from ``aligned``/``unaligned`` (see
        :class:`SubspaceBuilder`)."""
        alpha, add = check_finite("alpha", alpha), check_finite("add", add)
        builder = SubspaceBuilder(aligned, unaligned, config, allow_partial=allow_partial, **builder_options)
        return cls(builder, None, alpha, add, allow_partial=allow_partial)

    def _factors(self, entry: SubspaceEntry, weight: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`~lssf_lightning.core.variants.variant_factors` of :attr:`form`."""
        return variant_factors(self.form, entry.left, entry.right, weight, reference, self.alpha, self.add)

    def summary(self) -> dict[str, Any]:
        """The form, ``α``, ``β`` and the mean rank of the entries used."""
        return {"form": self.form, **super().summary(), "add": self.add}


class LSSFReset(_VariantFusion):
    """Reset fusion: ``W ← W − α·P'(W − W_aligned) + β·P'δ`` on every weight of a safety subspace.

    ``α = 1`` puts the safety subspace back to the aligned model's state instead of adding ``δ`` a second
    time as the paper's form does (``W`` already holds it); ``β`` (``add``) adds part of the additive term.

    Args:
        subspace: a :class:`SafetySubspace`, its file, or a :class:`SubspaceBuilder`.
        unaligned: the unaligned weights (module, mapping or path); default: the builder's.
        alpha: reset strength ``α``.
        add: additive strength ``β`` on top.
        allow_partial: as for :class:`~lssf_lightning.methods.lssf.LSSF`.
    """

    form = "reset"
    method = "lssf-reset"


class LSSFErosion(_VariantFusion):
    """Erosion fusion: undo, per safety direction, the part of the task update that opposes ``δ``.

    ``W ← W − α·Σ_i c_i·u'_i (u'_iᵀδ) + β·P'δ`` with ``c_i = min(⟨u'_iᵀΔ, u'_iᵀδ⟩, 0) / ‖u'_iᵀδ‖²`` and
    ``Δ = W − W_aligned`` (see :mod:`lssf_lightning.core.variants`). Arguments as for :class:`LSSFReset`.
    """

    form = "erosion"
    method = "lssf-erosion"


class LSSFTwoSided(_ReferenceFusion):
    """Two-sided reset: ``W ← W − α·[P'Δ + ρ·(I − P')Δ·QQᵀ] + β·P'δ`` (``Δ = W − W_aligned``, ``Q`` the inputs
    the safety directions read; see :func:`lssf_lightning.core.variants.two_sided_reset_factors`).

    Besides the output side (as :class:`LSSFReset`), it resets the part of the task update that reads the
    safety subspace's inputs. Needs the aligned weights.

    Args:
        subspace: a :class:`SafetySubspace`, its file, or a :class:`SubspaceBuilder`.
        aligned: the aligned weights (module, mapping or path); default: the builder's.
        alpha: reset strength ``α``.
        input_share: ``ρ``, how much of the input-side part is reset.
        add: additive strength ``β`` on top.
        allow_partial: as for :class:`~lssf_lightning.methods.lssf.LSSF`.
    """

    form = "two_sided"
    method = "lssf-two-sided"
    reference = "aligned"
    parameters = (ALPHA, INPUT_SHARE, ADD)

    def __init__(
        self,
        subspace: SafetySubspace | SubspaceBuilder | str | os.PathLike,
        aligned: WeightsLike | None = None,
        alpha: float = DEFAULT_ALPHA,
        input_share: float = DEFAULT_INPUT_SHARE,
        add: float = DEFAULT_ADD,
        *,
        allow_partial: bool = False,
    ) -> None:
        super().__init__(subspace, alpha, allow_partial=allow_partial)
        self.input_share, self.add = check_finite("input_share", input_share), check_finite("add", add)
        self.aligned = self._open_reference(aligned, "the two-sided reset")

    @classmethod
    def from_pair(
        cls,
        aligned: WeightsLike,
        unaligned: WeightsLike,
        config: SubspaceConfig | Mapping[str, Any] | None = None,
        alpha: float = DEFAULT_ALPHA,
        input_share: float = DEFAULT_INPUT_SHARE,
        add: float = DEFAULT_ADD,
        *,
        allow_partial: bool = False,
        **builder_options: Any,
    ) -> LSSFTwoSided:
        """The form over entries built lazily from ``aligned``/``unaligned`` (see
        :class:`SubspaceBuilder`)."""
        alpha = check_finite("alpha", alpha)
        builder = SubspaceBuilder(aligned, unaligned, config, allow_partial=allow_partial, **builder_options)
        return cls(builder, None, alpha, input_share, add, allow_partial=allow_partial)

    def _factors(self, entry: SubspaceEntry, weight: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`~lssf_lightning.core.variants.two_sided_reset_factors` (``reference``: ``W_aligned``)."""
        return two_sided_reset_factors(
            entry.left, entry.right, weight, reference, self.alpha, self.input_share, self.add
        )

    def summary(self) -> dict[str, Any]:
        """The form, ``α``, ``ρ``, ``β`` and the mean rank of the entries used."""
        return {"form": self.form, **super().summary(), "input_share": self.input_share, "add": self.add}


def _factory(planner: type[_ReferenceFusion]):
    """The registry factory of ``planner``: from a precomputed subspace and its reference weights, or lazily
    from the pair; the values of :attr:`~_ReferenceFusion.parameters` from ``inputs.options``."""

    def factory(inputs: MethodInputs) -> _ReferenceFusion:
        values = [inputs.options[p.name] for p in planner.parameters]
        flag = f"--{planner.reference}"
        if inputs.subspace is not None:
            reference = getattr(inputs, planner.reference)
            if reference is None:
                raise SettingError(f"method {planner.method!r} needs {flag} besides the subspace")
            return planner(inputs.subspace, reference, *values, allow_partial=inputs.allow_partial)
        inputs.require_pair(planner.method, f" (or a precomputed --subspace and {flag})")
        return planner.from_pair(
            inputs.aligned,
            inputs.unaligned,
            inputs.config,
            *values,
            allow_partial=inputs.allow_partial,
            progress=inputs.progress,
        )

    return factory


def _spec(planner: type[_ReferenceFusion], grid: tuple[tuple[float, ...], ...], help: str) -> MethodSpec:
    return MethodSpec(planner.method, _factory(planner), planner.parameters, grid, uses_subspace=True,
                      help=help)


RESET = _spec(LSSFReset, ((1.0, 0.0), (1.0, 0.15), (2.0, 0.0)),
              "reset the safety subspace to the aligned state (+ add of the additive term)")
EROSION = _spec(LSSFErosion, ((1.0, 0.0),), "undo the part of the task update that opposes safety")
TWO_SIDED = _spec(LSSFTwoSided, ((1.0, 0.5), (1.0, 1.0)), "the reset on the output and the input side")
