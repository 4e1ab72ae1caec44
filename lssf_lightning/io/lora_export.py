"""The safety correction ``α·U'(U'ᵀδ)`` as a standard peft LoRA adapter (and combined with a task adapter).

LSSF's term is already low-rank: per matrix ``B = α·U'`` (``d_out × r``) and ``A = U'ᵀδ`` (``r × d_in``) give
``B·A = α·U'U'ᵀδ``, in peft's layout for ``nn.Linear`` and for GPT-2 ``Conv1D`` (``fan_in_fan_out``: the
update is ``(B·A)ᵀ``, with the same ``A``/``B`` shapes). Matrices of rank 0 are left out. Per-module ranks go
into ``rank_pattern``; every module's scale ``lora_alpha / r`` is ``1`` (``lora_alpha = r``, per module
through ``alpha_pattern``), so a server that reads only the global ``r``/``lora_alpha`` computes the same
update.

Every correction is stored at its numerical rank (:func:`~lssf_lightning.core.basis.compact_low_rank`):
the reset forms of a LoRA fine-tune act on the task update only, so their rank is at most the task LoRA's
(two-sided: twice), whatever the subspace's ``r``; a correction that is zero up to float32 rounding (a matrix
the task left unchanged) is left out.

``PeftModel.from_pretrained(finetuned, directory)`` is then the realigned model, and ``merge_and_unload()``
equals :func:`lssf_lightning.realign_checkpoint`'s output. ``max_rank`` caps every module's rank for servers
with a maximum LoRA rank (the best rank-``k`` approximation, from the small factors only); ``task_adapter``
writes ONE adapter holding the user's task LoRA and the correction (ranks concatenated, scales folded in).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lssf_lightning.core.basis import best_low_rank, compact_low_rank
from lssf_lightning.io.names import KeyMatcher, canonical_key, is_adapter_key, module_name
from lssf_lightning.validation import check_finite, check_int

__all__ = ["AdapterReport", "realign_as_adapter", "write_lora_adapter", "write_model_adapter"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_UNSUPPORTED_TASK_OPTIONS = ("modules_to_save", "trainable_token_indices", "lora_bias", "use_dora")


@dataclass
class AdapterReport:
    """What :func:`write_lora_adapter` wrote."""

    directory: Path
    ranks: dict[str, int]
    parameters: int
    adapter_bytes: int
    model_bytes: int | None = None
    energy_kept: dict[str, float] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    def to_dict(self) -> dict[str, Any]:
        """The numbers, for reports (JSON-ready)."""
        ranks = list(self.ranks.values())
        return {
            "directory": str(self.directory),
            "modules": len(ranks),
            "min_rank": min(ranks, default=0),
            "max_rank": self.max_rank,
            "mean_rank": round(sum(ranks) / max(len(ranks), 1), 1),
            "parameters": self.parameters,
            "adapter_bytes": self.adapter_bytes,
            "model_bytes": self.model_bytes,
            "share_of_model": self.adapter_bytes / self.model_bytes if self.model_bytes else None,
            "min_energy_kept": min(self.energy_kept.values(), default=1.0),
        }

    def __str__(self) -> str:
        numbers = self.to_dict()
        text = (
            f"LoRA adapter: {numbers['modules']} modules, rank {numbers['min_rank']}–{numbers['max_rank']} "
            f"(mean {sum(self.ranks.values()) / max(len(self.ranks), 1):.1f}), "
            f"{self.adapter_bytes / 2**20:.2f} MiB"
        )
        if self.model_bytes:
            text += f" = {numbers['share_of_model']:.2%} of the model's {self.model_bytes / 2**20:.1f} MiB"
        if self.energy_kept:
            text += f"; rank cap keeps ≥ {numbers['min_energy_kept']:.2%} of each capped term's energy"
        return f"{text} → {self.directory}"


# -- the adapter --------------------------------------------------------------------------------------------


def write_lora_adapter(
    correction,
    directory: str | os.PathLike,
    *,
    alpha: float | None = None,
    base_model: str | os.PathLike | nn.Module | Mapping[str, Tensor] | None = None,
    max_rank: int | None = None,
    task_adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    inputs: Any = (),
) -> AdapterReport:
    """Write a low-rank safety correction of every matrix as a peft LoRA adapter directory (atomically).

    Args:
        correction: a :class:`~lssf_lightning.SafetySubspace` (the paper's term ``α·U'(U'ᵀδ)``), or an LSSF
            fusion form as a planner (:class:`~lssf_lightning.methods.LSSF`, ``LSSFReset``, ``LSSFErosion``,
            ``LSSFTwoSided``: any :class:`~lssf_lightning.methods.base.LowRankPlanner`, with its own ``α``).
            The reset forms' correction depends on the fine-tuned weights: they need ``base_model``.
        directory: the adapter directory to create (``adapter_config.json`` + ``adapter_model.safetensors``).
        alpha: the fusion strength ``α`` folded into the adapter (with a subspace; default 1).
        base_model: the model the adapter will be loaded onto (a path, hub ID or module; a peft LoRA module
            reads as its merged weights): its module names are used (recommended), its size reported, and a
            path or ID is recorded as ``base_model_name_or_path``. Default: the subspace's own key names.
        max_rank: cap every module's rank (the adapter's total, with ``task_adapter``) at this value; the
            correction is replaced by its best approximation of that rank
            (:func:`~lssf_lightning.core.basis.best_low_rank`).
        task_adapter: a peft LoRA adapter directory of a LoRA fine-tune of the aligned model ``base_model``:
            the result is ONE adapter equal to task adapter + correction (load it onto the aligned model).
        dtype: the adapter's dtype (default: the subspace factors' dtype).
        overwrite: replace an existing ``directory`` (only if it holds adapter files alone).
        inputs: more paths the output must not overlap (a callback's model and Trainer folders); the
            planner's models and subspace file, ``base_model`` and ``task_adapter`` always count.

    Raises:
        lssf_lightning.io.guard.OutputOverlapError: ``directory`` is, contains or lies inside an input, with
            or without ``overwrite``.
        ValueError: bad settings, a task adapter this format cannot carry, module names that do not match
            ``base_model``, an output overlapping an input, or a NaN/inf in the adapter (nothing is written).
        FileExistsError: ``directory`` exists and ``overwrite`` is false.
    """
    from lssf_lightning.io.guard import check_output

    planner = _planner(correction, alpha)
    if max_rank is not None:
        check_int("max_rank", max_rank, minimum=1)
    task = _open_task_adapter(task_adapter) if task_adapter is not None else None
    base_store = _open_base(base_model)
    inputs = [inputs, task.path if task is not None else None, base_store, planner]
    check_output(directory, inputs, overwrite=overwrite)
    target = _target(planner, base_store, task)
    factors, energy = _correction_factors(planner, target, max_rank, task, dtype)
    if task is not None:
        factors = _combine(task, factors, dtype)
    if not factors:
        raise ValueError(
            "the correction is empty (every matrix has rank 0 or alpha is 0): no adapter to write"
        )
    conv1d = {m for m, (_, _, is_conv) in factors.items() if is_conv}
    config = _lora_config(factors, conv1d, base_model, task)
    tensors = {}
    for module, (b, a, _) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    written = _write(directory, tensors, config, overwrite, inputs)
    ranks = {m: int(a.shape[0]) for m, (_, a, _) in factors.items()}
    model_bytes = None
    if base_store is not None:
        keys = [k for k in base_store.keys() if not is_adapter_key(k)]
        model_bytes = sum(math.prod(base_store.shape(k)) * base_store.dtype(k).itemsize for k in keys)
    return AdapterReport(
        directory=written,
        ranks=ranks,
        parameters=sum(t.numel() for t in tensors.values()),
        adapter_bytes=(written / ADAPTER_WEIGHTS).stat().st_size,
        model_bytes=model_bytes,
        energy_kept={m: e for m, e in energy.items() if e < 1.0},
    )


def _planner(correction, alpha: float | None):
    """The planner of ``correction``: ``LSSF(subspace, α)`` for a subspace, a low-rank planner as given."""
    from lssf_lightning.methods.base import LowRankPlanner
    from lssf_lightning.methods.lssf import LSSF
    from lssf_lightning.subspace import SafetySubspace

    if isinstance(correction, SafetySubspace):
        return LSSF(correction, 1.0 if alpha is None else check_finite("alpha", alpha))
    if not isinstance(correction, LowRankPlanner):
        raise TypeError(
            "correction must be a SafetySubspace or a low-rank fusion planner (LSSF, LSSFReset, LSSFErosion, "
            f"LSSFTwoSided), got {type(correction).__name__}"
        )
    if alpha is not None:
        raise ValueError(
            f"alpha={alpha!r} is given twice: a {type(correction).__name__} carries its own alpha"
        )
    return correction


def _open_base(base_model):
    if base_model is None:
        return None
    from lssf_lightning.io.weights import open_weights

    return open_weights(base_model, name="base model")


def _target(planner, base_store, task):
    """The weights the correction is computed for: the base model (+ the task adapter, merged lazily), or
    the subspace's own names and shapes when no base model is given (the additive form only)."""
    from lssf_lightning.io.lora import MergedLoraStore
    from lssf_lightning.io.weights import open_weights

    if base_store is not None:
        return MergedLoraStore(base_store, task) if task is not None else base_store
    if planner.reads_weights:
        raise ValueError(
            f"the {getattr(planner, 'form', type(planner).__name__)} correction depends on the fine-tuned "
            "weights: pass base_model= (the model the adapter will be loaded on)"
        )
    shapes = planner.shapes
    return open_weights({k: torch.empty(s, device="meta") for k, s in shapes.items()}, name="subspace")


def _open_task_adapter(path):
    from lssf_lightning.io.hub import resolve_model
    from lssf_lightning.io.lora import LoraAdapter

    adapter = LoraAdapter(resolve_model(path, what="task adapter") if isinstance(path, str) else path)
    used = [k for k in _UNSUPPORTED_TASK_OPTIONS if adapter.config.get(k)]
    if adapter.config.get("bias", "none") != "none":
        used.append("bias")
    if used:
        raise ValueError(
            f"task adapter {adapter.path} uses {used}: a combined LoRA adapter cannot carry those; realign "
            "the merged model instead (`lssf-lightning realign --finetuned <adapter> --aligned <base> ...`)"
        )
    return adapter


def _correction_factors(planner, target, max_rank, task, dtype):
    """``{module: (B, A, conv1d)}`` of the correction alone, capped so that task + correction fit
    ``max_rank``."""
    task_ranks = {}
    if task is not None:
        task_ranks = {m: int(task.factors(m).a.shape[0]) for m in task.modules()}
    task_matcher = KeyMatcher([m + ".weight" for m in task_ranks]) if task_ranks else None
    factors, energy = {}, {}
    for key, edit in planner.low_rank_plan(target).items():
        weight = target.get(key) if planner.reads_weights else None
        correction = edit(weight)
        if correction is None:
            continue
        module = canonical_key(module_name(key))
        # At its numerical rank: directions below float32's resolution of the weight are rounding noise
        # (a reset of a LoRA fine-tune has the task LoRA's rank, not the subspace's r; zero = left out).
        floor = 0.0 if weight is None else float(weight.double().norm()) * torch.finfo(torch.float32).eps
        left, right = compact_low_rank(correction.left.double(), correction.right.double(), floor)
        if left.shape[1] == 0:
            continue
        task_module = task_matcher.match(module + ".weight") if task_matcher else None
        used = task_ranks.get(task_module.removesuffix(".weight"), 0) if task_module else 0
        budget = None if max_rank is None else max_rank - used
        if budget is not None and budget < 1:
            raise ValueError(
                f"max_rank={max_rank} leaves no rank for the correction of {module}: the task "
                f"adapter already uses rank {used} there"
            )
        if budget is not None:
            left, right, energy[module] = best_low_rank(left, right, budget)
        out = dtype or correction.dtype
        factors[module] = (left.to(out), right.to(out), correction.conv1d)
    return factors, energy


def _combine(task, correction, dtype):
    """Task adapter ``s·B_t·A_t`` + correction ``B_c·A_c`` per module as ``[s·B_t, B_c]·[A_t; A_c]``."""
    matcher = KeyMatcher([m + ".weight" for m in correction])
    combined = dict(correction)
    for task_module in task.modules():
        lora = task.factors(task_module)
        out = dtype or lora.a.dtype
        b_task, a_task = (lora.scale * lora.b.double()).to(out), lora.a.to(out)
        hit = matcher.match(task_module + ".weight")
        if hit is None:
            combined[task_module] = (b_task, a_task, lora.fan_in_fan_out)
            continue
        module = hit[: -len(".weight")]
        b_fix, a_fix, conv1d = combined.pop(module)
        if tuple(a_task.shape[1:]) != tuple(a_fix.shape[1:]) or b_task.shape[0] != b_fix.shape[0]:
            raise ValueError(
                f"task adapter module {task_module} has other shapes than the correction of {module}"
            )
        combined[module] = (
            torch.cat([b_task, b_fix.to(out)], 1),
            torch.cat([a_task, a_fix.to(out)], 0),
            conv1d,
        )
    return combined


def _lora_config(factors, conv1d, base_model, task) -> Any:
    """A peft ``LoraConfig``: global ``r = lora_alpha =`` the largest rank, patterns for the other modules."""
    from peft import LoraConfig

    ranks = {m: int(a.shape[0]) for m, (_, a, _) in factors.items()}
    top = max(ranks.values())
    pattern = {m: r for m, r in ranks.items() if r != top}
    if isinstance(base_model, (str, os.PathLike)):
        base_name = os.fspath(base_model)
    else:
        base_name = task.base_model_path if task is not None else None
    # One fan_in_fan_out per adapter: true for GPT-2-style (all Conv1D) models; peft sets it per layer type
    # when a model mixes Conv1D and nn.Linear (with a warning), so mixed targets still load right.
    return LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(factors),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        fan_in_fan_out=bool(conv1d) and len(conv1d) == len(factors),
        lora_dropout=0.0,
        bias="none",
        task_type=(task.config.get("task_type") if task is not None else None) or "CAUSAL_LM",
        base_model_name_or_path=base_name,
        inference_mode=True,
    )


def _write(directory, tensors: dict[str, Tensor], config, overwrite: bool, inputs) -> Path:
    """Both files into a staging directory renamed into place (the writer refuses NaN/inf: nothing is
    left)."""
    from lssf_lightning.io.export import atomic_directory
    from lssf_lightning.io.shards import write_safetensors

    destination = Path(directory).expanduser()
    with atomic_directory(destination, overwrite=overwrite, inputs=inputs) as staging:
        write_safetensors(staging / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
        config.save_pretrained(str(staging))
    return destination.resolve()


def realign_as_adapter(
    finetuned: str | os.PathLike,
    output: str | os.PathLike,
    *,
    aligned: str | os.PathLike | None = None,
    unaligned: str | os.PathLike | None = None,
    subspace=None,
    config=None,
    method: str = "lssf",
    alpha: float = 1.0,
    method_options: Mapping[str, Any] | None = None,
    max_rank: int | None = None,
    overwrite: bool = False,
    allow_partial: bool = False,
    progress: bool = True,
) -> AdapterReport:
    """``lssf-lightning realign --as-adapter``: the correction for ``finetuned`` as a LoRA adapter in
    ``output``.

    A full fine-tune (a HF directory or hub ID) gets the correction alone, to load on it; a peft LoRA adapter
    directory gets ONE adapter with its task LoRA and the correction, to load on its base (``aligned``, else
    the adapter's ``base_model_name_or_path``). ``method`` is one of the LSSF fusion forms (``lssf``,
    ``lssf-reset``, ``lssf-erosion``, ``lssf-two-sided``; their options, e.g. ``add`` or ``input_share``, in
    ``method_options``) over ``subspace`` (an object or file) or a subspace built from ``aligned`` and
    ``unaligned`` with ``config``.
    """
    from lssf_lightning.config import split_legacy
    from lssf_lightning.io.guard import check_output
    from lssf_lightning.io.lora import MergedLoraStore
    from lssf_lightning.methods import MethodInputs, make_planner
    from lssf_lightning.methods.base import LowRankPlanner
    from lssf_lightning.realign import check_model_types, check_settings_from_file, open_finetuned
    from lssf_lightning.validation import SettingError

    config = split_legacy(config, {}, "realign_as_adapter")
    check_settings_from_file(subspace, config)
    check_output(output, [finetuned, aligned, unaligned, subspace, config.calibration], overwrite=overwrite)
    if subspace is None and (aligned is None or unaligned is None):
        raise SettingError("--as-adapter needs --aligned and --unaligned, or a precomputed --subspace")
    store, support_dirs = open_finetuned(finetuned, aligned)  # a LoRA adapter: base + task LoRA, lazily
    check_model_types(support_dirs, aligned, subspace)
    lora = isinstance(store, MergedLoraStore)
    # A LoRA run's base is its aligned model: --aligned, else the adapter's recorded base (as given: a hub ID
    # stays one in the written adapter_config.json).
    base = (aligned if aligned is not None else store.adapter.base_model_path) if lora else aligned
    options = {"alpha": alpha, **(method_options or {})}
    inputs = MethodInputs(store, base, unaligned, subspace, config, options, allow_partial, progress)
    planner = make_planner(method, inputs)
    if not isinstance(planner, LowRankPlanner):
        raise SettingError(
            f"--as-adapter writes a low-rank LSSF correction; method {method!r} is not one (use lssf, "
            "lssf-reset, lssf-erosion or lssf-two-sided)"
        )
    settings = {"max_rank": max_rank, "overwrite": overwrite}
    if not lora:
        return write_lora_adapter(planner, output, base_model=finetuned, **settings)
    return write_lora_adapter(planner, output, base_model=base, task_adapter=store.adapter.path, **settings)


def write_model_adapter(
    model: nn.Module,
    correction,
    directory: str | os.PathLike,
    *,
    alpha: float | None = None,
    max_rank: int | None = None,
    overwrite: bool = False,
    inputs: Any = (),
) -> AdapterReport:
    """The adapter for a live model (what both callbacks' ``export_adapter_dir`` writes): the correction
    (a subspace or a low-rank planner, as in :func:`write_lora_adapter`) for ``model``'s weights, or for a
    peft LoRA ``model`` ONE adapter with its task LoRA and the correction, to load on the model it adapts
    (the aligned model)."""
    settings = {"alpha": alpha, "max_rank": max_rank, "overwrite": overwrite, "inputs": inputs}
    if not hasattr(model, "peft_config"):
        return write_lora_adapter(correction, directory, base_model=model, **settings)
    with tempfile.TemporaryDirectory(prefix=".lssf-task-adapter-") as task, model.disable_adapter():
        model.save_pretrained(task)  # the task adapter only (small)
        # Inside disable_adapter() the module reads as its raw (aligned) weights; the task LoRA is added back
        # from the saved adapter, once.
        return write_lora_adapter(
            correction, directory, base_model=model.get_base_model(), task_adapter=task, **settings
        )
