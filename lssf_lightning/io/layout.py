"""The files of a model directory on disk: which ones travel with the weights, which ones are pickles
(never opened), and how big the safetensors shards written by the package get."""

from __future__ import annotations

__all__ = ["MAX_SHARD_BYTES", "PICKLE_SUFFIXES", "SUPPORT_FILES"]

MAX_SHARD_BYTES = 2 * 2**30
"""Default size of the shards written by ``realign`` and the exports (2 GiB), for the CLI and Python alike."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight files in pickle formats: recognised so they can be refused by name, never unpickled."""

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
