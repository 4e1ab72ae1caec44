"""LSSF on a rank's own shards of the weights (DTensor: FSDP2, tensor parallelism), without a collective.

The fusion term of one matrix is ``α·U'(U'ᵀδ)`` (LSSF Eq. 13). A rank holding the block ``W[rows, cols]`` of a
weight needs only ``U'[rows] @ R[:, cols]`` (:mod:`lssf_lightning.core.factors`): under FSDP2's ``Shard(0)``
its rows of ``U'`` and the whole ``R``, under ``Shard(1)`` all of ``U'`` and its columns of ``R``, under
``Replicate`` the whole term — never the dense matrix of another rank. Checkpoint fusion, live fusion, exact
resume (per-shard fix-ups) and the fix-ups' layout in a distributed checkpoint live here.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from lssf_lightning.core.basis import add_correction
from lssf_lightning.core.checks import all_finite
from lssf_lightning.core.factors import LocalFactors, ShardRegion, SubspaceEntry, local_product
from lssf_lightning.distributed.collectives import (
    agreed_count,
    gather_to_rank0,
    is_dtensor,
    local_tensor,
    shard_region,
)
from lssf_lightning.io.schema import FormatError

__all__ = [
    "SHARDED_FIXUPS",
    "apply_shard_fixup",
    "fixup_layout_mismatch",
    "fixups_of_rank",
    "fuse_state_shards",
    "gather_fixups",
    "is_sharded_fixups",
    "realign_shards_in_place",
    "restore_raw_shards",
    "shard_fixup",
    "temporarily_fused_shards",
]


# -- the fusion term on one block ---------------------------------------------------------------------


def _with_local(tensor: Tensor, local: Tensor) -> Tensor:
    """A tensor laid out like ``tensor`` (same DTensor mesh, placements, global shape) holding ``local``."""
    if not is_dtensor(tensor):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        tensor.device_mesh,
        tensor.placements,
        run_check=False,
        shape=tensor.shape,
        stride=tensor.stride(),
    )


# -- exact resume: raw-weight fix-ups per shard --------------------------------------------------------
def _crc(tensor: Tensor) -> int:
    data = tensor.detach().reshape(-1).contiguous().cpu()
    return zlib.crc32(memoryview(data.view(torch.uint8).numpy()))


def shard_fixup(raw: Tensor, recovered: Tensor, region: ShardRegion) -> dict[str, Any]:
    """What turns ``recovered`` (``fused − correction`` on this block) back into ``raw`` exactly.

    ``raw`` and ``recovered`` are the rank's local data. Stored: the block (so a resume on another layout is
    detected), the entries where rounding differs (flat local index and raw value), a CRC-32 of the raw block.
    """
    flat_raw, flat_recovered = raw.reshape(-1), recovered.reshape(-1)
    index = torch.nonzero(flat_recovered != flat_raw).squeeze(1)
    return {
        "region": region.as_json(),
        "index": index.cpu(),
        "value": flat_raw[index].detach().cpu(),
        "crc32": _crc(raw),
    }


def apply_shard_fixup(recovered: Tensor, region: ShardRegion, fixup: Mapping[str, Any]) -> bool:
    """Write the stored raw entries into ``recovered`` (the local data, in place). True when the block matches
    the one saved and the result has the raw block's CRC-32 (i.e. the resume is exact)."""
    if fixup.get("region") != region.as_json():
        return False
    flat = recovered.view(-1)
    flat[fixup["index"].to(flat.device)] = fixup["value"].to(device=flat.device, dtype=flat.dtype)
    return _crc(recovered) == fixup["crc32"]


# -- a model's sharded weights: checkpoints, live fusion, exact resume ---------------------------------
def _block(subspace: Any, name: str, region: ShardRegion) -> SubspaceEntry | LocalFactors:
    """The factors of ``name`` for ``region``: read as a block from disk-backed entries, else the entry."""
    entries = subspace.entries
    if hasattr(entries, "restrict") and not region.is_full:
        return entries.restrict(name, region)
    return entries[name]


def _shard_product(subspace: Any, name: str, tensor: Tensor) -> tuple[ShardRegion, Tensor, Tensor]:
    region = shard_region(tensor)
    local = local_tensor(tensor).detach()
    return region, local, local_product(_block(subspace, name, region), region, local)


def fuse_state_shards(
    state: dict[str, Tensor],
    subspace: Any,
    alpha: float,
    *,
    matched: Mapping[str, str],
    keep_fixups: bool = True,
) -> dict[str, dict[str, Any]] | None:
    """Replace each matched tensor of ``state`` (DTensors or plain) by ``W + α·U'U'ᵀδ``, each rank its shard.

    ``state`` is e.g. a sharded model state dict (``get_model_state_dict``): new tensors are put in, the live
    weights it references stay raw. Returns this rank's fix-ups (:func:`shard_fixup`, by key) when
    ``keep_fixups``. Raises ``ValueError`` on every rank when any rank's fused shard holds NaN or inf, or its
    disk-backed factors are damaged (that rank raises the file's ``FormatError``): one all-reduce of a count,
    so nothing is written and no rank is left waiting in a later collective.

    A state dict offloaded to the CPU (Lightning's ``cpu_offload=True``) of a model trained on GPUs is fused
    on the mesh's accelerator, where a resume recomputes the correction on the live shard: the same
    arithmetic, so the fix-ups stay exact, and the products run at accelerator speed.
    """
    fixups, bad, damaged = {}, [], None
    for key, name in matched.items():
        tensor = state[key]
        region, held = shard_region(tensor), local_tensor(tensor).detach()
        local = held.to(_mesh_device(tensor))
        try:
            block = _block(subspace, name, region)
        except FormatError as err:  # a damaged subspace file (disk-backed factors): every rank stops below
            damaged = damaged or err
            bad.append(key)
            continue
        product = local_product(block, region, local)
        fused = add_correction(local, product, alpha) if local.numel() else local.clone()
        if not all_finite(fused):
            bad.append(key)
        state[key] = _with_local(tensor, fused.to(held.device))
        if keep_fixups:
            recovered = add_correction(fused, product, -alpha) if local.numel() else fused
            fixups[key] = shard_fixup(local, recovered, region)
    if agreed_count(len(bad)):
        if damaged is not None:
            raise damaged
        where = f"{bad[0]!r}" if bad else "a shard of another rank"
        raise ValueError(
            f"LSSF: the fused checkpoint tensor {where} holds NaN or inf (alpha={alpha!r}); the "
            "checkpoint is not written"
        )
    return fixups if keep_fixups else None


def _mesh_device(tensor: Tensor) -> torch.device:
    """The accelerator a DTensor's mesh lives on (its current device), else the tensor's own device."""
    mesh = getattr(tensor, "device_mesh", None)
    if mesh is None or mesh.device_type == "cpu":
        return tensor.device
    module = getattr(torch, mesh.device_type, None)
    index = module.current_device() if module is not None and hasattr(module, "current_device") else None
    return torch.device(mesh.device_type, index)


def restore_raw_shards(
    parameters: Mapping[str, Tensor],
    subspace: Any,
    alpha_added: float,
    fixups: Mapping[str, Mapping[str, Any]] | None,
    *,
    matched: Mapping[str, str],
) -> list[str]:
    """Turn the fused weights just loaded into ``parameters`` back into the raw ones, in place on each local
    shard: ``fused − α·U'U'ᵀδ`` with this rank's fix-ups written over. Returns the keys not proven exact
    (block layout changed since the save, or the CRC-32 differs); with ``fixups=None`` every key is exact up
    to rounding only."""
    inexact = []
    with torch.no_grad():
        for key, name in matched.items():
            parameter = parameters[key]
            region, local, product = _shard_product(subspace, name, parameter)
            if not local.numel():
                continue
            raw = add_correction(local, product, -alpha_added)
            fixup = None if fixups is None else fixups.get(key)
            if fixups is not None and (fixup is None or not apply_shard_fixup(raw, region, fixup)):
                inexact.append(key)
            local_tensor(parameter).copy_(raw)
    return inexact


def realign_shards_in_place(
    parameters: Mapping[str, Tensor], subspace: Any, alpha: float, *, matched: Mapping[str, str]
) -> None:
    """``W ← W + α·U'U'ᵀδ`` on each rank's local shard of the matched live tensors (no communication)."""
    if alpha == 0:
        return
    with torch.no_grad():
        for key, name in matched.items():
            parameter = parameters[key]
            _, local, product = _shard_product(subspace, name, parameter)
            if local.numel():
                local_tensor(parameter).copy_(add_correction(local, product, alpha))


@contextlib.contextmanager
def temporarily_fused_shards(
    parameters: Mapping[str, Tensor], subspace: Any, alpha: float, *, matched: Mapping[str, str]
) -> Iterator[None]:
    """The matched live shards fused with ``alpha`` for the ``with`` block; the exact raw shards (kept on the
    CPU meanwhile: one copy of this rank's matched shards) come back after, also on an error."""
    saved: dict[str, Tensor] = {}
    try:
        if alpha != 0:
            for key in matched:
                saved[key] = local_tensor(parameters[key]).detach().to("cpu", copy=True)
            realign_shards_in_place(parameters, subspace, alpha, matched=matched)
        yield
    finally:
        with torch.no_grad():
            for key, raw in saved.items():
                local_tensor(parameters[key]).copy_(raw)


# -- fix-ups in a distributed checkpoint ---------------------------------------------------------------
SHARDED_FIXUPS = "lssf_lightning.sharded_fixups"


def gather_fixups(fixups: Mapping[str, Mapping[str, Any]], group=None) -> dict[str, Any] | None:
    """Rank 0 gets every rank's fix-ups, ``{"format", "world_size", "ranks": [{key: fixup}, ...]}``, for the
    checkpoint metadata that only rank 0 writes under distributed checkpointing; other ranks get ``None``.
    A collective."""
    tensors, info = {}, {}
    for i, (key, fixup) in enumerate(fixups.items()):
        tensors[f"{i}:index"], tensors[f"{i}:value"] = fixup["index"], fixup["value"]
        info[key] = {"i": i, "region": fixup["region"], "crc32": fixup["crc32"]}
    parts = gather_to_rank0(tensors, info, group)
    if parts is None:
        return None
    ranks = [
        {
            key: {
                "region": meta["region"],
                "crc32": meta["crc32"],
                "index": part[f"{meta['i']}:index"],
                "value": part[f"{meta['i']}:value"],
            }
            for key, meta in got.items()
        }
        for part, got in parts
    ]
    return {"format": SHARDED_FIXUPS, "world_size": len(ranks), "ranks": ranks}


def is_sharded_fixups(stored: Any) -> bool:
    return isinstance(stored, Mapping) and stored.get("format") == SHARDED_FIXUPS


def fixups_of_rank(stored: Mapping[str, Any], rank: int) -> dict[str, Mapping[str, Any]]:
    """This rank's fix-ups from :func:`gather_fixups`' record (empty if the checkpoint had fewer ranks: the
    blocks are checked by :func:`apply_shard_fixup` anyway)."""
    ranks = stored["ranks"]
    return dict(ranks[rank]) if rank < len(ranks) else {}


def fixup_layout_mismatch(
    parameters: Mapping[str, Tensor],
    fixups: Mapping[str, Mapping[str, Any]] | None,
    matched: Mapping[str, str],
    group=None,
) -> str | None:
    """Why this rank's fix-ups cannot make the resume exact (shard blocks laid out differently from the save:
    another number of processes or placements; or fix-ups of a one-process save), or ``None``. Checked before
    any weight is touched; a collective, so every rank gets the same answer and all refuse together."""
    bad = []
    if fixups is not None:
        for key in matched:
            fixup = fixups.get(key)
            if local_tensor(parameters[key]).numel() and (
                fixup is None or fixup.get("region") != shard_region(parameters[key]).as_json()
            ):
                bad.append(key)
    count = agreed_count(len(bad), group)
    if count == 0:
        return None
    example = f", e.g. {bad[0]}" if bad else ""
    return f"{count} weight shards{example} are not laid out as when the checkpoint was saved"
