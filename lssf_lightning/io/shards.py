"""Streaming safetensors: read one tensor at a time with plain file reads, write shards tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header (``{key: {dtype, shape, data_offsets}}`` plus
``__metadata__``), then the raw bytes. Reading with ``readinto`` instead of a memory map keeps the resident
memory at one tensor, whatever the checkpoint's size; writing a shard needs only the tensor in hand, because the
header is planned from the shapes before any data is written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "SafetensorsReader",
    "ShardedWriter",
    "TensorEntry",
    "read_header",
    "write_safetensors",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and byte range (absolute in the file)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse a safetensors header: ``({key: TensorEntry}, metadata)``. Raises ``ValueError`` on a bad file."""
    path = Path(path)
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a safetensors file ({err})") from None
    base = 8 + length
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    for key, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries[key] = TensorEntry(path, DTYPES[info["dtype"]], tuple(info["shape"]), base + begin, base + end)
    return entries, metadata


def _read(entry: TensorEntry) -> Tensor:
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    with entry.file.open("rb") as f:
        f.seek(entry.start)
        if entry.nbytes and f.readinto(buffer.numpy()) != entry.nbytes:
            raise ValueError(f"{entry.file} is truncated")
    if entry.dtype == torch.bool:
        return buffer.to(torch.bool).reshape(entry.shape)
    return buffer.view(entry.dtype).reshape(entry.shape)


class SafetensorsReader:
    """A lazy ``key → tensor`` view over one or more safetensors files; ``get`` loads a single tensor."""

    def __init__(self, files: Iterable[str | os.PathLike]) -> None:
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            entries, metadata = read_header(file)
            duplicate = self.entries.keys() & entries.keys()
            if duplicate:
                raise ValueError(f"tensor {sorted(duplicate)[0]!r} appears in more than one file, e.g. {file}")
            self.entries.update(entries)
            self.metadata.update(metadata)

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, key: str) -> Tensor:
        return _read(self.entries[key])


def _tensor_bytes(tensor: Tensor) -> memoryview:
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _header_bytes(plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, dtype, shape in plan:
        size = math.prod(shape) * (1 if dtype == torch.bool else dtype.itemsize)
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to one safetensors file (not atomic; callers write into a temporary location)."""
    plan = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with open(path, "wb") as f:
        header = _header_bytes(plan, metadata or {})
        f.write(struct.pack("<Q", len(header)) + header)
        f.writelines(_tensor_bytes(tensor) for tensor in tensors.values())


class ShardedWriter:
    """Writes tensors in a planned order into ``model-0000i-of-0000n.safetensors`` shards plus the index.

    The plan (keys, dtypes, shapes, in the order the tensors will arrive) fixes every shard's header up front,
    so each tensor is written as soon as it is ready and then dropped.

    Args:
        directory: an existing directory to write into.
        plan: ``(key, dtype, shape)`` in arrival order.
        max_shard_bytes: start a new shard once a shard would exceed this (one tensor never splits).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = 2 * 1024**3,
    ) -> None:
        self.directory = Path(directory)
        self.shards = _split(plan, max_shard_bytes)
        self._order = [item for shard in self.shards for item in shard]
        self._written = 0
        self._file = None
        self._shard_index = -1
        self._left_in_shard = 0
        self.total_bytes = sum(math.prod(s) * d.itemsize for _, d, s in plan)

    def shard_name(self, index: int) -> str:
        if len(self.shards) == 1:
            return "model.safetensors"
        return f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def write(self, key: str, tensor: Tensor) -> None:
        """Write the next tensor of the plan; it must have the planned key, dtype and shape."""
        expected = self._order[self._written] if self._written < len(self._order) else None
        if expected is None or expected[0] != key:
            raise ValueError(f"tensor {key!r} arrives out of the planned order (expected {expected and expected[0]!r})")
        if tensor.dtype != expected[1] or tuple(tensor.shape) != expected[2]:
            raise ValueError(
                f"tensor {key!r} is {tensor.dtype}{tuple(tensor.shape)}, planned {expected[1]}{expected[2]}"
            )
        if self._left_in_shard == 0:
            self._open_next_shard()
        self._file.write(_tensor_bytes(tensor))
        self._written += 1
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self._file.close()
            self._file = None

    def _open_next_shard(self) -> None:
        self._shard_index += 1
        shard = self.shards[self._shard_index]
        self._file = open(self.directory / self.shard_name(self._shard_index), "wb")
        header = _header_bytes(shard, {"format": "pt"})
        self._file.write(struct.pack("<Q", len(header)) + header)
        self._left_in_shard = len(shard)

    def finish(self) -> None:
        """Check that every planned tensor arrived and write the index when there are several shards."""
        if self._written < len(self._order):
            raise ValueError(f"tensor {self._order[self._written][0]!r} was planned but never written")
        if len(self.shards) > 1:
            weight_map = {key: self.shard_name(i) for i, shard in enumerate(self.shards) for key, _, _ in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _split(plan, max_shard_bytes):
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = math.prod(item[2]) * item[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards if plan else [[]]
