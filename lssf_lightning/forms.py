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
from lssf_lightning.methods.base import Correction, LowRankPlanner
from lssf_lightning.validation import SettingError, check_choice

__all__ = [
    "AppliedForms",
    "check_method_options",
    "correction_product",
    "hold_out_lora_",
    "lora_b_weights",
    "low_rank_methods",
    "make_low_rank_planner",
    "unfuse",
]


# -- which methods, which parameters (one lookup, to switch to the method registry) ------------------------
def low_rank_methods() -> dict[str, tuple[str, ...]]:
    """``{method name: the parameters it takes}`` for every registered low-rank planner."""
    from lssf_lightning.methods import LSSFErosion, LSSFReset, LSSFTwoSided

    variants = {planner.method: tuple(planner.options) for planner in (LSSFReset, LSSFErosion, LSSFTwoSided)}
    return {"lssf": ("alpha",), **variants}


def check_method_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` without ``None`` values, after checking that ``method`` is a low-rank method and takes
    every one of them (one-line :class:`SettingError` naming the parameter otherwise)."""
    methods = low_rank_methods()
    check_choice("method", method, tuple(methods))
    given = {name: value for name, value in options.items() if value is not None}
    for name in given:
        if name not in methods[method]:
            raise SettingError(f"method {method!r} takes no {name!r} (it takes {', '.join(methods[method])})")
    return given


def make_low_rank_planner(
    method: str, subspace, options: Mapping[str, Any], *, aligned=None, unaligned=None
) -> LowRankPlanner:
    """The planner of ``method`` over a built ``subspace`` (its reference weights: ``aligned`` or
    ``unaligned``, as the method needs), through the methods' registry."""
    from lssf_lightning.io.weights import open_weights
    from lssf_lightning.methods import MethodInputs, make_planner

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


PlanFn = Callable[[Tensor | None], Correction | None]


class AppliedForms:
    """The corrections live weights carry, per state-dict key, as rank-``k`` factors.

    Args:
        plan: ``{key: W ↦ Correction}`` of a low-rank planner (``planner.low_rank_plan(store)``).
    """

    def __init__(self, plan: Mapping[str, PlanFn]) -> None:
        self.plan = dict(plan)
        self.applied: dict[str, Correction] = {}

    def raw(self, key: str, live: Tensor) -> Tensor:
        """``W − A``: the live weight less the correction it carries (at least float32)."""
        dtype = torch.promote_types(live.dtype, torch.float32)
        weight = live.detach().to(dtype)
        applied = self.applied.get(key)
        return weight if applied is None else weight - correction_product(applied, weight)

    def correction(self, key: str, raw: Tensor) -> Correction | None:
        """The form's correction ``C(raw)`` of ``key`` (``None``: the form leaves it unchanged)."""
        return self.plan[key](raw)

    def target(self, key: str, live: Tensor) -> tuple[Tensor, Correction | None]:
        """``(W − A) + C(W − A)`` (at least float32) and the new correction ``C(W − A)``."""
        raw = self.raw(key, live)
        correction = self.correction(key, raw)
        return (raw if correction is None else raw + correction_product(correction, raw)), correction

    def apply_(self, parameters: Mapping[str, Tensor]) -> None:
        """Edit the live ``parameters`` in place to the form of (live − applied) and record the new
        corrections. Memory: one dense temporary per matrix, one matrix at a time."""
        with torch.no_grad():
            for key in self.plan:
                weight = parameters[key]
                new, correction = self.target(key, weight)
                weight.copy_(new.to(weight.dtype))
                if correction is None:
                    self.applied.pop(key, None)
                else:
                    self.applied[key] = _to_cpu(correction)

    def fused(self, state: MutableMapping[str, Tensor]) -> dict[str, Correction]:
        """Checkpoint mode (nothing applied): replace each planned tensor of ``state`` by a new one holding
        the form of it; returns the corrections ``{key: (L, R)}`` added (``fused − L·R`` is the raw
        weight up to rounding, see :func:`unfuse`)."""
        added: dict[str, Correction] = {}
        for key in self.plan:
            raw = state[key]
            correction = self.correction(key, raw.detach())
            if correction is None:
                continue
            correction = _to_cpu(correction)
            state[key] = add_correction(raw.detach(), correction_product(correction, raw), 1.0)
            added[key] = correction
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


# -- the guard on a peft LoRA model ------------------------------------------------------------------------
def lora_b_weights(model: torch.nn.Module, subspace) -> dict[str, list[Tensor]]:
    """``{subspace name: [the lora_B weight of each adapter]}`` for the peft LoRA layers of ``model`` whose
    base weight is a subspace matrix."""
    layers = {f"{name}.base_layer.weight": module for name, module in model.named_modules()
              if isinstance(getattr(module, "lora_B", None), torch.nn.ModuleDict)}
    matched = subspace.match(list(layers))
    return {name: [b.weight for b in layers[key].lora_B.values()] for key, name in matched.items()}


def hold_out_lora_(model: torch.nn.Module, subspace, alpha: float = 1.0) -> int:
    """The reset of a LoRA run on the aligned model, in adapter form: ``B ← B − α·U'(U'ᵀB)`` for every
    adapter of every matched layer (:func:`~lssf_lightning.core.hold.hold_out_adapter_`); returns how many
    ``B`` were edited."""
    from lssf_lightning.core.hold import hold_out_adapter_

    count = 0
    with torch.no_grad():
        for name, weights in lora_b_weights(model, subspace).items():
            left = subspace[name].left
            for weight in weights:
                hold_out_adapter_(weight, left, alpha)
                count += 1
    return count
