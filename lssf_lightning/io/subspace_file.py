"""The safety subspace file: one safetensors file, three tensors per matrix, the metadata as JSON.

Layout (format version 1, unchanged since lssf_lightning 0.1)::

    <key>:left   U'      (d_out, r)   floating point
    <key>:right  U'ᵀδ    (r, d_in)    floating point
    <key>:sigma  σ_1…σ_r (r,)         floating point
    __metadata__["lssf"] = {"format": "lssf_lightning.safety_subspace", "version": 1,
                            "metadata": {...build settings...},
                            "entries": {<key>: {"entropy": float, "total_energy": float, "conv1d": bool}}}
    __metadata__["lssf_inputs"] = {"aligned": {<key>: "(shape)|dtype|crc32"}, "unaligned": {...}}
    __metadata__["lssf_integrity"] = {"algorithm": "sha256", "metadata": <digest>,
                                      "entries": {<key>: {"layout": <digest>, "tensors": <digest>}}}

The integrity record (files without it, e.g. written by lssf_lightning 0.1, load as before) holds SHA-256
digests: of the metadata, of each entry's layout (its name, ``entropy``, ``total_energy``, ``conv1d``, and its
three tensors' names, dtypes and shapes) and of each entry's tensor bytes. ``"lssf_inputs"`` (read back as
``metadata["input_digests"]``) records the digest the fingerprint took of each input weight, so that the
models a subspace is used with can be checked weight by weight
(:func:`lssf_lightning.subspace.check_input_weight`).
The metadata and layouts are checked when the header is read, an entry's bytes when its factors are read: a
flipped flag or an edited tensor is refused with one line naming the file and the entry. It guards against
damage and edits by hand, not against someone who rewrites the record too. The ``"lssf"`` text is the same
as without it, so the fingerprint and everything 0.1 read are unchanged.

:func:`read_subspace_file` checks all of it (a violation is one :class:`~lssf_lightning.io.schema.FormatError`
naming the file and the field, never a shape error later in a matrix product) and that every factor is
finite; :func:`write_subspace_file` writes through the output guard.
"""

from __future__ import annotations

import errno
import hashlib
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
    "INTEGRITY_KEY",
    "check_entry_bytes",
    "check_factor",
    "read_subspace_file",
    "read_subspace_header",
    "subspace_path",
    "write_subspace_file",
]

FORMAT = "lssf_lightning.safety_subspace"
FORMAT_VERSION = 1
INTEGRITY_KEY = "lssf_integrity"  # the safetensors metadata key of the integrity record
INPUTS_KEY = "lssf_inputs"  # ... of the inputs' per-weight digests (metadata["input_digests"])
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
    if INPUTS_KEY in raw_metadata:
        inputs = load_json(path, raw_metadata[INPUTS_KEY], where=f"the {INPUTS_KEY!r} metadata")
        if not _input_digests_layout(inputs):
            raise FormatError(path, f"the {INPUTS_KEY!r} metadata must map 'aligned' and 'unaligned' to "
                                    "{weight: '(shape)|dtype|crc32'}")
        metadata["input_digests"] = inputs
    integrity = _read_integrity(path, raw_metadata, header, tensors)
    if integrity is not None:
        header["integrity"] = integrity
    return header, tensors


# -- the integrity record ------------------------------------------------------------------------------------
def _input_digests_layout(digests: Any) -> bool:
    """Whether ``digests`` is ``{"aligned": {name: "(shape)|dtype|crc32"}, "unaligned": {...}}``."""
    return (isinstance(digests, Mapping) and set(digests) == {"aligned", "unaligned"}
            and all(isinstance(side, Mapping) and all(isinstance(d, str) and d.count("|") == 2
                                                       for d in side.values()) for side in digests.values()))


def _digest_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _layout_digest(key: str, info: Mapping[str, Any], shapes: Mapping[str, tuple[str, list[int]]]) -> str:
    layout = {part: info.get(part) for part in ("entropy", "total_energy", "conv1d")}
    return _digest_json([key, layout, {f"{key}:{part}": list(shapes[part]) for part in _PARTS}])


def _tensor_layout(tensors: Mapping[str, Any], key: str) -> dict[str, tuple[str, list[int]]]:
    return {part: (str(tensors[f"{key}:{part}"].dtype), list(tensors[f"{key}:{part}"].shape))
            for part in _PARTS}


def tensors_digest(parts: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the bytes of ``parts`` (an entry's left, right, sigma) as the file stores them."""
    digest = hashlib.sha256()
    for tensor in parts:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _integrity(metadata: Mapping[str, Any], layout: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]):
    entries = {
        key: {"layout": _layout_digest(key, info, _tensor_layout(tensors, key)),
              "tensors": tensors_digest(tensors[f"{key}:{part}"] for part in _PARTS)}
        for key, info in layout.items()
    }
    return {"algorithm": "sha256", "metadata": _digest_json(dict(metadata)), "entries": entries}


def _read_integrity(path: Path, raw_metadata: Mapping[str, str], header: Mapping[str, Any],
                    tensors: Mapping[str, TensorEntry]) -> dict[str, Any] | None:
    """The checked integrity record (``None`` for a file without one): the metadata and every entry's layout
    must match their digests; the tensor digests are returned for :func:`check_entry_bytes`."""
    if INTEGRITY_KEY not in raw_metadata:
        return None
    record = load_json(path, raw_metadata[INTEGRITY_KEY], where=f"the {INTEGRITY_KEY!r} metadata")
    if field(path, record, "algorithm", str, where=INTEGRITY_KEY) != "sha256":
        raise FormatError(path, f"{INTEGRITY_KEY}: unknown algorithm {record['algorithm']!r}")
    if field(path, record, "metadata", str, where=INTEGRITY_KEY) != _digest_json(header["metadata"]):
        raise FormatError(path, "the subspace's metadata does not match its integrity hash (the file was "
                                "edited or damaged)")
    digests = field(path, record, "entries", dict, where=INTEGRITY_KEY)
    for key in sorted(set(digests) ^ set(header["entries"])):
        state = "is missing from the file" if key in digests else "has no integrity hash"
        raise FormatError(path, f"entry {key!r} {state} (the file was edited or damaged)")
    for key, info in header["entries"].items():
        where = f"{INTEGRITY_KEY} entry {key!r}"
        record = field(path, digests, key, dict, where=f"{INTEGRITY_KEY} entries")
        field(path, record, "tensors", str, where=where)
        layout = _layout_digest(key, info, _tensor_layout(tensors, key))
        if field(path, record, "layout", str, where=where) != layout:
            raise FormatError(path, f"entry {key!r} does not match its integrity hash: its 'conv1d', "
                                    "'entropy', 'total_energy' or a tensor's dtype or shape was edited")
    return {key: digests[key]["tensors"] for key in header["entries"]}


def check_entry_bytes(path: str | os.PathLike, header: Mapping[str, Any], key: str,
                      parts: Iterable[torch.Tensor]) -> None:
    """Check the bytes of entry ``key``'s tensors (``parts``: left, right, sigma, as read from ``path``)
    against the integrity record of ``header`` (nothing to check in a file without one).

    Raises:
        FormatError: naming the file and the entry.
    """
    expected = header.get("integrity", {}).get(key)  # ``parts`` may be a generator: read only if needed
    if expected is not None and tensors_digest(parts) != expected:
        raise FormatError(path, f"entry {key!r}: the factors' bytes do not match the integrity hash (the "
                                "file was edited or damaged)")


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
            parts[part] = check_factor(path, name, reader.get(name))
        check_entry_bytes(path, header, key, parts.values())
        parts = {part: tensor.to(map_location) for part, tensor in parts.items()}
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
    digests = metadata.get("input_digests")
    own_key = _input_digests_layout(digests)  # as the builder records them: their own key (see above)
    settings = {k: v for k, v in metadata.items() if not (own_key and k == "input_digests")}
    header = {"format": FORMAT, "version": FORMAT_VERSION, "metadata": settings, "entries": layout}
    try:
        text = json.dumps(header, allow_nan=False)
    except ValueError:
        raise ValueError(f"refusing to write {path}: a number of its metadata is NaN or inf") from None
    records = {"lssf": text}
    if own_key:
        records[INPUTS_KEY] = json.dumps(digests)
    # the digest of the metadata as it reads back (JSON types, the input digests merged in)
    read_back = {**json.loads(text)["metadata"], **({"input_digests": digests} if own_key else {})}
    records[INTEGRITY_KEY] = json.dumps(_integrity(read_back, layout, tensors))
    with guarded_output(path, inputs, overwrite=overwrite, directory=False) as staging:
        write_safetensors(staging, tensors, records)
    return path
