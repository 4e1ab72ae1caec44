"""Disk-backed safety-subspace factors: a ``Mapping[str, SubspaceEntry]`` that reads each entry from the file.

On an 8-rank node every rank holding every factor costs as much host memory as the model itself at η = 0.9
(see ``benchmarks/bench_distributed.py``). :class:`LazyFactors` keeps the subspace file memory-mapped
(``safetensors.safe_open``) and materialises an entry only when asked — when a checkpoint is written, or a
weight is fused — with a small LRU cache: resident factor memory stays ≤ ``budget_bytes`` plus the entry in
hand. :meth:`LazyFactors.restrict` reads only the rows of ``U'`` and columns of ``U'ᵀδ`` a shard needs.

Example::

    factors = LazyFactors("safety.safetensors")
    subspace = SafetySubspace(factors, factors.metadata)
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lssf_lightning.core.factors import LocalFactors, ShardRegion, SubspaceEntry
from lssf_lightning.io.subspace_file import (
    check_entry_bytes,
    check_factor,
    read_subspace_header,
    subspace_path,
)
from lssf_lightning.validation import check_int

__all__ = ["DEFAULT_BUDGET_BYTES", "LazyFactors"]

DEFAULT_BUDGET_BYTES = 64 * 2**20


class LazyFactors(Mapping):
    """The entries of a safety-subspace file, read on demand (memory-mapped) instead of all resident.

    The header is checked as :meth:`lssf_lightning.SafetySubspace.load` checks it
    (:func:`~lssf_lightning.io.subspace_file.read_subspace_header`), and every factor (or block of one) is
    checked finite when it is read, with the same one-line error naming the file and the tensor.

    Args:
        path: a subspace file written by :meth:`lssf_lightning.SafetySubspace.save`.
        budget_bytes: how many bytes of recently read entries to keep (LRU); ``0`` keeps none. An entry larger
            than the budget is returned but not kept.
        map_location: device the returned tensors are moved to.

    Attributes:
        metadata: the subspace's metadata (settings, fingerprint).
        peak_resident_bytes: the most bytes the cache held at once (for memory reports).

    Raises:
        FileNotFoundError: no such file.
        FormatError: a header that breaks the subspace file's schema; on reading, a factor holding NaN or inf.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        map_location: str | torch.device = "cpu",
    ) -> None:
        self.budget_bytes = check_int("budget_bytes", budget_bytes, minimum=0)
        self.path = subspace_path(path)
        self.map_location = map_location
        self._handle = None
        header, self._tensors = read_subspace_header(self.path)
        self._header = header
        self._verified: set[str] = set()  # entries whose bytes were checked against the integrity hash
        self.metadata: dict[str, Any] = dict(header["metadata"])
        self._layout: dict[str, dict[str, Any]] = dict(header["entries"])
        self._cache: OrderedDict[str, SubspaceEntry] = OrderedDict()
        self._cached_bytes = 0
        self.peak_resident_bytes = 0

    # -- file access -----------------------------------------------------------------------------------
    def _open(self):
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        return self._handle

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return check_factor(self.path, name, tensor).to(self.map_location)

    def __getstate__(self) -> dict[str, Any]:  # the mmap handle is not copied; it reopens on first use
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_cache"] = OrderedDict()
        state["_cached_bytes"] = 0
        return state

    # -- Mapping ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        return iter(self._layout)

    def __len__(self) -> int:
        return len(self._layout)

    def __contains__(self, key: object) -> bool:
        return key in self._layout

    def __getitem__(self, key: str) -> SubspaceEntry:
        if key not in self._layout:
            raise KeyError(key)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        entry = self._read(key)
        size = entry_bytes(entry)
        if size <= self.budget_bytes:
            while self._cache and self._cached_bytes + size > self.budget_bytes:
                _, dropped = self._cache.popitem(last=False)
                self._cached_bytes -= entry_bytes(dropped)
            self._cache[key] = entry
            self._cached_bytes += size
            self.peak_resident_bytes = max(self.peak_resident_bytes, self._cached_bytes)
        return entry

    def _read(self, key: str) -> SubspaceEntry:
        handle, info = self._open(), self._layout[key]
        parts = [check_factor(self.path, f"{key}:{part}", handle.get_tensor(f"{key}:{part}"))
                 for part in ("left", "right", "sigma")]
        check_entry_bytes(self.path, self._header, key, parts)
        self._verified.add(key)
        left, right, sigma = (part.to(self.map_location) for part in parts)
        return SubspaceEntry(
            left=left,
            right=right,
            singular_values=sigma,
            entropy=float(info["entropy"]),
            total_energy=float(info["total_energy"]),
            conv1d=info["conv1d"],
        )

    # -- without reading the factors -------------------------------------------------------------------
    def rank(self, key: str) -> int:
        """The entry's rank, from the file header."""
        return int(self._tensors[f"{key}:left"].shape[1])

    def shape(self, key: str) -> tuple[int, int]:
        """The weight's shape as stored in the checkpoint, from the file header."""
        d_out = int(self._tensors[f"{key}:left"].shape[0])
        d_in = int(self._tensors[f"{key}:right"].shape[1])
        return (d_in, d_out) if self._layout[key]["conv1d"] else (d_out, d_in)

    @property
    def resident_bytes(self) -> int:
        """Bytes of entries the cache holds now."""
        return self._cached_bytes

    def restrict(self, key: str, region: ShardRegion) -> LocalFactors:
        """The factors the block ``region`` of weight ``key`` needs, read from the file slice by slice
        (``U'[rows]`` and ``U'ᵀδ[:, cols]``, each checked finite); nothing else of the entry is read or
        kept."""

        if tuple(self.shape(key)) != region.global_shape:
            raise ValueError(
                f"{key}: the subspace entry has shape {self.shape(key)}, the weight {region.global_shape}"
            )
        conv1d = bool(self._layout[key]["conv1d"])
        out_slice, in_slice = region.entry_slices(conv1d)
        handle = self._open()
        self._verify(key)
        left = self._checked(f"{key}:left", handle.get_slice(f"{key}:left")[out_slice])
        right = self._checked(f"{key}:right", handle.get_slice(f"{key}:right")[:, in_slice].contiguous())
        return LocalFactors(left, right, region, conv1d)

    def _verify(self, key: str) -> None:
        """Check entry ``key``'s bytes against the file's integrity hash once (read one tensor at a time)."""
        if key in self._verified:
            return
        handle = self._open()
        check_entry_bytes(self.path, self._header, key,
                          (handle.get_tensor(f"{key}:{part}") for part in ("left", "right", "sigma")))
        self._verified.add(key)

    def __repr__(self) -> str:
        return f"LazyFactors({str(self.path)!r}, {len(self)} entries, budget {self.budget_bytes} bytes)"


def entry_bytes(entry: Any) -> int:
    """Bytes held by one entry's tensors."""
    return sum(t.numel() * t.element_size() for t in (entry.left, entry.right, entry.singular_values))
