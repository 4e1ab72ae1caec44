"""The factors of a safety subspace as plain tensor geometry: one matrix's entry ``(U', U'ᵀδ)``, the
block of a weight one rank holds, and the factors that block needs.

``SubspaceEntry`` is output-major ``(d_out, d_in)``; GPT-2 ``Conv1D`` weights are stored transposed, so
there a checkpoint row is a column of ``R = U'ᵀδ`` (``conv1d=True``). A rank holding ``W[rows, cols]``
needs only ``U'[rows] @ R[:, cols]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lssf_lightning.core.basis import add_correction, low_rank_product

__all__ = ["LocalFactors", "ShardRegion", "SubspaceEntry", "local_product", "restrict"]


@dataclass
class SubspaceEntry:
    """The safety subspace of one weight matrix, in output-major layout ``(d_out, d_in)``.

    Attributes:
        left: ``U' = U_r·diag(α_i)``, shape ``(d_out, r)``.
        right: ``U'ᵀδ``, shape ``(r, d_in)``.
        singular_values: the kept singular values ``σ_1…σ_r`` of the safety signal.
        entropy: ``H(n)`` of the whole spectrum.
        total_energy: ``Σ σ_i²`` over the whole spectrum.
        conv1d: the checkpoint stores this weight transposed (GPT-2 ``Conv1D``).
    """

    left: Tensor
    right: Tensor
    singular_values: Tensor
    entropy: float
    total_energy: float
    conv1d: bool = False

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's shape as stored in the checkpoint."""
        d_out, d_in = self.left.shape[0], self.right.shape[1]
        return (d_in, d_out) if self.conv1d else (d_out, d_in)

    @property
    def energy_kept(self) -> float:
        """Share of the safety signal's energy in the kept directions (``Σ_{i≤r} σ_i² / Σ σ_i²``)."""
        if self.total_energy <= 0:
            return 0.0
        return float(self.singular_values.double().square().sum()) / self.total_energy

    def correction(self, alpha: float = 1.0) -> Tensor:
        """The dense term ``α·U'U'ᵀδ`` in the checkpoint's layout, in float64 (for inspection and tests)."""
        dense = alpha * (self.left.to(torch.float64) @ self.right.to(torch.float64))
        return dense.T if self.conv1d else dense

    def product(self, like: Tensor) -> Tensor:
        """The dense ``U'U'ᵀδ`` in the checkpoint's layout, in at least float32 (and ``like``'s precision), on
        ``like``'s device. Memory: one matrix."""
        product = low_rank_product(self.left, self.right, like)
        return product.T if self.conv1d else product

    def fuse(self, weight: Tensor, alpha: float = 1.0, name: str = "weight") -> Tensor:
        """The fusion step (Eq. 13): ``weight + α·U'U'ᵀδ`` as a new tensor in ``weight``'s dtype.

        Every fusion of the package (the LSSF planner: realign, ``apply_edits``, the callbacks) ends here, so
        they all round alike; ``name`` is for the error message.
        """
        if tuple(weight.shape) != self.shape:
            raise ValueError(
                f"{name}: weight of shape {tuple(weight.shape)} does not match the subspace's {self.shape}"
            )
        if self.rank == 0 or alpha == 0:
            return weight.detach().clone()
        return add_correction(weight.detach(), self.product(weight), alpha)


@dataclass(frozen=True)
class ShardRegion:
    """The block of a 2-D weight one rank holds.

    That is ``W[offset[0]:offset[0]+shape[0], offset[1]:offset[1]+shape[1]]``, in the coordinates of the
    weight as stored (the checkpoint's layout).
    """

    global_shape: tuple[int, int]
    offset: tuple[int, int]
    shape: tuple[int, int]

    @classmethod
    def full(cls, shape: Iterable[int]) -> ShardRegion:
        shape = tuple(int(s) for s in shape)
        return cls(shape, (0, 0), shape)

    @property
    def rows(self) -> slice:
        return slice(self.offset[0], self.offset[0] + self.shape[0])

    @property
    def cols(self) -> slice:
        return slice(self.offset[1], self.offset[1] + self.shape[1])

    @property
    def is_full(self) -> bool:
        return self.shape == self.global_shape

    def entry_slices(self, conv1d: bool) -> tuple[slice, slice]:
        """``(rows of U', columns of R)`` covering this block (``Conv1D`` weights are stored transposed)."""
        return (self.cols, self.rows) if conv1d else (self.rows, self.cols)

    def as_json(self) -> dict[str, list[int]]:
        return {
            "global_shape": list(self.global_shape),
            "offset": list(self.offset),
            "shape": list(self.shape),
        }


@dataclass
class LocalFactors:
    """The factors of one subspace entry restricted to a block: ``U'[rows]`` and ``R[:, cols]`` (entry
    layout).

    What a rank keeps of an entry under FSDP2: for ``Shard(0)`` of a ``(d_out, d_in)`` weight that is
    ``d_out/world × r + r × d_in`` numbers instead of ``(d_out + d_in) × r``.
    """

    left: Tensor
    right: Tensor
    region: ShardRegion
    conv1d: bool = False

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def product(self, like: Tensor) -> Tensor:
        """``(U'U'ᵀδ)`` on the block, in the checkpoint's layout, in at least float32, on ``like``'s
        device."""
        product = low_rank_product(self.left, self.right, like)
        return product.T if self.conv1d else product


def restrict(entry: SubspaceEntry | LocalFactors, region: ShardRegion) -> LocalFactors:
    """The factors of ``entry`` that the block ``region`` needs (copies: the full entry may be dropped after).

    ``entry`` may itself be restricted (:class:`LocalFactors`), as long as it covers ``region``.
    """
    if isinstance(entry, LocalFactors):
        held = entry.region
        inside = all(
            held.offset[d] <= region.offset[d]
            and region.offset[d] + region.shape[d] <= held.offset[d] + held.shape[d]
            for d in (0, 1)
        )
        if held.global_shape != region.global_shape or not inside:
            raise ValueError(
                f"the held factors cover {held.as_json()}, not the requested block {region.as_json()}"
            )
        local = ShardRegion(
            held.shape, tuple(region.offset[d] - held.offset[d] for d in (0, 1)), region.shape
        )
        out_slice, in_slice = local.entry_slices(entry.conv1d)
        return LocalFactors(
            _copy(entry.left[out_slice]), _copy(entry.right[:, in_slice]), region, entry.conv1d
        )
    if tuple(entry.shape) != region.global_shape:
        raise ValueError(f"the subspace entry has shape {entry.shape}, the weight {region.global_shape}")
    out_slice, in_slice = region.entry_slices(entry.conv1d)
    return LocalFactors(_copy(entry.left[out_slice]), _copy(entry.right[:, in_slice]), region, entry.conv1d)


def _copy(tensor: Tensor) -> Tensor:
    return tensor.clone(memory_format=torch.contiguous_format)


def local_product(entry: SubspaceEntry | LocalFactors, region: ShardRegion, like: Tensor) -> Tensor:
    """``(U'U'ᵀδ)[region]`` — the rank's block of the dense fusion term — from its rows of ``U'`` and
    columns of ``R`` only, in at least float32 on ``like``'s device. Memory: the block."""
    if isinstance(entry, LocalFactors) and entry.region == region:
        return entry.product(like)
    return restrict(entry, region).product(like)  # contiguous factor blocks, whichever way they were obtained
