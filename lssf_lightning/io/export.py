"""Atomic Hugging Face model directories: everything is written into a temporary sibling, renamed at the end.

An interrupted run leaves the destination as it was (absent, or the previous version when overwriting).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["SUPPORT_FILES", "atomic_directory", "copy_support_files"]

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
