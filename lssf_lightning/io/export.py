"""Hugging Face model directories, written through the output guard: checked, staged, committed atomically.

An interrupted or failed run leaves the destination as it was (absent, or the previous version when
overwriting) and no staging directory; see :mod:`lssf_lightning.io.guard` for the rules.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from lssf_lightning.core.checks import all_finite
from lssf_lightning.io.guard import guarded_output, looks_like_model_directory
from lssf_lightning.io.layout import MAX_SHARD_BYTES, SUPPORT_FILES
from lssf_lightning.io.shards import NonFiniteTensorError, ShardedWriter

__all__ = ["atomic_directory", "copy_support_files", "write_model_directory"]

@contextlib.contextmanager
def atomic_directory(
    destination: str | os.PathLike,
    overwrite: bool = False,
    *,
    inputs: Iterable[Any] | Any = (),
    replaceable: Callable[[Path], str | None] | None = looks_like_model_directory,
) -> Iterator[Path]:
    """Yield a fresh staging directory that becomes ``destination`` when the block succeeds.

    The guard of :func:`lssf_lightning.io.guard.guarded_output`: ``destination`` must not overlap ``inputs``;
    an existing one is replaced only with ``overwrite`` (and only if it holds model files, see
    ``replaceable``), and only if it is unchanged at commit; a concurrent writer fails.

    Raises:
        FileExistsError: ``destination`` exists and ``overwrite`` is false, it changed meanwhile, or another
            run is writing it.
        lssf_lightning.io.guard.OutputOverlapError: ``destination`` is, contains or lies inside an input.
    """
    with guarded_output(destination, inputs, overwrite=overwrite, directory=True,
                        replaceable=replaceable) as staging:
        yield staging


def copy_support_files(
    sources: Sequence[str | os.PathLike | None], destination: str | os.PathLike
) -> list[str]:
    """Copy config/tokenizer files into ``destination``, each from the first source directory that has it."""
    copied = []
    for name in SUPPORT_FILES:
        for source in sources:
            if source is None:
                continue
            candidate = Path(source) / name
            if candidate.is_file():
                shutil.copy2(candidate, Path(destination) / name)
                copied.append(name)
                break
    return copied


def write_model_directory(
    store,
    output: str | os.PathLike,
    *,
    edits: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    names: Mapping[str, str] | None = None,
    write_support_files: Callable[[Path], object] | None = None,
    max_shard_bytes: int | str = MAX_SHARD_BYTES,
    overwrite: bool = False,
    inputs: Iterable[Any] | Any = (),
    progress: bool = True,
) -> int:
    """Stream every tensor of ``store`` (edited where ``edits`` says) into a new model directory, atomically.

    Args:
        store: a :class:`~lssf_lightning.io.weights.WeightStore`; its keys give the order.
        output: the directory to create (or replace, with ``overwrite``).
        edits: ``{key: function}`` applied to the tensor of ``key`` before it is written.
        names: ``{key: name}`` renames keys in the output (others keep their key; ``None`` drops the key).
        write_support_files: called with the staging directory to add config/tokenizer files.
        max_shard_bytes: shard size, bytes or a size string (``"2GB"``, ``"2GiB"``).
        overwrite: replace an existing ``output``.
        inputs: the paths the run reads (model directories, shard files, subspace, adapter, calibration file):
            ``output`` must not be, contain or lie inside any of them.
        progress: show a progress bar (bytes).

    Returns:
        The number of tensors written.

    Raises:
        NonFiniteTensorError: a tensor to be written holds NaN or inf (nothing is left behind); the message
            says whether the input or the edit holds it.
        FileExistsError, lssf_lightning.io.guard.OutputOverlapError: see :func:`atomic_directory`.
    """
    keys = _output_keys(store, names or {})
    plan = [(name, store.dtype(k), tuple(store.shape(k))) for name, k in keys.items()]
    with atomic_directory(output, overwrite=overwrite, inputs=inputs) as staging:
        writer = ShardedWriter(staging, plan, max_shard_bytes)
        try:
            _stream(store, writer, keys, edits or {}, output, progress)
            writer.finish()
        finally:
            writer.close()
        if write_support_files is not None:
            write_support_files(staging)
    return len(plan)


def _output_keys(store, names: Mapping[str, str | None]) -> dict[str, str]:
    """``{output name: store key}`` of the tensors to write (``names`` renames; ``None`` drops a key)."""
    kept = [k for k in store.keys() if names.get(k, k) is not None]  # noqa: SIM118 - a store, not a dict
    keys = {names.get(k, k): k for k in kept}
    if len(keys) < len(kept):
        clash = next(n for n in keys if sum(names.get(k, k) == n for k in kept) > 1)
        raise ValueError(f"{store.location}: several tensors would be written as {clash!r}")
    return keys


def _stream(store, writer: ShardedWriter, keys: Mapping[str, str], edits: Mapping[str, Callable],
            output: str | os.PathLike, progress: bool) -> None:
    """Read, edit and write each tensor in ``writer.order``, one at a time (only one is ever in memory)."""
    bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="writing", disable=not progress)
    with bar:
        for name in writer.order:
            key = keys[name]
            raw = store.get(key)
            tensor = edits[key](raw) if key in edits else raw
            tensor = tensor.to(store.dtype(key))
            try:
                writer.write(name, tensor)
            except NonFiniteTensorError:
                culprit = f"the input {store.location} holds" if not all_finite(raw) else (
                    "its edit produced (the input is finite)")
                raise NonFiniteTensorError(
                    f"tensor {key}: {culprit} NaN or inf; nothing was written to {output}") from None
            bar.update(tensor.numel() * tensor.element_size())
            del tensor, raw
