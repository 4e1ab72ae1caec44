"""Every low-rank LSSF form on live weights, tracked as rank-``k`` factors so applications never stack.

A low-rank planner (:class:`~lssf_lightning.methods.base.LowRankPlanner`: ``lssf``, ``lssf-reset``,
``lssf-erosion``, ``lssf-two-sided`` and any newly registered one) gives, per weight, the correction
``C(W) = L·R`` of its form. On live weights that keep training, an application must not add a second
correction on top of the first (the additive form would stack) nor reset an already reset weight (the reset at
``α = 2`` is a reflection: applied twice it undoes itself). :class:`AppliedForms` keeps the correction ``A``
the live weights carry, as its factors, and each application leaves ``W ← (W − A) + C(W − A)``: the form
applied to the live weights less what is already in them. Nothing but the factors is stored.

Checkpoint mode uses the same object with nothing applied: :meth:`AppliedForms.fused` is the form applied to
the raw weights, and the correction's factors are what makes the raw weights recoverable (``fused − L·R``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from lssf_lightning.core.basis import add_correction, low_rank_product
from lssf_lightning.core.variants import coordinate_right
from lssf_lightning.io.weights import open_weights
from lssf_lightning.methods.base import Correction, LowRankPlanner
from lssf_lightning.methods.registry import METHODS, check_options, make_planner
from lssf_lightning.methods.spec import MethodInputs
from lssf_lightning.validation import SettingError, check_choice, check_finite, check_int


# -- which methods, which parameters: the method registry's declarations ------------------------------------
def low_rank_methods() -> dict[str, tuple[str, ...]]:
    """``{method name: the parameters it takes}`` for every registered method that edits with the safety
    subspace (the low-rank planners: ``lssf``, ``lssf-reset``, ``lssf-erosion``, ``lssf-two-sided``, …)."""
    return {name: spec.names for name, spec in METHODS.items() if spec.uses_subspace}


def check_method_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The given (not ``None``) ``options`` of the low-rank ``method``, each checked against its declaration
    (:func:`~lssf_lightning.methods.registry.check_options`: a parameter the method does not take is a
    one-line :class:`SettingError` naming the ones it takes); ``alpha="auto"`` passes through."""
    check_choice("method", method, tuple(low_rank_methods()))
    given = {name: value for name, value in options.items() if value is not None}
    numbers = {name: value for name, value in given.items() if not (name == "alpha" and value == "auto")}
    checked = check_options(method, numbers)
    return {name: checked[name] if name in numbers else value for name, value in given.items()}


def make_low_rank_planner(
    method: str, subspace, options: Mapping[str, Any], *, aligned=None, unaligned=None
) -> LowRankPlanner:
    """The planner of ``method`` over a built ``subspace`` (its reference weights: ``aligned`` or
    ``unaligned``, as the method needs), through the methods' registry."""
    given = check_method_options(method, options)
    inputs = MethodInputs(open_weights({}, name="live weights"), aligned=aligned, unaligned=unaligned,
                          subspace=subspace, options=given, progress=False)
    planner = make_planner(method, inputs)
    if not isinstance(planner, LowRankPlanner):  # pragma: no cover - low_rank_methods lists only these
        raise SettingError(f"method {method!r} is not a low-rank form")
    return planner


# -- the math on one weight --------------------------------------------------------------------------------
def correction_product(correction: Correction, like: Tensor) -> Tensor:
    """The dense ``L·R`` in ``like``'s (stored) layout, in at least float32 and ``like``'s precision."""
    product = low_rank_product(correction.left, correction.right, like)
    return product.T if correction.conv1d else product


def _to_cpu(correction: Correction) -> Correction:
    return Correction(correction.left.detach().cpu(), correction.right.detach().cpu(), correction.conv1d,
                      correction.dtype)


def difference(new: Correction | None, old: Correction | None) -> Correction:
    """The factors of ``new − old`` (either may be ``None``), on the CPU."""
    if old is None:
        return _to_cpu(new)
    dtype = torch.promote_types(old.right.dtype, torch.float32)
    old = Correction(old.left.cpu().to(dtype), -old.right.cpu().to(dtype), old.conv1d, old.dtype)
    if new is None:
        return old
    new = _to_cpu(new)
    dtype = torch.promote_types(dtype, new.left.dtype)
    return Correction(torch.cat([new.left.to(dtype), old.left.to(dtype)], dim=1),
                      torch.cat([new.right.to(dtype), old.right.to(dtype)], dim=0), new.conv1d, new.dtype)


PlanFn = Callable[[Tensor | None], Correction | None]


class AppliedForms:
    """The corrections live weights carry, per state-dict key, as rank-``k`` factors.

    Args:
        plan: ``{key: W ↦ Correction}`` of a low-rank planner (``planner.low_rank_plan(store)``).
    """

    def __init__(self, plan: Mapping[str, PlanFn]) -> None:
        self.plan = dict(plan)
        self.applied: dict[str, Correction] = {}
        self.outside: dict[str, Any] = {}
        """``{key: the update the weight the form reads holds beyond the stored one}`` (a peft LoRA adapter,
        :class:`~lssf_lightning.forms.lora.LoraUpdate`: ``dense(like)``, ``coordinates(U')``): the form reads
        ``stored + update`` and its correction goes into the stored weight."""

    def raw(self, key: str, live: Tensor) -> Tensor:
        """``W − A``: the live weight less the correction it carries (at least float32)."""
        dtype = torch.promote_types(live.dtype, torch.float32)
        weight = live.detach().to(dtype)
        applied = self.applied.get(key)
        return weight if applied is None else weight - correction_product(applied, weight)

    def correction(self, key: str, raw: Tensor) -> Correction | None:
        """The form's correction ``C(raw)`` of ``key`` (``None``: the form leaves it unchanged)."""
        return self.plan[key](raw)

    def read(self, key: str, raw: Tensor) -> Tensor:
        """The weight the form reads for a stored ``raw`` weight: ``raw`` plus its :attr:`outside` update."""
        update = self.outside.get(key)
        dense = None if update is None else update.dense(raw)
        return raw if dense is None else raw + dense

    def target(self, key: str, live: Tensor, stored: bool = False) -> tuple[Tensor, Correction | None]:
        """``(W − A) + C(W − A)`` (at least float32) and the new correction ``C(W − A)``; ``stored``: ``live``
        is the stored weight, the form reads it with its :attr:`outside` update (:meth:`read`)."""
        raw = self.raw(key, live)
        correction = self.correction(key, self.read(key, raw) if stored else raw)
        return (raw if correction is None else raw + correction_product(correction, raw)), correction

    def apply_(self, parameters: Mapping[str, Tensor]) -> None:
        """Edit the live ``parameters`` in place to the form of (live − applied) and record the new
        corrections. Memory: one dense temporary per matrix, one matrix at a time."""
        with torch.no_grad():
            for key in self.plan:
                weight = parameters[key]
                new, correction = self.target(key, weight, stored=True)
                weight.copy_(new.to(weight.dtype))
                if correction is None:
                    self.applied.pop(key, None)
                else:
                    self.applied[key] = _to_cpu(correction)

    def fused(self, state: MutableMapping[str, Tensor]) -> dict[str, Correction]:
        """A checkpoint's copy of the weights: replace each planned tensor of ``state`` (the live weights) by
        a new one holding the form of (it − the correction it carries); returns ``{key: (L, R)}`` with
        ``fused − L·R`` = the live weight up to rounding (:func:`unfuse`): the new correction less the one
        already carried (rank ``k + k'``)."""
        added: dict[str, Correction] = {}
        for key in self.plan:
            live = state[key].detach()
            correction = self.correction(key, self.read(key, self.raw(key, live)))
            applied = self.applied.get(key)
            if correction is None and applied is None:
                continue
            change = difference(correction, applied)
            state[key] = add_correction(live, correction_product(change, live), 1.0)
            added[key] = change
        return added

    def state_dict(self) -> dict[str, Any]:
        """The applied corrections as plain tensors (for a checkpoint's callback state)."""
        return {key: {"left": c.left, "right": c.right, "conv1d": c.conv1d}
                for key, c in self.applied.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s corrections."""
        self.applied = {key: Correction(v["left"], v["right"], bool(v["conv1d"]), v["left"].dtype)
                        for key, v in state.items()}


def unfuse(fused: Tensor, correction: Correction) -> Tensor:
    """``fused − L·R`` rounded as :meth:`AppliedForms.fused` added it (a new tensor in ``fused``'s dtype)."""
    return add_correction(fused.detach(), correction_product(correction, fused), -1.0)



class CoordinateForms(AppliedForms):
    """:class:`AppliedForms` for the forms whose correction is ``U'·R(U'ᵀ(W − W_aligned))`` (the reset and
    the erosion): live applications are rank-``r`` edits from ``r × d_in`` coordinates, no dense copy.

    With ``A = U'a`` applied (``a``: ``r × d_in``), the coordinates of ``W − A`` are
    ``U'ᵀW − (U'ᵀU')a − U'ᵀW_aligned``, and the application is ``W ← W + U'(a' − a)`` with ``a'`` =
    :func:`~lssf_lightning.core.variants.coordinate_right` of them: one ``r × d_in`` product with the weight
    and one rank-``r`` update in place. Checkpoint fusion (:meth:`fused`) is inherited.

    Args:
        plan: the planner's ``low_rank_plan`` (for :meth:`fused`).
        factors: ``{key: (U', U'ᵀδ, U'ᵀW_aligned, conv1d)}``.
        form: ``"reset"`` or ``"erosion"``.
        alpha, add: the form's ``α`` and ``β``.
    """

    def __init__(self, plan: Mapping[str, PlanFn], factors: Mapping[str, tuple[Tensor, Tensor, Tensor, bool]],
                 form: str, alpha: float, add: float) -> None:
        super().__init__(plan)
        self.factors, self.form, self.alpha, self.add = dict(factors), form, float(alpha), float(add)
        self.grams = {key: f[0].T.double() @ f[0].double() for key, f in self.factors.items()}  # U'ᵀU', once

    def apply_(self, parameters: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for key, (left, right, coordinates, conv1d) in self.factors.items():
                weight = parameters[key]
                matrix = weight.T if conv1d else weight
                dtype = torch.promote_types(weight.dtype, torch.float32)
                left_d = left.to(device=weight.device, dtype=dtype)
                current = left_d.T @ matrix.to(dtype)  # U'ᵀW
                update = self.outside.get(key)  # a LoRA adapter: U'ᵀ(W + s·B·A), rank-sized
                extra = None if update is None else update.coordinates(left_d)
                current = current if extra is None else current + extra
                applied = self.applied.get(key)
                if applied is not None:
                    previous = applied.right.to(device=weight.device, dtype=dtype)
                    gram = self.grams[key].to(device=weight.device, dtype=dtype)  # skipped when orthonormal
                    orthonormal = torch.allclose(gram, gram.new_ones(len(gram)).diag(), rtol=0.0, atol=1e-5)
                    current = current - (previous if orthonormal else gram @ previous)  # U'ᵀ(W − A)
                erosion = current - coordinates.to(device=weight.device, dtype=dtype)
                new = coordinate_right(self.form, erosion, right.to(device=weight.device, dtype=dtype),
                                       self.alpha, self.add)
                step = new if applied is None else new - previous
                if weight.dtype == dtype:
                    matrix.addmm_(left_d, step)
                else:
                    matrix.copy_(torch.addmm(matrix.to(dtype), left_d, step).to(weight.dtype))
                self.applied[key] = Correction(left.detach().cpu(), new.cpu(), conv1d, left.dtype)


# -- a callback's forms: checkpoint fusion, live applications, exact resume --------------------------------
CORRECTIONS_KEY = "lssf_corrections"
"""Checkpoint key of the corrections a form fused into ``state_dict``: ``{key: {"left", "right", "conv1d"}}``
(``fused − left·right`` is the raw weight, the stored fix-ups make it exact)."""

APPLY_ON_FORMS: tuple[str, ...] = ("checkpoint", "epochs", "train_end", "steps")
"""The modes a non-additive form (or the per-step guard) runs in."""


def check_form_settings(method: str, options: Mapping[str, Any], apply_on: str, every_n_steps: Any) -> None:
    """The callbacks' form settings: a low-rank ``method`` with only its own parameters, a numeric ``alpha``,
    a mode of :data:`APPLY_ON_FORMS`, and ``every_n_steps`` (an int ``≥ 1``) exactly with ``"steps"``."""
    given = check_method_options(method, options)
    for name, value in given.items():
        if not (name == "alpha" and value == "auto"):  # alpha='auto': the run chooses (monitoring.AlphaTuner)
            check_finite(name, value)
    check_choice("apply_on", apply_on, APPLY_ON_FORMS)
    if apply_on == "steps":
        check_int("every_n_steps", every_n_steps, minimum=1)
    elif every_n_steps is not None:
        raise SettingError(f"every_n_steps is only used with apply_on='steps', not {apply_on!r}")


def uses_forms(method: str, apply_on: str) -> bool:
    """Whether a callback runs through :class:`LiveForms` (every form but the paper's additive one outside
    the per-step guard goes there; ``"lssf"`` in the other modes keeps the scalar-α path of
    :mod:`lssf_lightning.training`)."""
    return method != "lssf" or apply_on == "steps"

