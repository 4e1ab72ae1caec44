"""A JSONL chat ``LightningDataModule``: :class:`ChatDataModule` turns JSONL files of chat or instruction rows
into batches whose labels cover the assistant's tokens only (the model:
:mod:`lssf_lightning.lightning.module`).
It takes arguments a YAML config can express, so ``LightningCLI`` (and ``lssf-lightning fit``) can build it::

    data:
      class_path: lssf_lightning.lightning.data.ChatDataModule
      init_args: {train_file: train.jsonl, val_file: val.jsonl, max_length: 512, batch_size: 8}
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader

from lssf_lightning.io.schema import FormatError, load_json, not_utf8
from lssf_lightning.validation import check_int

__all__ = [
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "ChatDataModule",
    "encode_chat",
    "ensure_chat_template",
    "pad_batch",
    "read_chat_rows",
    "write_chat_jsonl",
]

IGNORE_INDEX = -100
"""Label value whose tokens the loss skips (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``)."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Fallback chat template (ChatML) for tokenizers that have none, e.g. base models."""


def ensure_chat_template(tokenizer) -> None:
    """Give ``tokenizer`` :data:`CHATML_TEMPLATE` (with a warning) when it has no chat template.

    The template is set on the tokenizer itself so that a tokenizer saved next to the model and the
    generation helpers see the same format the model was trained on.
    """
    if not getattr(tokenizer, "chat_template", None):
        warnings.warn(
            f"tokenizer {type(tokenizer).__name__} has no chat template; using ChatML "
            "('<|im_start|>role\\n…<|im_end|>')",
            stacklevel=2,
        )
        tokenizer.chat_template = CHATML_TEMPLATE


def read_chat_rows(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Read a JSONL file of ``{"messages": [...]}`` or ``{"prompt": ..., "response": ...}`` rows as chats.

    An instruction row becomes ``[user, assistant]`` (with a leading ``system`` turn when the row has a
    ``"system"`` field). Blank lines are skipped.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: For text that is not UTF-8, invalid JSON or a row of another shape, naming the file (and
            the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")  # newlines translated: lines split as the file iterates
    except UnicodeDecodeError as err:
        raise FormatError(path, not_utf8(err)) from None
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            record = load_json(path, line, where=f"line {number}")
            rows.append(_as_messages(record, f"{path}: line {number}"))
    if not rows:
        raise ValueError(f"chat data file {str(path)!r} has no rows")
    return rows


def _as_messages(record: Any, where: str) -> list[dict[str, str]]:
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} strings")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: the conversation has no assistant turn to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("prompt", "response")):
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
        if isinstance(record.get("system"), str):
            messages.insert(0, {"role": "system", "content": record["system"]})
        return messages
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: expected {{'messages': [...]}} or {{'prompt': ..., 'response': ...}}, "
                     f"got {keys}")


def encode_chat(
    tokenizer, messages: Sequence[Mapping[str, str]], max_length: int | None = None
) -> dict[str, list[int]]:
    """Token ids and labels for one conversation, with the loss on the assistant turns only.

    The conversation is rendered with the tokenizer's chat template piece by piece: the text each assistant
    turn adds to the rendering (its content and the template's end-of-turn marker) is labelled, everything
    else (system and user turns, role headers) gets :data:`IGNORE_INDEX`. Pieces are tokenised separately
    and concatenated, so a label boundary never falls inside a token.

    Args:
        tokenizer: A tokenizer with a chat template.
        messages: ``{"role", "content"}`` turns.
        max_length: Keep at most this many tokens (the end is cut).

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length.

    Raises:
        ValueError: If the chat template renders a conversation that does not extend its own prefix (the
            pieces cannot be separated) or the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template (see "
                         "ensure_chat_template)")
    messages = [dict(m) for m in messages]
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = _render(tokenizer, messages[:index], add_generation_prompt=True) if index else ""
            _append(tokenizer, prompt, rendered, input_ids, labels, train=False)
            rendered = prompt
        text = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        _append(tokenizer, text, rendered, input_ids, labels, train=message["role"] == "assistant")
        rendered = text
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _append(
    tokenizer, text: str, rendered: str, input_ids: list[int], labels: list[int], train: bool
) -> None:
    if not text.startswith(rendered):
        raise ValueError(
            "the chat template does not render conversations incrementally (a turn changes the text before "
            f"it): {rendered[-60:]!r} is not a prefix of {text[: len(rendered) + 20][-80:]!r}"
        )
    piece = text[len(rendered) :]
    if not piece:
        return
    ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
    input_ids.extend(ids)
    labels.extend(ids if train else [IGNORE_INDEX] * len(ids))


def pad_batch(rows: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad encoded rows into ``input_ids`` / ``attention_mask`` / ``labels`` tensors."""
    # Not transformers' DataCollatorForSeq2Seq: it gives the same batches only for a tokenizer with a pad
    # token and padding_side="right"; it raises for tokenizers without one (this pads with eos) and left-pads
    # for padding_side="left" (checked on the tiny test tokenizer), while the loss here needs right padding.
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(row["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class _Collator:
    """Picklable collate function (worker processes need one)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows):
        return pad_batch(rows, self.pad_id)


class ChatDataModule(LightningDataModule):
    """Chat fine-tuning data from JSONL files, with the loss on the assistant's tokens only.

    Each line is ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}``
    or ``{"prompt": ..., "response": ...}`` (optionally ``"system"``). Rows are rendered with the tokenizer's
    chat template (:func:`encode_chat`); rows left with no labelled token after truncation are dropped with a
    warning.

    Args:
        train_file: JSONL file of training rows.
        val_file: Optional JSONL file of validation rows.
        tokenizer: Tokenizer directory; default: the tokenizer of the LightningModule being trained
            (``trainer.lightning_module.tokenizer``, as :class:`CausalLMModule` provides).
        max_length: Tokens kept per row.
        batch_size: Rows per batch.
        num_workers: DataLoader worker processes.
        shuffle: Shuffle the training rows each epoch; epoch ``e``'s order depends on ``(seed, e)`` alone,
            so a run resumed from an epoch's checkpoint sees the same batches as the uninterrupted run.
        seed: Seed of the shuffling generator.

    Raises:
        ValueError: When no tokenizer can be found, or for malformed rows (naming file and line).
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_int("max_length", max_length)
        check_int("batch_size", batch_size)
        if train_file is None and val_file is None:
            raise ValueError("ChatDataModule needs a train_file and/or a val_file")
        built = not isinstance(tokenizer, (str, type(None)))  # a tokenizer object is not a hyperparameter
        self.save_hyperparameters(ignore=["tokenizer"] if built else None)
        self.train_file = train_file
        self.val_file = val_file
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.train_rows: list[dict[str, list[int]]] | None = None
        self.val_rows: list[dict[str, list[int]]] | None = None
        if val_file is None:
            # Lightning runs no validation loop for a datamodule whose val_dataloader is None (is_overridden).
            self.val_dataloader = None  # type: ignore[method-assign]

    def setup(self, stage: str | None = None) -> None:
        tokenizer = self._resolve_tokenizer()
        ensure_chat_template(tokenizer)
        self._pad_id = _pad_id(tokenizer)
        if self.train_file is not None and self.train_rows is None:
            self.train_rows = self._encode_file(tokenizer, self.train_file)
        if self.val_file is not None and self.val_rows is None:
            self.val_rows = self._encode_file(tokenizer, self.val_file)

    def _resolve_tokenizer(self):
        if self.tokenizer is not None and not isinstance(self.tokenizer, (str, os.PathLike)):
            return self.tokenizer
        if isinstance(self.tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(os.fspath(self.tokenizer), local_files_only=True)
            return self.tokenizer
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "ChatDataModule has no tokenizer: pass tokenizer=<dir> or train a LightningModule with a "
                "`tokenizer` attribute (e.g. CausalLMModule)"
            )
        return tokenizer

    def _encode_file(self, tokenizer, path: str) -> list[dict[str, list[int]]]:
        encoded = [encode_chat(tokenizer, messages, self.max_length) for messages in read_chat_rows(path)]
        kept = [row for row in encoded if any(label != IGNORE_INDEX for label in row["labels"])]
        if len(kept) < len(encoded):
            warnings.warn(
                f"{len(encoded) - len(kept)} of {len(encoded)} rows of {path!r} have no assistant token "
                f"within max_length={self.max_length} and are dropped",
                stacklevel=2,
            )
        if not kept:
            raise ValueError(f"no row of {path!r} has an assistant token within max_length={self.max_length}")
        return kept

    class EpochSampler(torch.utils.data.RandomSampler):
        """A random order that is a function of ``(seed, epoch)`` alone: Lightning calls :meth:`set_epoch` at
        every epoch start, also on resume, so a resumed run draws the uninterrupted run's orders. A
        ``RandomSampler``, so under DDP Lightning swaps in its ``DistributedSampler`` as before."""

        def __init__(self, rows, seed: int) -> None:
            super().__init__(rows, generator=torch.Generator())
            self.seed = seed
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            self.generator.manual_seed(self.seed + epoch)

    def _loader(self, rows, shuffle: bool) -> DataLoader:
        return DataLoader(
            rows,
            batch_size=self.batch_size,
            sampler=self.EpochSampler(rows, self.seed) if shuffle else None,
            num_workers=self.num_workers,
            collate_fn=_Collator(self._pad_id),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_rows is None:
            raise ValueError("ChatDataModule has no train_file")
        return self._loader(self.train_rows, self.shuffle)

    def val_dataloader(self) -> DataLoader:
        if self.val_rows is None:
            raise ValueError("ChatDataModule has no val_file")
        return self._loader(self.val_rows, False)


def _pad_id(tokenizer) -> int:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")
    return int(pad_id)


def write_chat_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows (``{"messages": ...}`` or ``{"prompt", "response"}``) as JSONL; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
