"""The subspace-stability monitor's state: how much of a run's update lies inside the safety subspace.

:class:`UpdateShare` remembers, at fit start, the targeted weights (a CPU copy: the total ``‖ΔW‖²`` needs
them) and their coordinates in the orthonormal safety basis; it then measures, on the live weights, the share
of the update since fit start (and since :meth:`UpdateShare.mark`, e.g. the previous logged step) that lies
inside the subspace, per layer group, and the drift ``‖Uᵀ(W − W_start)‖_F`` of the subspace component from
the weights the fit started from (the aligned model when fine-tuning starts there). The math:
:mod:`lssf_lightning.core.stability`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lssf_lightning.core.stability import ALL, orthonormal_basis, share_by_group, subspace_energy
from lssf_lightning.subspace import SafetySubspace

__all__ = ["UpdateShare", "metric_names"]


def metric_names(shares: Mapping[str, float], prefix: str = "lssf/update_in_subspace") -> dict[str, float]:
    """``{prefix: overall share, prefix/group: share}`` for logging."""
    return {prefix if group == ALL else f"{prefix}/{group}": value for group, value in shares.items()}


class UpdateShare:
    """Where the update of the ``matched`` live weights goes.

    Args:
        subspace: the run's safety subspace.
        parameters: ``{state-dict key: live tensor}`` at fit start.
        matched: ``{state-dict key: subspace name}`` of the weights to watch.
    """

    def __init__(
        self, subspace: SafetySubspace, parameters: Mapping[str, Tensor], matched: Mapping[str, str]
    ) -> None:
        self.names = dict(matched)
        self.conv1d = {key: subspace[name].conv1d for key, name in matched.items()}
        self.bases = {key: orthonormal_basis(subspace[name].left.detach().cpu())
                      for key, name in matched.items()}
        self.start = self._snapshot(parameters)
        self.previous: dict[str, Tensor] | None = None

    def _snapshot(self, parameters: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {key: parameters[key].detach().to("cpu", copy=True) for key in self.names}

    def _update(self, key: str, live: Tensor, reference: Tensor) -> Tensor:
        update = live.detach().cpu().to(torch.promote_types(live.dtype, torch.float32)) - reference
        return update.T if self.conv1d[key] else update

    def _energies(self, parameters: Mapping[str, Tensor], reference: Mapping[str, Tensor]):
        return {self.names[key]: subspace_energy(self.bases[key], self._update(key, parameters[key], ref))
                for key, ref in reference.items()}

    def since_start(self, parameters: Mapping[str, Tensor]) -> dict[str, float]:
        """The share of ``W − W_start`` inside the subspace: ``{"all": …, "attention": …, "mlp": …}``."""
        return share_by_group(self._energies(parameters, self.start))

    def drift(self, parameters: Mapping[str, Tensor]) -> float:
        """``‖Uᵀ(W − W_start)‖_F`` over every watched matrix (root of the summed squares)."""
        return math.sqrt(sum(inside for inside, _ in self._energies(parameters, self.start).values()))

    def mark(self, parameters: Mapping[str, Tensor]) -> None:
        """Remember the live weights now (the start of the next :meth:`since_mark`)."""
        self.previous = self._snapshot(parameters)

    def since_mark(self, parameters: Mapping[str, Tensor]) -> dict[str, float] | None:
        """The share of the update since :meth:`mark` (``None`` before any mark)."""
        return None if self.previous is None else share_by_group(self._energies(parameters, self.previous))
