"""The files of a model directory on disk: which ones are pickles (never opened), and how big the
safetensors shards written by the package get (the support files that travel with the weights:
``io.guard.SUPPORT_FILES``)."""

from __future__ import annotations

__all__ = ["MAX_SHARD_BYTES", "PICKLE_SUFFIXES"]

MAX_SHARD_BYTES = 2 * 2**30
"""Default size of the shards written by ``realign`` and the exports (2 GiB), for the CLI and Python alike."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight files in pickle formats: recognised so they can be refused by name, never unpickled."""
