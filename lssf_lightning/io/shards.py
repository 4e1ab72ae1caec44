"""Safetensors files: read through the ``safetensors`` package one tensor at a time; write shards as a stream.

Reading uses ``safetensors.safe_open(..., backend="pread")``: the package validates the header (dtypes,
shapes, offsets covering the file exactly) and reads each tensor with ``pread(2)`` into memory of its own, so
the resident memory stays at one tensor whatever the checkpoint's size, and a file is never memory-mapped.
Writing stays custom: ``safetensors.torch.save_file`` needs every tensor of a file in memory at once, while
:class:`ShardedWriter` plans each shard's header from the shapes (shard split by ``huggingface_hub``'s
``split_state_dict_into_shards_factory``) and writes each tensor as soon as it is ready. Every tensor written
is checked finite first: a NaN or inf never reaches a file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lssf_lightning.core.checks import all_finite
from lssf_lightning.io.layout import MAX_SHARD_BYTES
from lssf_lightning.io.schema import FormatError, field, load_json
from lssf_lightning.validation import SettingError

__all__ = [
    "INDEX_NAME",
    "NonFiniteTensorError",
    "SafetensorsReader",
    "ShardedWriter",
    "TensorEntry",
    "index_files",
    "nbytes",
    "parse_shard_size",
    "read_header",
    "write_safetensors",
]

INDEX_NAME = "model.safetensors.index.json"
_BINARY_UNITS = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


class NonFiniteTensorError(ValueError):
    """A tensor about to be written holds NaN or inf; nothing is written."""


def nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    """The bytes a tensor of ``dtype`` and ``shape`` takes in a safetensors file."""
    return math.prod(shape) * dtype.itemsize


def parse_shard_size(value: int | str, name: str = "max shard size") -> int:
    """Bytes from ``2147483648``, ``"500MB"``, ``"2GB"`` (decimal, via ``huggingface_hub``) or ``"2GiB"``
    (binary).

    ``huggingface_hub``'s ``parse_size_to_int`` knows the decimal units only; the four binary units are read
    here so that ``2GiB`` means ``2·2³⁰`` bytes, not an error or ``2·10⁹``.
    """
    # huggingface_hub 2.x does not re-export it from a public module.
    from huggingface_hub.serialization._base import parse_size_to_int

    if isinstance(value, str):
        text = value.strip()
        try:
            if text.isdigit():
                size = int(text)
            elif text[-3:].upper() in _BINARY_UNITS:
                size = int(float(text[:-3]) * _BINARY_UNITS[text[-3:].upper()])
            else:
                size = parse_size_to_int(text)
        except (ValueError, OverflowError):
            raise SettingError(f"{name} must be a size such as 500MB, 2GB or 2GiB, got {value!r}") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        raise SettingError(f"{name} must be a number of bytes or a size such as 2GB, got {value!r}")
    if size < 1:
        raise SettingError(f"{name} must be at least 1 byte, got {value!r}")
    return size


# -- reading ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype and shape."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def _open(path: Path):
    """A ``safe_open`` handle (pread backend); a bad header is a :class:`FormatError` naming the file."""
    from safetensors import SafetensorError, safe_open

    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a safetensors file", str(path))
    try:
        return safe_open(path, framework="pt", backend="pread")
    except SafetensorError as err:
        raise FormatError(path, f"not a valid safetensors file ({err})") from None
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path)) from None


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """``({key: TensorEntry}, metadata)`` of one safetensors file, keys in file order.

    Raises:
        FormatError: the header is not valid safetensors, or a dtype has no torch equivalent.
    """
    path = Path(path)
    handle = _open(path)
    entries = {}
    dtypes = _torch_dtypes()
    for key in handle.offset_keys():
        view = handle.get_slice(key)
        code = view.get_dtype()
        if code not in dtypes:
            raise FormatError(path, f"tensor {key!r} has dtype {code}, which torch cannot hold unpacked")
        entries[key] = TensorEntry(path, dtypes[code], tuple(view.get_shape()))
    return entries, dict(handle.metadata() or {})


class SafetensorsReader:
    """A lazy ``key → tensor`` view over one or more safetensors files; ``get`` reads a single tensor."""

    def __init__(self, files: Iterable[str | os.PathLike]) -> None:
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        self._handles: dict[Path, Any] = {}
        for file in files:
            entries, metadata = read_header(file)
            duplicate = self.entries.keys() & entries.keys()
            if duplicate:
                raise FormatError(file, f"tensor {min(duplicate)!r} also appears in another file")
            self.entries.update(entries)
            self.metadata.update(metadata)

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, key: str) -> Tensor:
        from safetensors import SafetensorError

        file = self.entries[key].file
        if file not in self._handles:
            self._handles[file] = _open(file)
        try:
            return self._handles[file].get_tensor(key)
        except SafetensorError as err:
            problem = f"tensor {key!r} cannot be read ({err}); is the file truncated?"
            raise FormatError(file, problem) from None

    def close(self) -> None:
        self._handles.clear()


def index_files(index: str | os.PathLike) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names, checked against its schema and the shards.

    Raises:
        FormatError: invalid JSON, no ``weight_map`` object, a shard name that is not a plain
            ``*.safetensors`` file name of the index's directory, or a tensor missing from its shard.
        FileNotFoundError, IsADirectoryError: a shard that does not exist or is a directory.
    """
    index = Path(index)
    weight_map = field(index, load_json(index), "weight_map", dict)
    if not weight_map:
        raise FormatError(index, "field 'weight_map' is empty")
    shards: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name:
            raise FormatError(index, f"weight_map[{key!r}] must be the file name of a .safetensors shard "
                              f"next to the index, got {name!r}")
        shards.setdefault(name, []).append(key)
    files = []
    for name, keys in shards.items():
        file = index.parent / name
        if file.is_dir():
            raise IsADirectoryError(errno.EISDIR, f"is a directory, but {index.name} names it as a shard",
                                    str(file))
        if not file.is_file():
            raise FileNotFoundError(errno.ENOENT, f"missing shard named by {index.name}", str(file))
        present = read_header(file)[0]
        absent = [k for k in keys if k not in present]
        if absent:
            raise FormatError(index, f"weight_map puts {absent[0]!r} in {name}, which has no such tensor")
        files.append(file)
    return files


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    """``{safetensors code: torch dtype}``, inverted from :func:`dtype_name` over torch's dtypes.

    (Asking the package for each tensor instead — an empty slice, ``get_slice(key)[:0].dtype`` — costs 2 ms
    per tensor, 0.5 s per SmolLM2 file.) Packed dtypes (two values per byte) are left out.
    """
    found = {}
    for dtype in {value for value in vars(torch).values() if isinstance(value, torch.dtype)}:
        with contextlib.suppress(ValueError):
            if _spec_shape(dtype) == [1]:
                found.setdefault(dtype_name(dtype), dtype)
    return found


def _spec_shape(dtype: torch.dtype) -> list[int]:
    from safetensors import TensorSpec

    dtype_name(dtype)  # raises ValueError for a dtype safetensors cannot write
    return list(TensorSpec(dtype=str(dtype).removeprefix("torch."), shape=[1], data_ptr=0, data_len=0).shape)


# -- writing ------------------------------------------------------------------------------------------------
@functools.cache
def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors header code of ``dtype`` (``torch.bfloat16`` → ``"BF16"``), from the ``safetensors``
    package."""
    from safetensors import TensorSpec

    try:
        return TensorSpec(dtype=str(dtype).removeprefix("torch."), shape=[0], data_ptr=0, data_len=0).dtype
    except Exception as err:  # noqa: BLE001 - the package raises its own error type for unknown dtypes
        raise ValueError(f"dtype {dtype} cannot be written to safetensors ({err})") from None


def _tensor_bytes(key: str, tensor: Tensor, path: Path) -> memoryview:
    """The bytes of ``tensor``, after checking it holds no NaN or inf (the one finiteness check of every
    write)."""
    tensor = tensor.detach().to("cpu").contiguous()
    if not all_finite(tensor):
        raise NonFiniteTensorError(f"tensor {key} holds NaN or inf; refusing to write it to {path}")
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _header_bytes(plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """A file's start: the header's length (8 bytes, little-endian) and the JSON header, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, dtype, shape in plan:
        size = nbytes(dtype, shape)
        header[key] = {"dtype": dtype_name(dtype), "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@contextlib.contextmanager
def _naming(path: Path):
    """An ``OSError`` without a file name (a full disk) gets ``path`` as its file name."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


def _write(file, data, path: Path) -> None:
    """``file.write(data)``, errors naming ``path``."""
    with _naming(path):
        file.write(data)


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to one safetensors file (not atomic: write it inside
    :func:`~lssf_lightning.io.guard.guarded_output`).

    Raises:
        NonFiniteTensorError: a tensor holds NaN or inf (checked before the file is opened).
    """
    path = Path(path)
    data = [_tensor_bytes(key, tensor, path) for key, tensor in tensors.items()]
    plan = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with open(path, "wb") as f:
        _write(f, _header_bytes(plan, metadata or {}), path)
        for chunk in data:
            _write(f, chunk, path)


def _plan_shards(plan, max_shard_bytes: int) -> list[list]:
    """Split ``plan`` into shards by ``huggingface_hub``'s rule (a tensor larger than a shard gets its
    own)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    items = {item[0]: item for item in plan}
    split = split_state_dict_into_shards_factory(
        items, get_storage_size=lambda item: nbytes(item[1], item[2]),
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_bytes,
    )
    return [[items[key] for key in keys] for keys in split.filename_to_tensors.values()] if plan else []


class ShardedWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards plus the index, one tensor at a time.

    The plan (keys, dtypes, shapes) fixes every shard's header up front, so each tensor is written as soon as
    it is ready and then dropped. Tensors must arrive in :attr:`order` (the plan's order, except that a tensor
    larger than a shard is moved into a shard of its own ahead of the shard being filled).

    Args:
        directory: an existing (staging) directory to write into.
        plan: ``(key, dtype, shape)`` for every tensor.
        max_shard_bytes: shard size in bytes, or a size string (``"2GB"``, ``"2GiB"``).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int | str = MAX_SHARD_BYTES,
    ) -> None:
        self.directory = Path(directory)
        for key, dtype, _ in plan:
            dtype_name(dtype)  # refuse an unwritable dtype before any data is written
        self.shards = _plan_shards(plan, parse_shard_size(max_shard_bytes))
        self.order = [item[0] for shard in self.shards for item in shard]
        self._items = [item for shard in self.shards for item in shard]
        self._written = 0
        self._file = None
        self._path: Path | None = None
        self._shard_index = -1
        self._left_in_shard = 0
        self.total_bytes = sum(nbytes(d, s) for _, d, s in plan)

    def shard_name(self, index: int) -> str:
        if len(self.shards) == 1:
            return "model.safetensors"
        return f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def write(self, key: str, tensor: Tensor) -> None:
        """Write the next tensor of :attr:`order`; it must have the planned key, dtype and shape and be
        finite.

        Raises:
            ValueError: the tensor is not the next planned one, or has another dtype or shape.
            NonFiniteTensorError: it holds NaN or inf.
        """
        expected = self._items[self._written] if self._written < len(self._items) else None
        if expected is None or expected[0] != key:
            raise ValueError(f"tensor {key!r} arrives out of the planned order "
                             f"(expected {expected and expected[0]!r})")
        if tensor.dtype != expected[1] or tuple(tensor.shape) != expected[2]:
            raise ValueError(
                f"tensor {key!r} is {tensor.dtype}{tuple(tensor.shape)}, planned {expected[1]}{expected[2]}"
            )
        if self._left_in_shard == 0:
            self._open_next_shard()
        _write(self._file, _tensor_bytes(key, tensor, self._path), self._path)
        self._written += 1
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self.close()

    def _open_next_shard(self) -> None:
        self._shard_index += 1
        shard = self.shards[self._shard_index]
        self._path = self.directory / self.shard_name(self._shard_index)
        self._file = open(self._path, "wb")  # noqa: SIM115 - stays open across write() calls, closed by close()
        _write(self._file, _header_bytes(shard, {"format": "pt"}), self._path)
        self._left_in_shard = len(shard)

    def finish(self) -> None:
        """Check that every planned tensor arrived and write the index when there are several shards."""
        if self._written < len(self._items):
            raise ValueError(f"tensor {self._items[self._written][0]!r} was planned but never written")
        if len(self.shards) > 1:
            weight_map = {key: self.shard_name(i)
                          for i, shard in enumerate(self.shards) for key, _, _ in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            path = self.directory / INDEX_NAME
            with open(path, "w") as f:
                _write(f, json.dumps(index, indent=2), path)

    def close(self) -> None:
        if self._file is not None:
            try:
                with _naming(self._path):  # the last buffered bytes of a full disk fail here
                    self._file.close()
            finally:
                self._file = None
