"""LSSF on sharded weights (DTensor: FSDP2, tensor parallelism) and the safety subspace built across ranks.

Plain ``torch.distributed``; no Lightning. The fusion term of one matrix is ``α·U'(U'ᵀδ)`` (LSSF Eq. 13) with
``U'`` of shape ``(d_out, r)`` and ``R = U'ᵀδ`` of shape ``(r, d_in)``. A rank holding the block
``W[rows, cols]`` of a weight needs only ``U'[rows] @ R[:, cols]``: under FSDP2's ``Shard(0)`` its rows of
``U'`` and the whole ``R``, under ``Shard(1)`` all of ``U'`` and its columns of ``R``, under ``Replicate`` the
whole term — never a collective, never the dense matrix of another rank. GPT-2 ``Conv1D`` weights are stored
transposed (``(d_in, d_out)``), so there a checkpoint row is a column of ``R``.

:func:`build_across_ranks` splits the SVDs of a :class:`~lssf_lightning.subspace.SubspaceBuilder` over the
ranks of a process group (balanced by the estimated cost of each SVD, from the shapes), then broadcasts the
factors bit for bit, so every rank ends with exactly the entries a one-process build gives.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lssf_lightning.core.basis import add_correction
from lssf_lightning.core.checks import all_finite
from lssf_lightning.core.factors import LocalFactors, ShardRegion, SubspaceEntry, local_product, restrict
from lssf_lightning.io.schema import FormatError
from lssf_lightning.io.weights import ModuleStore
from lssf_lightning.subspace import SafetySubspace, SubspaceBuilder

__all__ = [
    "apply_shard_fixup",
    "assign_by_cost",
    "build_across_ranks",
    "build_subspace_across_ranks",
    "estimated_svd_cost",
    "fixup_layout_mismatch",
    "fixups_of_rank",
    "fuse_shard",
    "fuse_shard_",
    "fuse_state_shards",
    "gather_fixups",
    "gather_to_rank0",
    "gathered_store",
    "global_rank",
    "is_dtensor",
    "is_sharded_fixups",
    "local_tensor",
    "localize",
    "pad_shard",
    "realign_shards_in_place",
    "restore_raw_shards",
    "shard_fixup",
    "shard_region",
    "synced_generation",
    "temporarily_fused_shards",
    "world_size",
]


# -- where a rank's shard sits ------------------------------------------------------------------------


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (a sharded or replicated parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """The rank's own data of ``tensor``: the local shard of a DTensor, else ``tensor`` itself (no copy)."""
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():  # without autograd, `to_local` returns the DTensor's own local tensor (no view)
        return tensor.to_local()


def shard_region(tensor: Tensor) -> ShardRegion:
    """The block of the global 2-D weight that ``tensor``'s local data covers (all of it for a plain tensor).

    Handles any mix of ``Shard(0)``, ``Shard(1)`` and ``Replicate`` over the mesh dimensions, uneven shards
    (``torch.chunk`` sizes, as FSDP2 splits: the last ranks may hold fewer rows, or none) included.

    Raises:
        ValueError: the tensor is not 2-D, or has a placement whose local data is not one block (``Partial``,
            FSDP2+TP's ``_StridedShard``).
    """
    if tensor.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(tensor.shape)}")
    if not is_dtensor(tensor):
        return ShardRegion.full(tensor.shape)
    from torch.distributed.tensor import Replicate, Shard

    # torch has no public function for a DTensor's global offset; this is the one its checkpointing uses.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in tensor.placements:
        if type(placement) not in (Shard, Replicate):
            raise ValueError(
                f"cannot fuse a DTensor placed as {tensor.placements}: only Shard(0), Shard(1) and "
                "Replicate keep a rank's data one contiguous block of the weight"
            )
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return ShardRegion(
        tuple(int(s) for s in tensor.shape), tuple(int(o) for o in offset), tuple(int(s) for s in shape)
    )


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


def fuse_shard(entry: SubspaceEntry | LocalFactors, tensor: Tensor, alpha: float) -> Tensor:
    """``tensor + α·U'U'ᵀδ`` on the rank's own shard only (a new tensor, a DTensor if ``tensor`` is one).

    Rounds as :func:`lssf_lightning.core.basis.add_correction` (once, in the product's dtype), so subtracting
    with the same block product retraces the operation (what exact resumes rely on).
    """
    region = shard_region(tensor)
    local = local_tensor(tensor).detach()
    if entry.rank == 0 or alpha == 0 or local.numel() == 0:
        return _with_local(tensor, local.clone())
    return _with_local(tensor, add_correction(local, local_product(entry, region, local), alpha))


@torch.no_grad()
def fuse_shard_(parameter: Tensor, entry: SubspaceEntry | LocalFactors, alpha: float) -> None:
    """``parameter ← parameter + α·U'U'ᵀδ`` in place on the rank's local shard (no communication)."""
    local = local_tensor(parameter)
    if entry.rank == 0 or alpha == 0 or local.numel() == 0:
        return
    local.copy_(add_correction(local, local_product(entry, shard_region(parameter), local), alpha))


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


# -- moving small objects and tensors between ranks (no pickle) ---------------------------------------
def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group) -> torch.device:
    """Where collective buffers live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_bytes(payload: bytes, group=None, only_rank0: bool = False) -> list[bytes] | None:
    """Every rank's ``payload``, in rank order (sizes all-gathered, then the padded bytes all-gathered — or
    gathered to rank 0 alone with ``only_rank0``, where the other ranks get ``None``)."""
    rank, world = _world(group)
    if world == 1:
        return [payload]
    device = _comm_device(group)
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    buffer = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        buffer[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    if only_rank0:
        gathered = [torch.empty_like(buffer) for _ in range(world)] if rank == 0 else None
        dist.gather(buffer, gathered, dst=_group_rank0(group), group=group)
        if rank != 0:
            return None
    else:
        gathered = [torch.empty_like(buffer) for _ in range(world)]
        dist.all_gather(gathered, buffer, group=group)
    return [bytes(g[: int(s)].cpu().numpy()) for g, s in zip(gathered, sizes)]


def _all_gather_json(obj: Any, group=None) -> list[Any]:  # small objects only (every rank gets all)
    return [json.loads(b) for b in _all_gather_bytes(json.dumps(obj).encode(), group)]


def gather_to_rank0(
    tensors: Mapping[str, Tensor], info: Any = None, group=None
) -> list[tuple[dict[str, Tensor], Any]] | None:
    """Rank 0 receives every rank's ``(tensors, info)`` (tensors as safetensors bytes, ``info`` as JSON);
    other ranks get ``None``. A collective: every rank calls it. Used for per-shard fix-ups, which only rank 0
    writes into the checkpoint metadata under distributed checkpointing."""
    from safetensors.torch import load, save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    infos = _all_gather_bytes(json.dumps(info).encode(), group, only_rank0=True)
    blobs = _all_gather_bytes(save(tensors), group, only_rank0=True)  # never empty: a header at least
    if infos is None or blobs is None:
        return None
    return [(load(blob), json.loads(text)) for blob, text in zip(blobs, infos, strict=True)]


# -- the subspace built across ranks ------------------------------------------------------------------
def estimated_svd_cost(shape: Iterable[int]) -> float:
    """Relative cost of one entry's spectrum, from the weight's shape: a Gram matrix of the smaller side
    (``n²·N``) plus its eigen-decomposition (``~n³``), with ``n ≤ N`` the two sides."""
    n, big = sorted(int(s) for s in shape)
    return float(n) * n * big + float(n) ** 3


def assign_by_cost(costs: Mapping[str, float], world: int) -> dict[str, int]:
    """``{name: rank}``: longest-processing-time-first — the costliest entries first, each to the least loaded
    rank (ties: the lower rank). Deterministic, so every rank computes the same plan without talking."""
    loads = [0.0] * world
    plan = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        plan[name] = rank
        loads[rank] += costs[name]
    return plan


def _entry_bytes(entry: SubspaceEntry) -> Tensor:
    return torch.cat(
        [
            t.detach().contiguous().reshape(-1).view(torch.uint8)
            for t in (entry.left, entry.right, entry.singular_values)
        ]
    )


def build_across_ranks(
    builder: SubspaceBuilder,
    group=None,
    keep: Callable[[str], bool] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, SubspaceEntry]:
    """Build the entries of ``builder`` with the ranks of ``group`` sharing the SVDs, and exchange them.

    Each rank builds the entries :func:`assign_by_cost` gives it (from the weights' shapes), then every entry
    is broadcast by its builder, bit for bit; the builder's fingerprint and ranks are completed with every
    rank's part, so ``builder.metadata()`` is the same as after a one-process build. A collective: every
    rank calls it with a builder over the same inputs and settings.

    Args:
        builder: the :class:`~lssf_lightning.subspace.SubspaceBuilder` (every rank opens the same inputs).
        group: the process group (default: the whole world). Outside ``torch.distributed`` this is a plain
            one-process build.
        keep: which entries this rank keeps after the exchange (default: all — DDP). Return ``False`` for
            entries to leave to the subspace file (:class:`lssf_lightning.io.lazy_factors.LazyFactors`) or to
            restrict later (:func:`restrict`); only one received entry is resident at a time.
        progress: called with each name this rank builds.

    Returns:
        ``{name: entry}`` in ``builder.names`` order, for the kept names.
    """

    rank, world = _world(group)
    names = builder.names
    keep = keep or (lambda name: True)
    if world == 1:
        out = {}
        for name in names:
            if progress:
                progress(name)
            entry = builder.build(name)
            if keep(name):
                out[name] = entry
        return out
    costs = {name: estimated_svd_cost(builder.aligned.shape(builder.pairs[name][0])) for name in names}
    plan = assign_by_cost(costs, world)
    own: dict[str, SubspaceEntry] = {}
    for name in names:
        if plan[name] == rank:
            if progress:
                progress(name)
            own[name] = builder.build(name)
    digests = builder.fingerprint_digests()
    info = {
        "entries": {
            name: {
                "rank": e.rank,
                "shape": list(e.shape),
                "dtype": str(e.left.dtype).removeprefix("torch."),
                "entropy": e.entropy,
                "total_energy": e.total_energy,
                "conv1d": e.conv1d,
            }
            for name, e in own.items()
        },
        "digests": {k: v for k, v in digests.items() if k.split(":", 1)[1] in own},
    }
    infos = _all_gather_json(info, group)
    for part in infos:
        builder.add_fingerprint_digests(part["digests"])
        for name, meta in part["entries"].items():
            builder.ranks[name] = meta["rank"]
    device = _comm_device(group)
    group_ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    out = {}
    for name in names:
        owner = plan[name]
        meta = infos[owner]["entries"][name]
        dtype = getattr(torch, meta["dtype"])
        r = meta["rank"]
        d0, d1 = meta["shape"]
        d_out, d_in = (d1, d0) if meta["conv1d"] else (d0, d1)
        element = torch.empty((), dtype=dtype).element_size()
        sizes = (d_out * r * element, r * d_in * element, r * 4)
        if owner == rank:
            buffer = _entry_bytes(own[name]).to(device)
        else:
            buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        if sum(sizes):
            dist.broadcast(buffer, src=group_ranks[owner], group=group)
        if owner == rank:
            entry = own.pop(name)
        else:
            left, right, sigma = torch.split(buffer.cpu(), list(sizes))
            entry = SubspaceEntry(
                left=left.view(dtype).reshape(d_out, r).clone(),
                right=right.view(dtype).reshape(r, d_in).clone(),
                singular_values=sigma.view(torch.float32).clone(),
                entropy=meta["entropy"],
                total_energy=meta["total_energy"],
                conv1d=meta["conv1d"],
            )
        if keep(name):
            out[name] = entry
    return out


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
    if _agreed_count(len(bad)):
        if damaged is not None:
            raise damaged
        where = f"{bad[0]!r}" if bad else "a shard of another rank"
        raise ValueError(
            f"LSSF: the fused checkpoint tensor {where} holds NaN or inf (alpha={alpha!r}); the "
            "checkpoint is not written"
        )
    return fixups if keep_fixups else None


def _agreed_count(count: int, group=None) -> int:
    """``count`` summed over the ranks (a collective when distributed): every rank takes the same branch."""
    if world_size(group) == 1:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=_comm_device(group))
    dist.all_reduce(total, group=group)
    return int(total)


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


def localize(
    subspace: Any, parameters: Mapping[str, Tensor], matched: Mapping[str, str]
) -> dict[str, LocalFactors]:
    """``{name: factors}`` restricted to this rank's block of each matched weight: under FSDP2 ``Shard(0)``
    the rank's rows of ``U'`` and the whole ``U'ᵀδ``. Give the result to a ``SafetySubspace`` as its entries
    to drop the rest."""
    return {
        name: restrict(_block(subspace, name, shard_region(parameters[key])), shard_region(parameters[key]))
        for key, name in matched.items()
    }


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
    count = _agreed_count(len(bad), group)
    if count == 0:
        return None
    example = f", e.g. {bad[0]}" if bad else ""
    return f"{count} weight shards{example} are not laid out as when the checkpoint was saved"


# -- streaming full tensors to rank 0 ------------------------------------------------------------------
class _GatheringStore:
    """Rank 0's view of a sharded module: ``get(key)`` asks every rank to all-gather ``key`` (see
    :func:`gathered_store`); shapes and names need no communication."""

    def __init__(self, module, tensors: dict[str, Tensor], group) -> None:
        self._inner = ModuleStore(module)
        self._tensors, self._index, self._group = tensors, {k: i for i, k in enumerate(tensors)}, group
        self.location = f"<{type(module).__name__}, gathered from {_world(group)[1]} ranks>"

    def __getattr__(self, name: str) -> Any:  # keys, shape, dtype, is_conv1d, is_linear, owner, ...
        return getattr(self._inner, name)

    def __iter__(self):
        return iter(self._inner.keys())

    def full(self, key: str) -> Tensor:
        """The whole tensor ``key`` (gathered when sharded), on the CPU."""
        tensor = self._tensors[key]
        if not is_dtensor(tensor):
            return tensor.detach()
        _request(self._index[key], self._group)
        return tensor.detach().full_tensor().cpu()

    def get(self, key: str) -> Tensor:
        weight = self.full(key)
        layer = self._inner.lora_layer(key)
        if layer is None or getattr(layer, "merged", False):
            return weight
        prefix = key[: -len(".base_layer.weight")]
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            a = self.full(f"{prefix}.lora_A.{adapter}.weight").to(torch.float32)
            b = self.full(f"{prefix}.lora_B.{adapter}.weight").to(torch.float32)
            delta = (b @ a) * layer.scaling[adapter]
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            weight = weight + delta.to(weight.dtype)
        return weight


def _request(index: int, group) -> None:
    _, world = _world(group)
    if world > 1:
        message = torch.tensor([index], dtype=torch.int64, device=_comm_device(group))
        dist.broadcast(message, src=_group_rank0(group), group=group)


def _group_rank0(group) -> int:
    return dist.get_process_group_ranks(group)[0] if group is not None else 0


@contextlib.contextmanager
def gathered_store(module, group=None) -> Iterator[_GatheringStore | None]:
    """Stream a sharded module's full tensors to rank 0, one at a time, in whatever order rank 0 reads them.

    ``with gathered_store(module) as store:`` — on rank 0 ``store`` is a weight store (``keys``, ``shape``,
    ``get``…) whose ``get`` gathers one full tensor; the other ranks serve those gathers on entering until
    rank 0 leaves the block (also on an error there), and get ``None``. Host memory: one full tensor plus the
    shards. A collective: every rank enters. Plain (non-DTensor) tensors are read locally.
    """
    tensors = dict(module.state_dict(keep_vars=True))
    rank, world = _world(group)
    if rank == 0 or world == 1:
        try:
            yield _GatheringStore(module, tensors, group)
        finally:
            if world > 1:
                _request(-1, group)
        return
    keys, device = list(tensors), _comm_device(group)
    while True:
        message = torch.empty(1, dtype=torch.int64, device=device)
        dist.broadcast(message, src=_group_rank0(group), group=group)
        if int(message) < 0:
            break
        tensors[keys[int(message)]].detach().full_tensor()
    yield None


def global_rank(group=None) -> int:
    """This process's rank (0 outside ``torch.distributed``)."""
    return _world(group)[0]


def pad_shard(prompts: list, rank: int, world: int) -> tuple[list, int]:
    """``(this rank's prompts padded to ⌈n/world⌉, how many are real)``. Under FSDP2 every forward pass is a
    collective, so every rank must generate for the same number of prompts; padding repeats the first prompt
    and its answers are dropped."""
    shard = list(prompts[rank::world])
    size = -(-len(prompts) // world) if prompts else 0
    return shard + [prompts[0]] * (size - len(shard)), len(shard)


def synced_generation(model) -> None:
    """Make ``generate`` keep every rank decoding until all are done (transformers' ``synced_gpus``), as it
    does for models it shards itself: transformers does not recognise a model sharded by ``fully_shard`` by
    hand."""
    for module in (model, getattr(model, "get_base_model", lambda: None)()):
        if module is not None:  # transformers' own flag (its apply_fsdp2 sets it; generate reads it)
            module._is_fsdp_managed_module = True


def world_size(group=None) -> int:
    """The number of processes (1 outside ``torch.distributed``)."""
    return _world(group)[1]


def build_subspace_across_ranks(
    aligned, unaligned, config=None, *, group=None, progress: bool = False, **options: Any
):
    """:meth:`SafetySubspace.from_weights` with the SVDs shared by the ranks of ``group``
    (:func:`build_across_ranks`): the same entries and metadata, bit for bit. A collective."""
    builder = SubspaceBuilder(aligned, unaligned, config, progress=False, **options)
    entries = build_across_ranks(builder, group)
    return SafetySubspace(entries, builder.metadata())
