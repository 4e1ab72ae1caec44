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

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from lssf_lightning.core.basis import add_correction, low_rank_product
from lssf_lightning.core.checks import all_finite
from lssf_lightning.core.hold import hold_out_adapter_
from lssf_lightning.core.variants import aligned_coordinates, coordinate_right
from lssf_lightning.distributed import fixups_of_rank, gather_fixups, global_rank, is_dtensor
from lssf_lightning.distributed.collectives import agreed_count
from lssf_lightning.distributed.sharded_forms import (
    SHARDED_FORMS,
    ShardedForms,
    is_sharded_record,
    restore_raw_blocks,
)
from lssf_lightning.io.weights import open_weights
from lssf_lightning.methods.base import Correction, LowRankPlanner
from lssf_lightning.methods.registry import METHODS, check_options, make_planner
from lssf_lightning.methods.spec import MethodInputs
from lssf_lightning.training import RAW_FIXUPS_KEY, ResumeError, apply_fixup, make_fixup, temporarily_fused
from lssf_lightning.validation import SettingError, check_choice, check_finite, check_int

__all__ = [
    "APPLY_ON_FORMS",
    "CORRECTIONS_KEY",
    "AppliedForms",
    "Candidates",
    "LiveForms",
    "LoraHoldOut",
    "CoordinateForms",
    "MissingCorrection",
    "check_form_settings",
    "check_method_options",
    "correction_product",
    "hold_out_lora_",
    "lora_b_weights",
    "low_rank_methods",
    "make_low_rank_planner",
    "restore_raw",
    "run_form",
    "temporarily_raw",
    "unfuse",
    "uses_forms",
]


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


def _difference(new: Correction | None, old: Correction | None) -> Correction:
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
        """A checkpoint's copy of the weights: replace each planned tensor of ``state`` (the live weights) by
        a new one holding the form of (it − the correction it carries); returns ``{key: (L, R)}`` with
        ``fused − L·R`` = the live weight up to rounding (:func:`unfuse`): the new correction less the one
        already carried (rank ``k + k'``)."""
        added: dict[str, Correction] = {}
        for key in self.plan:
            live = state[key].detach()
            correction = self.correction(key, self.raw(key, live))
            applied = self.applied.get(key)
            if correction is None and applied is None:
                continue
            difference = _difference(correction, applied)
            state[key] = add_correction(live, correction_product(difference, live), 1.0)
            added[key] = difference
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
    count = 0
    with torch.no_grad():
        for name, weights in lora_b_weights(model, subspace).items():
            left = subspace[name].left
            for weight in weights:
                hold_out_adapter_(weight, left, alpha)
                count += 1
    return count


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


class LiveForms:
    """A low-rank form on a module's weights: checkpoint fusion with an exact resume, and live applications
    that never stack (:class:`AppliedForms`; on DTensor shards, FSDP2, :class:`ShardedForms`: shard-local,
    one ``r × d_in`` all-reduce per matrix for the forms that read the weight).

    Args:
        method: a low-rank method (:func:`low_rank_methods`).
        options: its parameters (``alpha``, ``add``, ``input_share``).
        subspace: the run's safety subspace.
        parameters: ``{state-dict key: tensor}`` of the module (what checkpoint keys name).
        aligned, unaligned: the reference weights the form reads (paths or mappings).
    """

    def __init__(self, method: str, options: Mapping[str, Any], subspace, parameters: Mapping[str, Tensor], *,
                 aligned=None, unaligned=None) -> None:
        self.method, self.options = method, check_method_options(method, options)
        planner = make_low_rank_planner(method, subspace, self.options, aligned=aligned, unaligned=unaligned)
        store = open_weights({k: v.detach() for k, v in parameters.items()}, name="the module's weights")
        plan = planner.low_rank_plan(store)
        self.sharded = any(is_dtensor(parameters[key]) for key in plan)
        if self.sharded:
            self.forms = _sharded_forms(planner, method, plan, subspace, parameters)
        else:
            form = getattr(planner, "form", None) if method in ("lssf-reset", "lssf-erosion") else None
            self.forms = _coordinate_forms(planner, plan, subspace, form) if form else AppliedForms(plan)
        self.fingerprint = subspace.metadata.get("fingerprint")

    @property
    def keys(self) -> list[str]:
        """The state-dict keys the form edits."""
        return self.forms.keys if self.sharded else list(self.forms.plan)

    def info(self, config) -> dict[str, Any]:
        """What a checkpoint records about the fusion (method, parameters, subspace fingerprint and
        settings)."""
        return {"method": self.method, "options": dict(self.options), "fingerprint": self.fingerprint,
                "subspace": config.to_dict()}

    def fuse_checkpoint(self, checkpoint: MutableMapping[str, Any], *, keep_fixups: bool = True) -> None:
        """Replace ``checkpoint["state_dict"]``'s weights by the form of (them − what they carry; new tensors:
        the live weights stay as they are) and store the corrections (:data:`CORRECTIONS_KEY`, what a resume
        subtracts) and the fix-ups that make the live weights come back exactly. Sharded: every rank fuses
        its blocks; rank 0 gets every rank's factors and fix-ups (collectives)."""
        state = checkpoint["state_dict"]
        if self.sharded:
            added, fixups = self.forms.fused(state, keep_fixups)
            bad = [key for key in added if not all_finite(state[key].to_local())]
            if agreed_count(len(bad)):
                raise ValueError(f"LSSF: a fused checkpoint shard ({bad[0] if bad else 'of another rank'}) "
                                 f"holds NaN or inf ({self.method}, {self.options}); the checkpoint is not "
                                 "written")
            checkpoint[CORRECTIONS_KEY] = self.forms.gather(added)
            if keep_fixups:
                checkpoint[RAW_FIXUPS_KEY] = gather_fixups(fixups)
            return
        raw = {key: state[key] for key in self.forms.plan}
        added = self.forms.fused(state)
        for key in added:
            if not all_finite(state[key]):
                raise ValueError(f"LSSF: the fused checkpoint tensor {key!r} holds NaN or inf "
                                 f"({self.method}, {self.options}); the checkpoint is not written")
        checkpoint[CORRECTIONS_KEY] = {key: {"left": c.left, "right": c.right, "conv1d": c.conv1d}
                                       for key, c in added.items()}
        if keep_fixups:
            checkpoint[RAW_FIXUPS_KEY] = {key: make_fixup(raw[key], unfuse(state[key], c))
                                          for key, c in added.items()}

    def apply_(self, parameters: Mapping[str, Tensor]) -> None:
        """Edit the live weights: the form of (live − the correction already in them)."""
        self.forms.apply_(parameters)

    def edits(self, keys, attribute: str = "") -> dict[str, Callable[[Tensor], Tensor]]:
        """``{key: W ↦ the form of (W − what it carries)}`` for an export streaming the keys of the model at
        ``attribute`` of the module (``"model"``: the state-dict keys lack ``"model."``)."""
        prefix = f"{attribute}." if attribute else ""

        def edit(key: str) -> Callable[[Tensor], Tensor]:
            return lambda weight: self.forms.target(key, weight)[0].to(weight.dtype)

        return {key: edit(prefix + key) for key in keys if prefix + key in self.forms.plan}

    @contextlib.contextmanager
    def temporarily_applied(self, parameters: Mapping[str, Tensor]) -> Iterator[None]:
        """The form applied to the live weights for the ``with`` block (e.g. the monitor's realigned pass);
        the exact live weights and the tracked corrections come back after (the edited weights wait on the
        CPU meanwhile)."""
        local = {key: parameters[key].to_local() if self.sharded else parameters[key] for key in self.keys}
        saved = {key: tensor.detach().to("cpu", copy=True) for key, tensor in local.items()}
        applied = dict(self.forms.applied)
        try:
            self.apply_(parameters)
            yield
        finally:
            with torch.no_grad():
                for key, raw in saved.items():
                    local[key].copy_(raw)
            self.forms.applied = applied

    def missing_planner(self, attribute: str = "") -> MissingCorrection:
        """A low-rank planner whose correction of ``W`` is what the weights miss to carry the form:
        ``C(W − A) − A`` (``C(W)`` when nothing is applied), for a LoRA adapter
        (:func:`~lssf_lightning.adapters.write_lora_adapter`) of the model at ``attribute`` of the module
        (its keys lack ``"<attribute>."``)."""
        return MissingCorrection(self, attribute)

    @property
    def carries(self) -> bool:
        """Whether the live weights carry a correction of this form."""
        return bool(self.forms.applied)

    def state_dict(self) -> dict[str, Any] | None:
        """The corrections the live weights carry (sharded: every rank's blocks, on rank 0; a
        collective)."""
        return self.forms.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (sharded: this rank's blocks, refused on another layout)."""
        if self.sharded != is_sharded_record(state):
            saved = "per shard (FSDP2)" if is_sharded_record(state) else "for full weights"
            raise SettingError(f"the checkpoint's applied corrections were saved {saved}: resume with the "
                               "strategy they were saved with")
        self.forms.load_state_dict(state)


def restore_raw(parameters: Mapping[str, Tensor], checkpoint: Mapping[str, Any]) -> list[str]:
    """Turn the weights fused by :meth:`LiveForms.fuse_checkpoint` (just loaded into ``parameters``) back into
    the raw ones, in place, from the stored corrections and fix-ups (no subspace needed). Returns the keys
    whose checksum still differs; without fix-ups, exact up to rounding (warned)."""
    fixups = checkpoint.get(RAW_FIXUPS_KEY)
    if fixups is None:
        warnings.warn("LSSF: the checkpoint holds no raw-weight fix-ups (keep_raw_fixups=False); resuming "
                      "from the fused weights minus the correction, equal to the raw ones up to rounding.",
                      stacklevel=2)
    if is_sharded_record(checkpoint[CORRECTIONS_KEY]):  # FSDP2: each rank its own blocks
        shard_fixups = None if fixups is None else fixups_of_rank(fixups, global_rank())
        try:
            inexact = restore_raw_blocks(parameters, checkpoint[CORRECTIONS_KEY], shard_fixups)
        except ValueError as err:
            raise ResumeError(f"LSSF cannot resume exactly: {err}; resume with the number of processes and "
                              "sharding it was written with") from None
        if inexact:
            warnings.warn(f"LSSF: {len(inexact)} weight shards (e.g. {inexact[0]}) came back close to, not "
                          "exactly, their raw values.", stacklevel=2)
        return inexact
    inexact = []
    with torch.no_grad():
        for key, stored in checkpoint[CORRECTIONS_KEY].items():
            if key not in parameters:
                raise KeyError(f"the checkpoint's fused weight {key!r} is not a weight of this module")
            correction = Correction(stored["left"], stored["right"], bool(stored["conv1d"]),
                                    stored["left"].dtype)
            weight = parameters[key]
            raw = unfuse(weight, correction)
            if fixups is not None and key in fixups and not apply_fixup(raw, fixups[key]):
                inexact.append(key)
            weight.copy_(raw)
    if inexact:
        warnings.warn(f"LSSF: {len(inexact)} weights (e.g. {inexact[0]}) came back close to, not exactly, "
                      "their raw values (other hardware or threads?).", stacklevel=2)
    return inexact


def _coordinate_forms(planner, plan: Mapping[str, PlanFn], subspace, form: str) -> CoordinateForms:
    """:class:`CoordinateForms` for an ``lssf-reset`` / ``lssf-erosion`` planner: ``U'ᵀW_aligned`` of each
    matrix computed once (from the unaligned weight, read once)."""
    factors = {}
    for key, name in subspace.match(list(plan)).items():
        entry = subspace[name]
        if entry.rank == 0:
            continue
        unaligned = planner._reference_weight(name)
        unaligned = unaligned.T if entry.conv1d else unaligned
        coordinates = aligned_coordinates(entry.left, entry.right, unaligned)
        factors[key] = (entry.left, entry.right, coordinates, entry.conv1d)
    return CoordinateForms(plan, factors, form, planner.alpha, planner.add)


def _sharded_forms(planner, method: str, plan: Mapping[str, PlanFn], subspace,
                   parameters: Mapping[str, Tensor]) -> ShardedForms:
    """:class:`ShardedForms` of a built-in form on DTensor shards (a one-line refusal for another form)."""
    form = getattr(planner, "form", "additive")
    if form not in SHARDED_FORMS:
        raise SettingError(f"method={method!r} has no shard-local form: under FSDP2 use one of "
                           "lssf, lssf-reset, lssf-erosion, lssf-two-sided")
    names = subspace.match(list(plan))
    reference = None if form == "additive" else planner._reference_weight
    return ShardedForms(form, {key: parameters[key] for key in names},
                        {key: subspace[name] for key, name in names.items()}, reference, names,
                        alpha=planner.alpha, add=getattr(planner, "add", 0.0),
                        input_share=getattr(planner, "input_share", 1.0))


class LoraHoldOut:
    """The per-step guard on a peft LoRA model trained from the aligned weights: the reset at ``α = 1`` in
    adapter form, ``B ← B − U'(U'ᵀB)`` for every adapter of every subspace matrix (:func:`hold_out_lora_`).

    Exact and still a LoRA adapter; it needs orthonormal ``U'`` (``α₁ = 1``: then it is a projection, so
    repeated applications neither stack nor oscillate and nothing needs tracking). The optimizer's moments
    are left as they are (Adam keeps unprojected moments; the next step's update is held out again).
    """

    method = "lssf-reset"

    def __init__(self, model: torch.nn.Module, subspace) -> None:
        self.model, self.subspace = model, subspace
        if not lora_b_weights(model, subspace):
            raise SettingError("the LoRA model has no adapter on a safety-subspace matrix")

    def apply_(self, parameters: Mapping[str, Tensor] | None = None) -> None:
        """Hold every adapter out of the subspace (``parameters``: unused, the adapters are found in the
        model)."""
        hold_out_lora_(self.model, self.subspace, 1.0)

    @contextlib.contextmanager
    def temporarily_applied(self, parameters: Mapping[str, Tensor] | None = None) -> Iterator[None]:
        """The adapters held out for the ``with`` block, the exact ones back after."""
        weights = [w for ws in lora_b_weights(self.model, self.subspace).values() for w in ws]
        saved = [w.detach().clone() for w in weights]
        try:
            self.apply_()
            yield
        finally:
            with torch.no_grad():
                for weight, raw in zip(weights, saved):
                    weight.copy_(raw)

    def state_dict(self) -> dict[str, Any]:
        """Nothing to carry: the hold-out is a projection."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


# -- what both callbacks share: the run's form, its adapter, the raw weights -------------------------------
class MissingCorrection:
    """:meth:`LiveForms.missing_planner`: a :class:`~lssf_lightning.methods.base.LowRankPlanner` over the
    form's keys whose correction of ``W`` is ``C(W − A) − A`` (rank ``k + k'``): what a live model carrying
    ``A`` misses to hold the form (:func:`~lssf_lightning.adapters.write_model_adapter`)."""

    reads_weights = True

    def __init__(self, live: LiveForms, attribute: str = "") -> None:
        self.live, self.form = live, live.method
        self.prefix = f"{attribute}." if attribute else ""

    def low_rank_plan(self, target) -> dict[str, PlanFn]:
        forms, prefix = self.live.forms, self.prefix

        def edit(key: str) -> PlanFn:
            def correction(weight: Tensor | None) -> Correction | None:
                new = forms.correction(key, forms.raw(key, weight))
                applied = forms.applied.get(key)
                return None if new is None and applied is None else _difference(new, applied)
            return correction

        return {key: edit(prefix + key) for key in target.keys() if prefix + key in forms.plan}

    def plan(self, target) -> dict[str, Callable[[Tensor], Tensor]]:
        return self.live.edits(target.keys(), self.prefix[:-1])

    def summary(self) -> dict[str, Any]:
        return {"method": self.live.method, "options": dict(self.live.options)}


@contextlib.contextmanager
def temporarily_raw(live: LiveForms, parameters: Mapping[str, Tensor]) -> Iterator[None]:
    """The live weights less the correction they carry (``W − A``) for the ``with`` block (a utility
    baseline); the exact live weights come back after."""
    saved = {key: parameters[key].detach().to("cpu", copy=True) for key in live.forms.applied}
    try:
        with torch.no_grad():
            for key in saved:
                parameters[key].copy_(live.forms.raw(key, parameters[key]).to(parameters[key].dtype))
        yield
    finally:
        with torch.no_grad():
            for key, raw in saved.items():
                parameters[key].copy_(raw)


def run_form(method: str, options: Mapping[str, Any], subspace, parameters: Mapping[str, Tensor], *,
             carried: LiveForms | None = None, aligned=None, unaligned=None) -> LiveForms:
    """The :class:`LiveForms` of ``method`` with ``options`` on a run's live ``parameters`` (both callbacks:
    the chosen form, and each ``alpha="auto"`` candidate); ``carried``: the run's current forms, whose
    applied corrections the new one takes over (the same method: a new ``α`` never stacks on the old)."""
    live = LiveForms(method, options, subspace, parameters, aligned=aligned, unaligned=unaligned)
    if carried is not None and carried.carries:
        if carried.method != method:
            raise SettingError(f"the live weights carry a {carried.method} correction; method={method!r} "
                               "cannot take it over")
        live.forms.applied = dict(carried.forms.applied)
    return live


class Candidates:
    """``alpha="auto"``'s candidate forms on a run's live module (both callbacks): ``candidates(method, α)``
    is the context holding the module with that form applied — the paper's ``"lssf"`` through the scalar-α
    path (:func:`~lssf_lightning.training.temporarily_fused`, shard-local under FSDP2) unless the weights
    carry a form, every other form through :func:`run_form` — and :meth:`raw` the one holding the weights
    without any correction (the utility baseline). The exact live weights come back after each.

    Args:
        module: the HF model (or the module holding it) whose weights the subspace names.
        parameters: ``{state-dict key: tensor}`` of the module the forms edit.
        subspace: the run's safety subspace.
        live: the run's current :class:`LiveForms` (``None``: the scalar-α path).
        applied_alpha: the additive strength the live weights carry (the scalar-α path).
        options: the named method's other parameters (``add``, ``input_share``).
        aligned, unaligned: the reference weights the forms read.
    """

    def __init__(self, module: torch.nn.Module, parameters: Mapping[str, Tensor], subspace, *,
                 live: LiveForms | None = None, applied_alpha: float = 0.0,
                 options: Mapping[str, Any] | None = None, aligned=None, unaligned=None) -> None:
        self.module, self.parameters, self.subspace = module, parameters, subspace
        self.live, self.applied_alpha = live, float(applied_alpha)
        self.options = {k: v for k, v in (options or {}).items() if k != "alpha" and v is not None}
        self.aligned, self.unaligned = aligned, unaligned

    def methods(self, methods: tuple[str, ...]) -> tuple[str, ...]:
        """The candidates' methods: the form the live weights carry when they carry one (a new ``α`` of it
        never stacks; another form could not take it over), else ``methods``."""
        if self.live is not None and self.live.carries:
            return (self.live.method,)
        return ("lssf",) if self.applied_alpha else methods

    def form(self, method: str, alpha: float) -> LiveForms | None:
        """The run's form for ``method`` at ``alpha`` (``None``: the paper's form on the scalar-α path)."""
        if method == "lssf" and (self.live is None or not self.live.carries):
            return None
        return run_form(method, {**self.options, "alpha": alpha}, self.subspace, self.parameters,
                        carried=self.live, aligned=self.aligned, unaligned=self.unaligned)

    def __call__(self, method: str, alpha: float) -> contextlib.AbstractContextManager:
        form = self.form(method, alpha)
        if form is None:
            return temporarily_fused(self.module, self.subspace, float(alpha) - self.applied_alpha)
        return form.temporarily_applied(self.parameters)

    def raw(self) -> contextlib.AbstractContextManager:
        """The weights less the correction they carry."""
        if self.live is not None and self.live.carries:
            return temporarily_raw(self.live, self.parameters)
        return temporarily_fused(self.module, self.subspace, -self.applied_alpha)
