"""A callback's form on a module: checkpoint fusion with an exact resume, live applications, the per-step
guard on a peft LoRA model, and what both callbacks share (the run's form, its adapter, the raw weights)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from lssf_lightning.core.checks import all_finite
from lssf_lightning.core.factors import ShardRegion
from lssf_lightning.core.hold import hold_out_adapter_
from lssf_lightning.core.variants import aligned_coordinates
from lssf_lightning.distributed import fixups_of_rank, gather_fixups, global_rank, is_dtensor, local_tensor
from lssf_lightning.distributed.collectives import agreed_count
from lssf_lightning.distributed.sharded_forms import (
    SHARDED_FORMS,
    ShardedForms,
    hold_out_adapter_shard_,
    is_sharded_record,
    new_cost,
    restore_raw_blocks,
)
from lssf_lightning.forms.applied import (
    CORRECTIONS_KEY,
    AppliedForms,
    CoordinateForms,
    PlanFn,
    check_method_options,
    correction_product,
    difference,
    make_low_rank_planner,
    unfuse,
)
from lssf_lightning.forms.lora import PEFT_BASE, is_peft_model, lora_updates
from lssf_lightning.io.weights import open_weights
from lssf_lightning.methods.base import Correction
from lssf_lightning.training import RAW_FIXUPS_KEY, ResumeError, apply_fixup, make_fixup, temporarily_fused
from lssf_lightning.validation import SettingError


# -- the guard on a peft LoRA model ------------------------------------------------------------------------
def lora_b_weights(model: torch.nn.Module, subspace) -> dict[str, list[Tensor]]:
    """``{subspace name: [the lora_B weight of each adapter]}`` for the peft LoRA layers of ``model`` whose
    base weight is a subspace matrix."""
    layers = {f"{name}.base_layer.weight": module for name, module in model.named_modules()
              if isinstance(getattr(module, "lora_B", None), torch.nn.ModuleDict)}
    matched = subspace.match(list(layers))
    return {name: [b.weight for b in layers[key].lora_B.values()] for key, name in matched.items()}


def hold_out_lora_(model: torch.nn.Module, subspace, alpha: float = 1.0,
                   cost: dict[str, float] | None = None) -> int:
    """The reset of a LoRA run on the aligned model, in adapter form: ``B ← B − α·U'(U'ᵀB)`` for every
    adapter of every matched layer (:func:`~lssf_lightning.core.hold.hold_out_adapter_`; a DTensor ``B``,
    FSDP2, shard-local with one ``r × r_lora`` all-reduce, tallied in ``cost``); returns how many ``B`` were
    edited."""
    count, cost = 0, new_cost() if cost is None else cost
    with torch.no_grad():
        for name, weights in lora_b_weights(model, subspace).items():
            left = subspace[name].left
            for weight in weights:
                if is_dtensor(weight):
                    hold_out_adapter_shard_(weight, left, alpha, cost)
                else:
                    hold_out_adapter_(weight, left, alpha)
                count += 1
    return count



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
        module: the module ``parameters`` name (for a peft LoRA model: the form reads each adapted matrix
            merged, ``base + Σ s·B·A``, and corrects the frozen base, :mod:`lssf_lightning.forms.lora`).
    """

    def __init__(self, method: str, options: Mapping[str, Any], subspace, parameters: Mapping[str, Tensor], *,
                 aligned=None, unaligned=None, module: torch.nn.Module | None = None) -> None:
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
            self.forms.outside = lora_updates(module, plan) if module is not None else {}
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

    def missing_planner(self, attribute: str = "", model: torch.nn.Module | None = None) -> MissingCorrection:
        """A low-rank planner whose correction of ``W`` is what the weights miss to carry the form:
        ``C(W − A) − A`` (``C(W)`` when nothing is applied), for a LoRA adapter
        (:func:`~lssf_lightning.adapters.write_model_adapter`) of ``model``, the model at ``attribute`` of the
        module (its keys lack ``"<attribute>."``). A peft ``model`` gets ONE adapter for the aligned model it
        adapts (the base without ``A``): there the correction is ``C(W − A)``."""
        if model is not None and is_peft_model(model):
            return MissingCorrection(self, ".".join(filter(None, (attribute, PEFT_BASE))), carried=False)
        return MissingCorrection(self, attribute)

    def gathered_missing_planner(self, parameters: Mapping[str, Tensor],
                                 attribute: str = "") -> GatheredCorrection | None:
        """Sharded (FSDP2): :meth:`missing_planner`'s corrections from every rank's blocks, whole on rank 0
        (``None`` elsewhere). A collective: every rank calls it."""
        record = self.forms.gather(self.forms.missing(parameters))
        return None if record is None else GatheredCorrection(whole_factors(record), self, attribute)

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
        self.cost = new_cost()  # the all-reduces of sharded adapters (FSDP2)
        if not lora_b_weights(model, subspace):
            raise SettingError("the LoRA model has no adapter on a safety-subspace matrix")

    def apply_(self, parameters: Mapping[str, Tensor] | None = None) -> None:
        """Hold every adapter out of the subspace (``parameters``: unused, the adapters are found in the
        model; FSDP2: every rank calls it)."""
        hold_out_lora_(self.model, self.subspace, 1.0, self.cost)

    @contextlib.contextmanager
    def temporarily_applied(self, parameters: Mapping[str, Tensor] | None = None) -> Iterator[None]:
        """The adapters held out for the ``with`` block, the exact ones back after."""
        weights = [local_tensor(w) for ws in lora_b_weights(self.model, self.subspace).values() for w in ws]
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

    def __init__(self, live: LiveForms, attribute: str = "", *, carried: bool = True) -> None:
        self.live, self.form, self.carried = live, live.method, carried
        self.prefix = f"{attribute}." if attribute else ""

    def low_rank_plan(self, target) -> dict[str, PlanFn]:
        forms, prefix = self.live.forms, self.prefix

        def edit(key: str) -> PlanFn:
            def correction(weight: Tensor | None) -> Correction | None:
                new = forms.correction(key, forms.raw(key, weight))
                applied = forms.applied.get(key) if self.carried else None
                return None if new is None and applied is None else difference(new, applied)
            return correction

        return {key: edit(prefix + key) for key in target.keys() if prefix + key in forms.plan}

    def plan(self, target) -> dict[str, Callable[[Tensor], Tensor]]:
        return self.live.edits(target.keys(), self.prefix[:-1])

    def summary(self) -> dict[str, Any]:
        return {"method": self.live.method, "options": dict(self.live.options)}


class GatheredCorrection:
    """:meth:`LiveForms.gathered_missing_planner`: a low-rank planner holding the whole factors of what each
    matrix misses to carry the form (assembled from every FSDP2 rank's blocks), for a LoRA adapter of the
    model at ``attribute`` of the module."""

    reads_weights = False

    def __init__(self, corrections: Mapping[str, Correction], live: LiveForms, attribute: str = "") -> None:
        self.corrections, self.live, self.form = dict(corrections), live, live.method
        self.prefix = f"{attribute}." if attribute else ""

    def low_rank_plan(self, target) -> dict[str, PlanFn]:
        return {key: (lambda _weight, c=self.corrections[self.prefix + key]: c) for key in target.keys()
                if self.prefix + key in self.corrections}

    def plan(self, target) -> dict[str, Callable[[Tensor], Tensor]]:
        def edit(correction: Correction) -> Callable[[Tensor], Tensor]:
            return lambda weight: (weight + correction_product(correction, weight)).to(weight.dtype)

        return {key: edit(self.corrections[self.prefix + key]) for key in target.keys()
                if self.prefix + key in self.corrections}

    def summary(self) -> dict[str, Any]:
        return {"method": self.live.method, "options": dict(self.live.options)}


def whole_factors(record: Mapping[str, Any]) -> dict[str, Correction]:
    """``{key: the whole (L, R)}`` from a record of every rank's block factors (``L[rows]``, ``R[:, cols]``;
    :meth:`ShardedForms.gather`), in float64 on the CPU."""
    parts: dict[str, list] = {}
    for own in record["ranks"]:
        for key, stored in own.items():
            parts.setdefault(key, []).append(stored)
    out = {}
    for key, blocks in parts.items():
        conv1d, rank = bool(blocks[0]["conv1d"]), int(blocks[0]["left"].shape[1])
        d_out, d_in = blocks[0]["region"]["global_shape"][::-1 if conv1d else 1]
        left = torch.zeros(d_out, rank, dtype=torch.float64)
        right = torch.zeros(rank, d_in, dtype=torch.float64)
        for block in blocks:
            stored = block["region"]
            region = ShardRegion(*(tuple(stored[name]) for name in ("global_shape", "offset", "shape")))
            rows, cols = region.entry_slices(conv1d)
            left[rows] = block["left"].detach().cpu().double()
            right[:, cols] = block["right"].detach().cpu().double()
        out[key] = Correction(left, right, conv1d, torch.float64)
    return out


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
             carried: LiveForms | None = None, aligned=None, unaligned=None,
             module: torch.nn.Module | None = None) -> LiveForms:
    """The :class:`LiveForms` of ``method`` with ``options`` on a run's live ``parameters`` (of ``module``,
    which a peft LoRA model needs; both callbacks: the chosen form, and each ``alpha="auto"`` candidate);
    ``carried``: the run's current forms, whose applied corrections the new one takes over (the same method:
    a new ``α`` never stacks on the old)."""
    live = LiveForms(method, options, subspace, parameters, aligned=aligned, unaligned=unaligned,
                     module=module)
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
        owner: the module ``parameters`` name (a peft LoRA model: the forms read the merged weights).
    """

    def __init__(self, module: torch.nn.Module, parameters: Mapping[str, Tensor], subspace, *,
                 live: LiveForms | None = None, applied_alpha: float = 0.0,
                 options: Mapping[str, Any] | None = None, aligned=None, unaligned=None,
                 owner: torch.nn.Module | None = None) -> None:
        self.module, self.parameters, self.subspace, self.owner = module, parameters, subspace, owner
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
                        carried=self.live, aligned=self.aligned, unaligned=self.unaligned, module=self.owner)

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
