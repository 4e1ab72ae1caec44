"""Every low-rank LSSF form on a rank's own DTensor shards (FSDP2's ``Shard(0)``, any mix of ``Shard`` and
``Replicate``), tracked as per-block rank-``k`` factors so live applications never stack.

A rank holding the block ``W[rows, cols]`` (output-major entry layout) of a weight computes its block of the
correction ``L·R`` from ``L[rows]`` and ``R[:, cols]``. What the forms need beyond the block:

* additive (``lssf``): nothing, ``α·U'[rows] · (U'ᵀδ)[:, cols]``;
* reset and erosion: the coordinates ``U'ᵀW`` (``r × d_in``), a sum over every rank's rows: each rank's
  ``U'[rows]ᵀW[rows, cols]`` placed at its columns, then **one** ``r × d_in`` all-reduce per matrix over the
  mesh dimensions that shard the weight;
* two-sided: the same coordinates, and ``ΔQ`` (``d_out × r``), a sum over columns: an all-reduce only where
  the columns are sharded (GPT-2 ``Conv1D`` under ``Shard(0)``); under row sharding its rows are local;
* the guard on a peft LoRA adapter, ``B ← B − U'(U'ᵀB)``: ``U'ᵀB`` (``r × r_lora``) summed over the ranks
  that hold ``B``'s rows (:func:`hold_out_adapter_shard_`).

Every rank reads the reference weight (unaligned or aligned) once per matrix at setup, one matrix at a time,
and keeps ``r``-sized products of it (and the aligned block for the two-sided form). :attr:`ShardedForms.cost`
counts the all-reduces (calls, bytes, seconds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lssf_lightning.core.basis import add_correction
from lssf_lightning.core.hold import hold_out_adapter_
from lssf_lightning.core.variants import aligned_coordinates, coordinate_right, input_basis
from lssf_lightning.distributed.collectives import (
    gather_to_rank0,
    global_rank,
    is_dtensor,
    local_tensor,
    shard_region,
)
from lssf_lightning.distributed.shards import _with_local, apply_shard_fixup, shard_fixup
from lssf_lightning.methods.base import Correction

__all__ = ["SHARDED_CORRECTIONS", "SHARDED_FORMS", "BlockFactors", "ShardedForms", "hold_out_adapter_shard_",
           "is_sharded_record", "new_cost", "sharding_dims", "summed"]

SHARDED_FORMS = ("additive", "reset", "erosion", "two_sided")
SHARDED_CORRECTIONS = "lssf_lightning.sharded_corrections"


class BlockFactors:
    """One matrix on this rank: its block, the subspace factors the block needs, the reference products."""

    def __init__(self, tensor: Tensor, entry, reference: Tensor | None, form: str) -> None:
        self.region, self.conv1d = shard_region(tensor), bool(entry.conv1d)
        self.rows, self.cols = self.region.entry_slices(self.conv1d)
        self.left = entry.left[self.rows].double()  # U'[rows]
        self.right = entry.right.double()  # U'ᵀδ, all columns (r × d_in)
        self.d_in = int(entry.right.shape[1])
        self.row_dims, self.col_dims = sharding_dims(tensor, self.conv1d)
        self.coordinates = self.aligned_q = self.q = None
        if reference is not None:
            full = (reference.T if self.conv1d else reference).double()
            if form == "two_sided":
                self.q = input_basis(self.right)
                self.coordinates = entry.left.double().T @ full  # U'ᵀW_aligned
                self.aligned_q = (full @ self.q)[self.rows]  # (W_aligned·Q)[rows]
            else:
                self.coordinates = aligned_coordinates(entry.left.double(), self.right, full)
        self.mesh = tensor.device_mesh if is_dtensor(tensor) else None
        device = local_tensor(tensor).device  # the factors live where the shard does
        for name in ("left", "right", "coordinates", "aligned_q", "q"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))

    def block(self, local: Tensor) -> Tensor:
        """The local data in entry layout (a view)."""
        return local.T if self.conv1d else local


def sharding_dims(tensor: Tensor, conv1d: bool) -> tuple[list[int], list[int]]:
    """The mesh dimensions that shard the entry's rows, and those that shard its columns."""
    if not is_dtensor(tensor):
        return [], []
    from torch.distributed.tensor import Shard

    rows, cols = [], []
    for index, placement in enumerate(tensor.placements):
        if isinstance(placement, Shard):
            (rows if (placement.dim == 0) != conv1d else cols).append(index)
    return rows, cols


def new_cost() -> dict[str, float]:
    """The all-reduce tally :func:`summed` keeps: calls, bytes, seconds."""
    return {"calls": 0, "bytes": 0, "seconds": 0.0}


def summed(tensor: Tensor, mesh, dims: list[int], cost: dict[str, float]) -> Tensor:
    """``tensor`` summed over the ranks of each mesh dimension in ``dims`` (in place), tallied in ``cost``."""
    for index in dims:
        start = time.perf_counter()
        dist.all_reduce(tensor, group=mesh.get_group(index))
        cost["seconds"] += time.perf_counter() - start
        cost["calls"] += 1
        cost["bytes"] += tensor.numel() * tensor.element_size()
    return tensor


def hold_out_adapter_shard_(lora_b: Tensor, left: Tensor, alpha: float, cost: dict[str, float]) -> None:
    """``B ← B − α·U'(U'ᵀB)`` on this rank's block of a DTensor LoRA ``B`` (``d_out × r_lora``, FSDP2:
    ``Shard(0)``, rows): ``U'ᵀB`` is the sum of every rank's ``U'[rows]ᵀB[rows]``, one all-reduce of an
    ``r × r_lora`` matrix (a block of columns, when they are sharded too, is summed in place of gathered)."""
    region = shard_region(lora_b)
    rows, cols = region.entry_slices(False)
    row_dims, col_dims = sharding_dims(lora_b, False)

    def reduce(partial: Tensor) -> Tensor:
        full = partial.new_zeros((partial.shape[0], region.global_shape[1]))
        full[:, cols] = partial
        return summed(full, lora_b.device_mesh, row_dims + col_dims, cost)[:, cols]

    hold_out_adapter_(local_tensor(lora_b), left[rows], alpha, reduce=reduce if row_dims + col_dims else None)


class ShardedForms:
    """A low-rank form on the local shards of DTensor parameters; the applied corrections per block.

    Args:
        form: one of :data:`SHARDED_FORMS`.
        tensors: ``{state-dict key: parameter}`` of the matrices the form edits.
        entries: ``{key: subspace entry}`` (full factors: every rank keeps its rows of ``U'``).
        reference: ``name ↦ the reference weight`` (stored layout) or ``None`` for the additive form.
        names: ``{key: subspace name}``.
        alpha, add, input_share: the form's ``α``, ``β``, ``ρ``.
    """

    def __init__(self, form: str, tensors: Mapping[str, Tensor], entries: Mapping[str, Any],
                 reference: Callable[[str], Tensor] | None, names: Mapping[str, str], *, alpha: float,
                 add: float = 0.0, input_share: float = 1.0) -> None:
        if form not in SHARDED_FORMS:
            raise ValueError(f"form must be one of {SHARDED_FORMS}, got {form!r}")
        self.form, self.alpha, self.add, self.input_share = form, float(alpha), float(add), float(input_share)
        self.blocks = {key: BlockFactors(tensors[key], entries[key],
                                         None if reference is None else reference(names[key]), form)
                       for key in tensors if entries[key].rank > 0}
        self.applied: dict[str, Correction] = {}
        self.cost = new_cost()

    @property
    def keys(self) -> list[str]:
        return list(self.blocks)

    # -- the collectives ------------------------------------------------------------------------------
    def _sum(self, tensor: Tensor, block: BlockFactors, dims: list[int]) -> Tensor:
        """``tensor`` summed over the ranks of each mesh dimension in ``dims`` (in place, timed)."""
        return summed(tensor, block.mesh, dims, self.cost)

    def _coordinates(self, block: BlockFactors, partial: Tensor) -> Tensor:
        """The full ``r × d_in`` coordinates from this block's ``U'[rows]ᵀX[rows, cols]``."""
        full = partial.new_zeros((partial.shape[0], block.d_in))
        full[:, block.cols] = partial
        return self._sum(full, block, block.row_dims + block.col_dims)

    # -- the form on one block ------------------------------------------------------------------------
    def _raw(self, key: str, local: Tensor) -> Tensor:
        """``W − A`` on the block (entry layout, float64)."""
        block, applied = self.blocks[key], self.applied.get(key)
        raw = block.block(local).double()
        if applied is None:
            return raw
        return raw - applied.left.to(raw.device, torch.float64) @ applied.right.to(raw.device, torch.float64)

    def correction(self, key: str, raw: Tensor) -> Correction | None:
        """The block's factors ``(L[rows], R[:, cols])`` of the form's correction of ``raw`` (entry-layout
        block of ``W − A``); collective for every form but the additive one."""
        block = self.blocks[key]
        if self.form == "additive":
            right = self.alpha * block.right[:, block.cols]
            return Correction(block.left, right, block.conv1d, torch.float64)
        task = self._coordinates(block, block.left.T @ raw) - block.coordinates  # U'ᵀ(W − W_aligned)
        if self.form != "two_sided":
            right = coordinate_right(self.form, task, block.right, self.alpha, self.add)
            return Correction(block.left, right[:, block.cols], block.conv1d, torch.float64)
        if block.col_dims:  # (W·Q) summed over the column blocks
            reads = raw.new_zeros((_rows_total(block), block.q.shape[1]))
            reads[block.rows] = raw @ block.q[block.cols]
            reads = self._sum(reads, block, block.col_dims)[block.rows]
        else:
            reads = raw @ block.q[block.cols]
        reads = reads - block.aligned_q  # (Δ·Q)[rows]
        outside = reads - block.left @ (task @ block.q)  # ((I − P')Δ·Q)[rows]
        left = torch.cat([block.left, outside], dim=1)
        right = torch.cat([self.add * block.right - self.alpha * task,
                           -self.alpha * self.input_share * block.q.T], dim=0)
        return Correction(left, right[:, block.cols], block.conv1d, torch.float64)

    def apply_(self, parameters: Mapping[str, Tensor]) -> None:
        """Each block ← the form of (block − what it carries); every rank calls it (collectives). The reset
        and the erosion are rank-``r`` updates in place (no copy of the shard): with ``A = U'a`` applied,
        ``U'ᵀ(W − A) = U'ᵀW − (U'ᵀU')a`` and ``W ← W + U'(a' − a)``."""
        with torch.no_grad():
            for key, block in self.blocks.items():
                local = local_tensor(parameters[key])
                if self.form in ("reset", "erosion"):
                    self._coordinate_step(key, block, block.block(local))
                    continue
                raw = self._raw(key, local)
                correction = self.correction(key, raw)
                new = raw + correction.left @ correction.right
                block.block(local).copy_(new.to(local.dtype))
                self.applied[key] = correction

    def _coordinate_step(self, key: str, block: BlockFactors, matrix: Tensor) -> None:
        dtype = torch.promote_types(matrix.dtype, torch.float32)
        left = block.left.to(device=matrix.device, dtype=dtype)
        partial = left.T @ matrix.to(dtype)  # U'[rows]ᵀW[rows, cols]
        applied = self.applied.get(key)
        if applied is not None:
            previous = applied.right.to(device=matrix.device, dtype=dtype)
            partial = partial - (left.T @ left) @ previous
        task = self._coordinates(block, partial) - block.coordinates.to(device=matrix.device, dtype=dtype)
        new = coordinate_right(self.form, task, block.right.to(device=matrix.device, dtype=dtype), self.alpha,
                               self.add)[:, block.cols]
        step = new if applied is None else new - previous
        if matrix.dtype == dtype:
            matrix.addmm_(left, step)
        else:
            matrix.copy_(torch.addmm(matrix.to(dtype), left, step).to(matrix.dtype))
        self.applied[key] = Correction(block.left, new, block.conv1d, dtype)

    def fused(self, state: MutableMapping[str, Tensor], keep_fixups: bool) -> tuple[dict, dict]:
        """Replace each planned DTensor of ``state`` by one holding the form of (it − what it carries) on
        this rank's block. Returns ``({key: the block's added factors}, {key: shard fix-up})``."""
        added, fixups = {}, {}
        for key, block in self.blocks.items():
            tensor = state[key]
            local = local_tensor(tensor).detach()
            correction = self.correction(key, self._raw(key, local))
            applied = self.applied.get(key)
            difference = correction if applied is None else Correction(
                torch.cat([correction.left, applied.left.to(local.device, torch.float64)], dim=1),
                torch.cat([correction.right, -applied.right.to(local.device, torch.float64)], dim=0),
                block.conv1d, torch.float64)
            product = _stored(difference, local.device)
            fused = add_correction(local, product) if local.numel() else local.clone()
            state[key] = _with_local(tensor, fused)
            added[key] = difference
            if keep_fixups:
                recovered = add_correction(fused, product, -1.0) if local.numel() else fused
                fixups[key] = shard_fixup(local, recovered, block.region)
        return added, fixups

    def missing(self, parameters: Mapping[str, Tensor]) -> dict[str, Correction]:
        """``{key: the block's factors of C(W − A) − A}``: what each block misses to carry the form (an
        export's adapter); every rank calls it (collectives)."""
        out = {}
        for key, block in self.blocks.items():
            local = local_tensor(parameters[key]).detach()
            new, applied = self.correction(key, self._raw(key, local)), self.applied.get(key)
            out[key] = new if applied is None else Correction(
                torch.cat([new.left, applied.left.to(local.device, torch.float64)], dim=1),
                torch.cat([new.right, -applied.right.to(local.device, torch.float64)], dim=0),
                block.conv1d, torch.float64)
        return out

    # -- records of every rank's factors (rank 0 writes them) ------------------------------------------
    def gather(self, factors: Mapping[str, Correction]) -> dict[str, Any] | None:
        """Every rank's block factors, for rank 0 to store (other ranks get ``None``). A collective."""
        return gather_record({key: (c, self.blocks[key].region.as_json()) for key, c in factors.items()})

    def state_dict(self) -> dict[str, Any] | None:
        """The applied corrections of every rank (rank 0's record; ``None`` elsewhere). A collective."""
        return self.gather(self.applied)

    def load_state_dict(self, record: Mapping[str, Any]) -> None:
        """This rank's applied corrections from :meth:`state_dict`'s record (refused on another layout)."""
        self.applied = own_factors(record, {key: b.region.as_json() for key, b in self.blocks.items()})


def _rows_total(block: BlockFactors) -> int:
    return int(block.region.global_shape[1 if block.conv1d else 0])


def _stored(correction: Correction, device: torch.device) -> Tensor:
    """The block's ``L·R`` in the stored layout (float64, on ``device``: where a resume recomputes it)."""
    product = correction.left.to(device, torch.float64) @ correction.right.to(device, torch.float64)
    return product.T if correction.conv1d else product


def gather_record(factors: Mapping[str, tuple[Correction, dict]]) -> dict[str, Any] | None:
    """``{"format", "world_size", "ranks": [{key: {"left", "right", "conv1d", "region"}}]}`` on rank 0."""
    tensors, info = {}, {}
    for i, (key, (correction, region)) in enumerate(factors.items()):
        tensors[f"{i}:left"], tensors[f"{i}:right"] = correction.left, correction.right
        info[key] = {"i": i, "conv1d": correction.conv1d, "region": region}
    parts = gather_to_rank0(tensors, info)
    if parts is None:
        return None
    ranks = [{key: {"left": part[f"{m['i']}:left"], "right": part[f"{m['i']}:right"], "conv1d": m["conv1d"],
                    "region": m["region"]} for key, m in got.items()} for part, got in parts]
    return {"format": SHARDED_CORRECTIONS, "world_size": len(ranks), "ranks": ranks}


def is_sharded_record(stored: Any) -> bool:
    return isinstance(stored, Mapping) and stored.get("format") == SHARDED_CORRECTIONS


def own_factors(record: Mapping[str, Any], regions: Mapping[str, Any]) -> dict[str, Correction]:
    """This rank's block factors from :func:`gather_record`'s record; ``ValueError`` (one line) when a block
    is not laid out as when it was saved (another number of processes or sharding)."""
    rank = global_rank()
    ranks = record["ranks"]
    own = ranks[rank] if rank < len(ranks) else {}
    out = {}
    for key, stored in own.items():
        if key not in regions:
            raise ValueError(f"the checkpoint's corrected weight {key!r} is not a weight of this module")
        if stored["region"] != regions[key]:
            raise ValueError(f"the shard of {key} is not laid out as when the checkpoint was saved "
                             f"({record['world_size']} process(es) saved it)")
        out[key] = Correction(stored["left"], stored["right"], bool(stored["conv1d"]), stored["left"].dtype)
    return out


def restore_raw_blocks(parameters: Mapping[str, Tensor], record: Mapping[str, Any],
                       fixups: Mapping[str, Any] | None) -> list[str]:
    """Turn the fused shards just loaded into the raw ones, in place: ``fused − L·R`` on each rank's block,
    its fix-ups written over. Returns the keys not proven exact."""
    inexact = []
    with torch.no_grad():
        saved = set().union(*record["ranks"])
        regions = {key: shard_region(tensor).as_json() for key, tensor in parameters.items() if key in saved}
        for key, correction in own_factors(record, regions).items():
            local = local_tensor(parameters[key])
            if not local.numel():
                continue
            raw = add_correction(local, _stored(correction, local.device), -1.0)
            fixup = None if fixups is None else fixups.get(key)
            if fixups is not None and (fixup is None or not apply_shard_fixup(raw, shard_region(
                    parameters[key]), fixup)):
                inexact.append(key)
            local.copy_(raw)
    return inexact
