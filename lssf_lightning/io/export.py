"""Atomic Hugging Face model directories: everything is written into a temporary sibling, renamed at the end.

An interrupted run leaves the destination as it was (absent, or the previous version when overwriting).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lssf_lightning.core.checks import all_finite
from lssf_lightning.io.shards import ShardedWriter

__all__ = ["SUPPORT_FILES", "atomic_directory", "copy_support_files", "write_model_directory"]

# Files a model directory needs besides its weights: config, generation defaults, tokenizer, chat template.
SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``destination`` when the block succeeds.

    Raises:
        FileExistsError: ``destination`` exists and ``overwrite`` is false.
    """
    destination = Path(destination).expanduser().resolve()
    if destination.exists() and not overwrite:
        raise FileExistsError(f"output {destination} already exists (pass overwrite / --overwrite to replace it)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
        if destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
            os.replace(destination, retired / destination.name)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def copy_support_files(sources: Sequence[str | os.PathLike | None], destination: str | os.PathLike) -> list[str]:
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
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    progress: bool = True,
) -> int:
    """Stream every tensor of ``store`` (edited where ``edits`` says) into a new model directory, atomically.

    Args:
        store: a :class:`~lssf_lightning.io.weights.WeightStore`; its keys give the order.
        output: the directory to create (or replace, with ``overwrite``).
        edits: ``{key: function}`` applied to the tensor of ``key`` before it is written.
        names: ``{key: name}`` renames keys in the output (others keep their key; ``None`` drops the key).
        write_support_files: called with the staging directory to add config/tokenizer files.
        max_shard_bytes: shard size.
        overwrite: replace an existing ``output``.
        progress: show a progress bar (bytes).

    Returns:
        The number of tensors written.

    Raises:
        ValueError: a tensor holds NaN or inf (nothing is left behind).
    """
    edits = edits or {}
    names = names or {}
    keys = [k for k in store.keys() if names.get(k, k) is not None]
    plan = [(names.get(k, k), store.dtype(k), tuple(store.shape(k))) for k in keys]
    total_bytes = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in plan)
    with atomic_directory(output, overwrite=overwrite) as staging:
        writer = ShardedWriter(staging, plan, max_shard_bytes)
        try:
            with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="writing", disable=not progress) as bar:
                for key, (name, dtype, shape) in zip(keys, plan):
                    tensor = store.get(key)
                    if not all_finite(tensor):
                        raise ValueError(f"{store.location}: tensor {key} holds NaN or inf")
                    if key in edits:
                        tensor = edits[key](tensor)
                    writer.write(name, tensor.to(dtype))
                    bar.update(math.prod(shape) * dtype.itemsize)
                    del tensor
            writer.finish()
        finally:
            writer.close()
        if write_support_files is not None:
            write_support_files(staging)
    return len(plan)
