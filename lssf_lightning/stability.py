"""The subspace-stability monitor's state: how much of a run's update lies inside the safety subspace.

:class:`UpdateShare` remembers, at fit start, the targeted weights (a CPU copy: the total ``‖ΔW‖²`` needs
them) and their coordinates in the orthonormal safety basis; it then measures, on the live weights, the share
of the update since fit start (and since :meth:`UpdateShare.mark`, e.g. the previous logged step) that lies
inside the subspace, per layer group, and the drift ``‖Uᵀ(W − W_start)‖_F`` of the subspace component from
the weights the fit started from (the aligned model when fine-tuning starts there). The math:
:mod:`lssf_lightning.core.stability`.

On DTensor shards (FSDP2) every rank keeps a copy of its own block only and measures it with its rows of
``U`` (from its rows of ``U'`` and the Gram matrix ``U'ᵀU'``: one ``r × r`` all-reduce per matrix at fit
start; a disk-backed subspace is read by block): ``UᵀΔW`` is a sum over every rank's rows, so one
``r × d_in`` all-reduce per matrix and measurement (the block's ``‖ΔW‖²`` travels in the same buffer); every
rank calls each measurement. On a peft LoRA layer the update
of the merged weight is ``s·B·A − s·B₀·A₀`` (the base frozen): it is kept and measured in factored form
(:func:`~lssf_lightning.core.stability.factored_energy`), a copy of the adapters only (FSDP2: every rank
gathers the small adapters and measures the same).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lssf_lightning.core.factors import LocalFactors, restrict
from lssf_lightning.core.stability import (
    ALL,
    factored_energy,
    orthonormal_basis,
    orthonormal_rows,
    share_by_group,
    subspace_energy,
)
from lssf_lightning.distributed.collectives import is_dtensor, local_tensor, shard_region
from lssf_lightning.distributed.sharded_forms import new_cost, sharding_dims, summed
from lssf_lightning.subspace import SafetySubspace

__all__ = ["UpdateShare", "lora_scalings", "metric_names"]


def metric_names(shares: Mapping[str, float], prefix: str = "lssf/update_in_subspace") -> dict[str, float]:
    """``{prefix: overall share, prefix/group: share}`` for logging."""
    return {prefix if group == ALL else f"{prefix}/{group}": value for group, value in shares.items()}


def lora_scalings(module: torch.nn.Module) -> dict[str, dict[str, float]]:
    """``{state-dict key of the base weight: {adapter: scaling}}`` for the unmerged peft LoRA layers of
    ``module`` (their active adapters)."""
    found = {}
    for name, layer in module.named_modules():
        adapters = getattr(layer, "lora_A", None)
        if not isinstance(adapters, torch.nn.ModuleDict) or getattr(layer, "merged", False):
            continue
        active = [a for a in layer.active_adapters if a in adapters]
        if active:
            found[f"{name}.base_layer.weight"] = {a: float(layer.scaling[a]) for a in active}
    return found


def _full(tensor: Tensor) -> Tensor:
    """A CPU copy of the whole tensor (a DTensor adapter is gathered: a collective, and small)."""
    return (tensor.full_tensor() if is_dtensor(tensor) else tensor).detach().to("cpu", copy=True)


def _adapter_keys(key: str, adapter: str) -> tuple[str, str]:
    """The state-dict keys of an adapter's ``A`` and ``B`` from its layer's base-weight key."""
    prefix = key.removesuffix("base_layer.weight")
    return f"{prefix}lora_A.{adapter}.weight", f"{prefix}lora_B.{adapter}.weight"


def _local_factors(subspace: SafetySubspace, name: str, region) -> LocalFactors:
    """The factors of ``name`` for the block ``region``: read as a block from disk-backed entries (nothing
    else of the entry is read or kept), else cut from the resident entry."""
    entries = subspace.entries
    if hasattr(entries, "restrict"):
        return entries.restrict(name, region)
    return restrict(entries[name], region)


class _Block:
    """A DTensor's block on this rank: its rows of an orthonormal ``U`` (from ``U'[rows]`` and the Gram
    matrix ``U'ᵀU'``, one ``r × r`` all-reduce), where its columns go, the dimensions to sum."""

    def __init__(self, tensor: Tensor, subspace: SafetySubspace, name: str, cost) -> None:
        region = shard_region(tensor)
        factors = _local_factors(subspace, name, region)
        self.conv1d = bool(factors.conv1d)
        self.cols = region.entry_slices(self.conv1d)[1]
        self.d_in = int(region.global_shape[0 if self.conv1d else 1])
        rows, cols = sharding_dims(tensor, self.conv1d)
        self.mesh, self.dims = tensor.device_mesh, rows + cols
        self.device = local_tensor(tensor).device  # where the all-reduces run (the communication device)
        left = factors.left.detach().cpu().double()
        gram = summed((left.T @ left).to(self.device), self.mesh, rows, cost).cpu()  # the rows' blocks only
        self.basis = orthonormal_rows(left, gram).float()

    def reduce(self, cost):
        def reduce(coordinates: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
            rank = coordinates.shape[0]
            buffer = coordinates.new_zeros(rank * self.d_in + 1)
            buffer[:-1].view(rank, self.d_in)[:, self.cols] = coordinates
            buffer[-1] = total
            buffer = summed(buffer.to(self.device), self.mesh, self.dims, cost).cpu()
            return buffer[:-1].view(rank, self.d_in), buffer[-1]

        return reduce


class UpdateShare:
    """Where the update of the ``matched`` live weights goes.

    Args:
        subspace: the run's safety subspace.
        parameters: ``{state-dict key: live tensor}`` at fit start (plain tensors, or DTensor shards: then
            every rank calls every measurement, a collective).
        matched: ``{state-dict key: subspace name}`` of the weights to watch.
        adapters: ``{key: {adapter: scaling}}`` (:func:`lora_scalings`) of the matched keys that are the
            frozen base of a peft LoRA layer: their update is measured on the adapters (gathered when
            sharded).
    """

    def __init__(
        self, subspace: SafetySubspace, parameters: Mapping[str, Tensor], matched: Mapping[str, str],
        adapters: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        self.names = dict(matched)
        self.adapters = {key: dict(found) for key, found in (adapters or {}).items() if key in self.names}
        sharded = [key for key in self.names if is_dtensor(parameters[key]) and key not in self.adapters]
        self.cost = new_cost()  # the all-reduces on shards
        self.blocks = {key: _Block(parameters[key], subspace, self.names[key], self.cost) for key in sharded}
        self.conv1d = {key: self.blocks[key].conv1d if key in self.blocks else subspace[name].conv1d
                       for key, name in matched.items()}
        self.bases = {key: self.blocks[key].basis if key in self.blocks else
                      orthonormal_basis(subspace[name].left.detach().cpu()) for key, name in matched.items()}
        self.start = self._snapshot(parameters)
        self.previous: dict[str, Tensor] | None = None

    def _snapshot(self, parameters: Mapping[str, Tensor]) -> dict[str, Tensor | dict[str, Tensor]]:
        def copy(key: str) -> Tensor:
            return local_tensor(parameters[key]).detach().to("cpu", copy=True)

        return {key: {k: _full(parameters[k]) for a in self.adapters[key] for k in _adapter_keys(key, a)}
                if key in self.adapters else copy(key) for key in self.names}

    def _update(self, key: str, live: Tensor, reference: Tensor) -> Tensor:
        live = local_tensor(live).detach().cpu()
        update = live.to(torch.promote_types(live.dtype, torch.float32)) - reference
        return update.T if self.conv1d[key] else update

    def _energy(self, key: str, update: Tensor) -> tuple[float, float]:
        block = self.blocks.get(key)
        return subspace_energy(self.bases[key], update, None if block is None else block.reduce(self.cost))

    def _adapter_energy(self, key: str, parameters: Mapping[str, Tensor],
                        start: Mapping[str, Tensor]) -> tuple[float, float]:
        """``ΔW = Σ s·(B·A − B₀·A₀)`` over the layer's adapters as ``[s·B, −s·B₀]·[A; A₀]``."""
        lefts, rights = [], []
        for adapter, scaling in self.adapters[key].items():
            a_key, b_key = _adapter_keys(key, adapter)
            for sign, source in ((1.0, parameters), (-1.0, start)):
                lefts.append(sign * scaling * _full(source[b_key]).float())
                rights.append(_full(source[a_key]).float())
        return factored_energy(self.bases[key], torch.cat(lefts, dim=1), torch.cat(rights, dim=0))

    def _energies(self, parameters: Mapping[str, Tensor], reference: Mapping[str, Tensor]):
        return {self.names[key]: self._adapter_energy(key, parameters, ref) if key in self.adapters else
                self._energy(key, self._update(key, parameters[key], ref)) for key, ref in reference.items()}

    def since_start(self, parameters: Mapping[str, Tensor]) -> dict[str, float]:
        """The share of ``W − W_start`` inside the subspace: ``{"all": …, "attention": …, "mlp": …}``."""
        return share_by_group(self._energies(parameters, self.start))

    def drift(self, parameters: Mapping[str, Tensor]) -> float:
        """``‖Uᵀ(W − W_start)‖_F`` over every watched matrix (root of the summed squares)."""
        return math.sqrt(sum(inside for inside, _ in self._energies(parameters, self.start).values()))

    def metrics(self, parameters: Mapping[str, Tensor]) -> dict[str, float]:
        """``lssf/update_in_subspace`` (:meth:`since_start`, per group) and ``lssf/subspace_drift``
        (:meth:`drift`), from one measurement."""
        energies = self._energies(parameters, self.start)
        drift = math.sqrt(sum(inside for inside, _ in energies.values()))
        return {**metric_names(share_by_group(energies)), "lssf/subspace_drift": drift}

    def mark(self, parameters: Mapping[str, Tensor]) -> None:
        """Remember the live weights now (the start of the next :meth:`since_mark`)."""
        self.previous = self._snapshot(parameters)

    def since_mark(self, parameters: Mapping[str, Tensor]) -> dict[str, float] | None:
        """The share of the update since :meth:`mark` (``None`` before any mark)."""
        return None if self.previous is None else share_by_group(self._energies(parameters, self.previous))
