"""The safety subspace built across ranks: the SVDs of a :class:`~lssf_lightning.subspace.SubspaceBuilder`
split over the ranks of a process group (balanced by the estimated cost of each SVD, from the shapes), then
the factors broadcast bit for bit, so every rank ends with exactly the entries a one-process build gives."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lssf_lightning.core.factors import SubspaceEntry
from lssf_lightning.distributed.collectives import all_gather_json, comm_device, rank_and_world
from lssf_lightning.subspace import SafetySubspace, SubspaceBuilder

__all__ = ["assign_by_cost", "build_across_ranks", "build_subspace_across_ranks", "estimated_svd_cost"]


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

    rank, world = rank_and_world(group)
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
    infos = _exchange_info(builder, own, group)
    device = comm_device(group)
    group_ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    out = {}
    for name in names:
        owner = plan[name]
        meta = infos[owner]["entries"][name]
        entry = _broadcast_entry(own.pop(name, None), meta, group_ranks[owner], device, group)
        if keep(name):
            out[name] = entry
    return out


def _exchange_info(builder: SubspaceBuilder, own: Mapping[str, SubspaceEntry], group) -> list[dict[str, Any]]:
    """Every rank's ``{"entries": {name: shape, dtype, rank…}, "digests": …}`` of the entries it built; the
    builder's fingerprint digests and ranks are completed with every rank's part."""
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
    infos = all_gather_json(info, group)
    for part in infos:
        builder.add_fingerprint_digests(part["digests"])
        for name, meta in part["entries"].items():
            builder.ranks[name] = meta["rank"]
    return infos


def _broadcast_entry(
    entry: SubspaceEntry | None, meta: Mapping[str, Any], source: int, device: torch.device, group
) -> SubspaceEntry:
    """The entry built on the rank ``source``, bit for bit on every rank (``entry``: the built one there,
    ``None`` elsewhere)."""
    dtype = getattr(torch, meta["dtype"])
    r = meta["rank"]
    d0, d1 = meta["shape"]
    d_out, d_in = (d1, d0) if meta["conv1d"] else (d0, d1)
    element = torch.empty((), dtype=dtype).element_size()
    sizes = (d_out * r * element, r * d_in * element, r * 4)
    if entry is not None:
        buffer = _entry_bytes(entry).to(device)
    else:
        buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    if sum(sizes):
        dist.broadcast(buffer, src=source, group=group)
    if entry is not None:
        return entry
    left, right, sigma = torch.split(buffer.cpu(), list(sizes))
    return SubspaceEntry(
        left=left.view(dtype).reshape(d_out, r).clone(),
        right=right.view(dtype).reshape(r, d_in).clone(),
        singular_values=sigma.view(torch.float32).clone(),
        entropy=meta["entropy"],
        total_energy=meta["total_energy"],
        conv1d=meta["conv1d"],
    )


def build_subspace_across_ranks(
    aligned, unaligned, config=None, *, group=None, progress: bool = False, **options: Any
):
    """:meth:`SafetySubspace.from_weights` with the SVDs shared by the ranks of ``group``
    (:func:`build_across_ranks`): the same entries and metadata, bit for bit. A collective."""
    builder = SubspaceBuilder(aligned, unaligned, config, progress=False, **options)
    entries = build_across_ranks(builder, group)
    return SafetySubspace(entries, builder.metadata())
