"""The safety subspace file: one safetensors file, three tensors per matrix, the metadata as JSON.

Layout (format version 1, unchanged since lssf_lightning 0.1)::

    <key>:left   U'      (d_out, r)   floating point
    <key>:right  U'ᵀδ    (r, d_in)    floating point
    <key>:sigma  σ_1…σ_r (r,)         floating point
    __metadata__["lssf"] = {"format": "lssf_lightning.safety_subspace", "version": 1,
                            "metadata": {...build settings...},
                            "entries": {<key>: {"entropy": float, "total_energy": float, "conv1d": bool}}}

:func:`read_subspace_file` checks all of it (a violation is one :class:`~lssf_lightning.io.schema.FormatError`
naming the file and the field, never a shape error later in a matrix product) and that every factor is
finite; :func:`write_subspace_file` writes through the output guard.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lssf_lightning.core.checks import all_finite
from lssf_lightning.io.guard import guarded_output
from lssf_lightning.io.schema import FormatError, field, load_json
from lssf_lightning.io.shards import SafetensorsReader, TensorEntry, read_header, write_safetensors

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "check_factor",
    "read_subspace_file",
    "read_subspace_header",
    "subspace_path",
    "write_subspace_file",
]

FORMAT = "lssf_lightning.safety_subspace"
FORMAT_VERSION = 1
_PARTS = {"left": 2, "right": 2, "sigma": 1}  # tensor suffix → number of dimensions
# Metadata fields the package reads back, with their types (others are kept as they are).
_METADATA_FIELDS: dict[str, tuple[type, ...]] = {
    "eta": (float,), "alpha_1": (float,), "source": (str,), "svd_method": (str,), "fingerprint": (str,),
    "max_rank": (int, type(None)), "aligned": (str,), "unaligned": (str,),
}


def read_subspace_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, TensorEntry]]:
    """The checked JSON header of a subspace file and its tensors' entries (nothing else is read).

    Raises:
        FormatError: not a safetensors file, not a subspace, or a field / tensor that breaks the layout above.
    """
    path = Path(path)
    tensors, raw_metadata = read_header(path)
    if "lssf" not in raw_metadata:
        raise FormatError(path, "is not a safety subspace written by lssf_lightning (no 'lssf' metadata)")
    header = load_json(path, raw_metadata["lssf"], where="the 'lssf' metadata")
    if field(path, header, "format", str) != FORMAT:
        raise FormatError(path, "is not a safety subspace written by lssf_lightning "
                                f"(format {header['format']!r})")
    version = field(path, header, "version", int)
    if version > FORMAT_VERSION:
        raise FormatError(path, f"has format version {version}; this lssf_lightning reads up to "
                                f"{FORMAT_VERSION}: upgrade the package")
    if version < 1:
        raise FormatError(path, f"field 'version' must be >= 1, got {version}")
    metadata = field(path, header, "metadata", dict)
    for name, kinds in _METADATA_FIELDS.items():
        field(path, metadata, name, kinds, where="metadata", default=None)
    entries = field(path, header, "entries", dict)
    expected = set()
    for key, info in entries.items():
        where = f"entry {key!r}"
        field(path, info, "entropy", float, where=where)
        if field(path, info, "total_energy", float, where=where) < 0:
            raise FormatError(path, f"{where}: field 'total_energy' must be >= 0")
        field(path, info, "conv1d", bool, where=where)
        _check_shapes(path, key, tensors)
        expected.update(f"{key}:{part}" for part in _PARTS)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise FormatError(path, f"tensor {extra[0]!r} belongs to no entry of the 'entries' field")
    return header, tensors


def _check_shapes(path: Path, key: str, tensors: Mapping[str, TensorEntry]) -> None:
    shapes = {}
    for part, ndim in _PARTS.items():
        name = f"{key}:{part}"
        if name not in tensors:
            raise FormatError(path, f"entry {key!r}: tensor {name!r} is missing")
        entry = tensors[name]
        if len(entry.shape) != ndim or not entry.dtype.is_floating_point:
            raise FormatError(path, f"tensor {name!r} must be a {ndim}-D floating-point tensor, got "
                              f"{entry.dtype}{list(entry.shape)}")
        shapes[part] = entry.shape
    rank = shapes["left"][1]
    if shapes["right"][0] != rank or shapes["sigma"][0] != rank:
        raise FormatError(path, f"entry {key!r}: factor shapes disagree: left {list(shapes['left'])} "
                                f"(d_out, r), right {list(shapes['right'])} (r, d_in), "
                                f"sigma {list(shapes['sigma'])} (r,)")


def read_subspace_file(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``({key: {left, right, sigma, entropy, total_energy, conv1d}}, metadata)``, every factor checked
    finite.

    Raises:
        FileNotFoundError: no such file.
        FormatError: see :func:`read_subspace_header`; also a factor holding NaN or inf.
    """
    path = subspace_path(path)
    header, _ = read_subspace_header(path)
    reader = SafetensorsReader([path])
    entries = {}
    for key, info in header["entries"].items():
        parts = {}
        for part in _PARTS:
            name = f"{key}:{part}"
            parts[part] = check_factor(path, name, reader.get(name)).to(map_location)
        entries[key] = {**parts, "entropy": float(info["entropy"]),
                        "total_energy": float(info["total_energy"]), "conv1d": info["conv1d"]}
    return entries, header["metadata"]


def subspace_path(path: str | os.PathLike) -> Path:
    """``path`` (``~`` expanded) if it is a file; else the ``FileNotFoundError`` every reader raises."""
    path = Path(path).expanduser()
    if not path.is_file():
        kind = " (it is a directory)" if path.is_dir() else ""
        raise FileNotFoundError(errno.ENOENT, f"no such safety subspace file{kind}", str(path))
    return path


def check_factor(path: str | os.PathLike, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, the factor ``name`` (or a block of it) read from ``path``, if it holds no NaN or inf.

    Raises:
        FormatError: naming the file and the tensor.
    """
    if not all_finite(tensor):
        raise FormatError(path, f"tensor '{name}' holds NaN or inf")
    return tensor


def write_subspace_file(
    path: str | os.PathLike,
    entries: Mapping[str, Any],
    metadata: Mapping[str, Any],
    *,
    overwrite: bool = False,
    inputs: Iterable[Any] | Any = (),
) -> Path:
    """Write ``entries`` (objects with ``left``, ``right``, ``singular_values``, ``entropy``,
    ``total_energy``, ``conv1d``) and ``metadata`` to ``path`` through the output guard.

    Args:
        overwrite: ``True`` replaces an existing file, ``False`` refuses one.
        inputs: the run's input paths; ``path`` must not be, or lie inside, any of them.

    Raises:
        FileExistsError: ``path`` exists and may not be replaced.
        NonFiniteTensorError: a factor holds NaN or inf (nothing is written).
        ValueError: a number of the header is NaN or inf.
    """
    path = Path(path).expanduser()
    tensors, layout = {}, {}
    for key, entry in entries.items():
        tensors[f"{key}:left"] = entry.left.contiguous()
        tensors[f"{key}:right"] = entry.right.contiguous()
        tensors[f"{key}:sigma"] = entry.singular_values.contiguous()
        layout[key] = {"entropy": entry.entropy, "total_energy": entry.total_energy, "conv1d": entry.conv1d}
    header = {"format": FORMAT, "version": FORMAT_VERSION, "metadata": dict(metadata), "entries": layout}
    try:
        text = json.dumps(header, allow_nan=False)
    except ValueError:
        raise ValueError(f"refusing to write {path}: a number of its metadata is NaN or inf") from None
    with guarded_output(path, inputs, overwrite=overwrite, directory=False) as staging:
        write_safetensors(staging, tensors, {"lssf": text})
    return path
