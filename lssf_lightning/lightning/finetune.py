"""A generic causal-LM fine-tuning ``LightningModule`` and a JSONL chat ``LightningDataModule``.

:class:`CausalLMModule` wraps a Hugging Face causal LM (optionally with a peft LoRA adapter) and trains it on
the loss of the labelled tokens; :class:`ChatDataModule` turns JSONL files of chat or instruction rows into
batches whose labels cover the assistant's tokens only. Both take arguments a YAML config can express, so
``LightningCLI`` (and the ``lssf-lightning`` CLI) can build them::

    model:
      class_path: lssf_lightning.lightning.finetune.CausalLMModule
      init_args: {model: ./my-aligned-model, learning_rate: 1.0e-5, lora: {r: 16, lora_alpha: 32}}
    data:
      class_path: lssf_lightning.lightning.finetune.ChatDataModule
      init_args: {train_file: train.jsonl, val_file: val.jsonl, max_length: 512, batch_size: 8}
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lssf_lightning.io.hub import is_hub_id, resolve_model
from lssf_lightning.io.schema import FormatError, load_json, not_utf8
from lssf_lightning.validation import check_int

__all__ = [
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "CausalLMModule",
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

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


# -- the LightningModule -------------------------------------------------------------------------------------


class CausalLMModule(LightningModule):
    """Fine-tune a Hugging Face causal language model, fully or with a peft LoRA adapter.

    The loss is the model's own next-token cross-entropy over the labelled tokens (labels equal to
    :data:`IGNORE_INDEX` are skipped), so the data decides what is learned: :class:`ChatDataModule` labels the
    assistant's tokens only.

    Args:
        model: A local HF model directory or a hub ID (``org/name[@revision]``, resolved through the Hugging
            Face cache by :func:`~lssf_lightning.io.hub.resolve_model`), loaded with
            ``AutoModelForCausalLM.from_pretrained``; or, from Python, an already-built ``PreTrainedModel``
            (used as is, not copied).
        tokenizer: Tokenizer directory or hub ID; default: ``model`` (directory or ID), else the tokenizer
            saved next to the built model (``model.name_or_path``) when there is one. Available as
            ``self.tokenizer`` (``None`` when none can be found).
        lora: ``peft.LoraConfig`` keyword arguments (e.g. ``{"r": 16, "lora_alpha": 32, "target_modules":
            ["q_proj", "v_proj"]}``); ``None`` trains the full model. ``task_type`` defaults to ``CAUSAL_LM``.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up from 0 over this many optimizer steps (then constant).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the weights when loading from a directory.
        freeze: Regular expressions; parameters whose name matches one (``re.search``) are not trained, e.g.
            ``["embed_tokens", "lm_head"]``. Applied before LoRA is added (LoRA freezes the rest anyway).
        gradient_checkpointing: Trade compute for memory with the model's gradient checkpointing.

    Attributes:
        model: The HF model (a ``PeftModel`` around it with ``lora``).
        tokenizer: The tokenizer, or ``None``.

    Example::

        module = CausalLMModule("path/to/aligned", learning_rate=2e-5, lora={"r": 8, "lora_alpha": 16})
        trainer = Trainer(max_steps=100, callbacks=[LSSFCallback(unaligned="path/to/base")])
        trainer.fit(module, datamodule=ChatDataModule("train.jsonl", batch_size=8))
        module.save_hf("out/finetuned")
    """

    def __init__(
        self,
        model: str | nn.Module,
        tokenizer: str | None = None,
        lora: dict[str, Any] | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        dtype: str = "float32",
        freeze: list[str] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        check_int("warmup_steps", warmup_steps, minimum=0)
        if lora is not None and not isinstance(lora, Mapping):
            raise ValueError(f"lora must be a mapping of peft.LoraConfig arguments or None, got {lora!r}")
        # Built objects (a model or tokenizer passed from Python) are not hyperparameters a checkpoint should
        # pickle.
        built = [name for name, value in (("model", model), ("tokenizer", tokenizer))
                 if value is not None and not isinstance(value, (str, os.PathLike))]
        self.save_hyperparameters(ignore=built or None)
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        self.warmup_steps = warmup_steps
        self.lora = dict(lora) if lora is not None else None

        hf_model = _load_model(model, _DTYPES[dtype])
        self.tokenizer = _load_tokenizer(tokenizer, model, hf_model)
        _freeze(hf_model, freeze or [])
        if gradient_checkpointing:
            hf_model.gradient_checkpointing_enable()
            hf_model.config.use_cache = False
        self.model = _add_lora(hf_model, self.lora) if self.lora is not None else hf_model
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps the mode it finds

    # -- training ------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        input_ids, attention_mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
        if not self._keeps_logits:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        # Project to the vocabulary only where some row has a label: chat data labels a small share of the
        # tokens, and the vocabulary projection is a large part of a small model's compute. Same loss as the
        # model's own (mean next-token cross-entropy over labelled tokens).
        targets = labels[:, 1:]
        positions = torch.nonzero((targets != IGNORE_INDEX).any(dim=0)).squeeze(1)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            logits_to_keep=positions).logits
        return nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets[:, positions].reshape(-1),
            ignore_index=IGNORE_INDEX,
        )

    @property
    def _keeps_logits(self) -> bool:
        """Whether the HF model's ``forward`` accepts ``logits_to_keep`` as a tensor of positions."""
        if not hasattr(self, "_keeps_logits_cache"):
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self._keeps_logits_cache = "logits_to_keep" in inspect.signature(base.forward).parameters
        return self._keeps_logits_cache

    def configure_optimizers(self):
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError("the model has no trainable parameters (check `freeze` and `lora`)")
        optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
        if self.warmup_steps == 0:
            return optimizer
        warmup = self.warmup_steps
        # Not transformers' get_constant_schedule_with_warmup: its first step has lr 0 (step/warmup), this one
        # (step+1)/warmup, so switching would change every learning rate of the warm-up (checked for
        # warmup=3).
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- export --------------------------------------------------------------------------------------------
    def merged_model(self) -> nn.Module:
        """The plain HF model with any LoRA adapter merged in (a copy when there is an adapter)."""
        if self.lora is None:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()

    def save_hf(self, directory: str | os.PathLike, merge_lora: bool = True) -> Path:
        """Write the model (LoRA merged in, unless ``merge_lora=False``: then the adapter only) and the
        tokenizer to ``directory`` with ``save_pretrained``; returns the directory."""
        directory = Path(directory)
        model = self.merged_model() if merge_lora else self.model
        model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return directory


def _load_model(model: str | nn.Module, dtype: torch.dtype) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    model = resolve_model(model, what="model") if isinstance(model, str) else model  # org/name: io/hub.py
    if not isinstance(model, (str, os.PathLike)) or not Path(model).is_dir():
        raise ValueError("model must be a local Hugging Face model directory, a hub ID or a built model, "
                         f"got {model!r}")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.fspath(model), dtype=dtype, local_files_only=True)


def _load_tokenizer(tokenizer, model, hf_model):
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    candidates = [tokenizer] if tokenizer is not None else [model, getattr(hf_model, "name_or_path", None)]
    candidates = [resolve_model(c, what="tokenizer", weights=False) if is_hub_id(c) else c
                  for c in candidates]
    for candidate in candidates:
        if isinstance(candidate, (str, os.PathLike)) and Path(candidate).is_dir():
            try:
                return AutoTokenizer.from_pretrained(os.fspath(candidate), local_files_only=True)
            except (OSError, ValueError):
                if tokenizer is not None:
                    raise
    if tokenizer is not None:
        raise ValueError(f"tokenizer must be a local tokenizer directory, got {tokenizer!r}")
    return None


def _freeze(model: nn.Module, patterns: Sequence[str]) -> None:
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = [re.compile(p) for p in patterns]
    unused = set(patterns)
    for name, parameter in model.named_parameters():
        for pattern in compiled:
            if pattern.search(name):
                parameter.requires_grad_(False)
                unused.discard(pattern.pattern)
    if unused:
        raise ValueError(f"freeze patterns {sorted(unused)} match no parameter name")


def _add_lora(model: nn.Module, lora: dict[str, Any]) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("lora=... needs peft: pip install 'lssf-lightning[peft]'") from err
    config = LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
    return get_peft_model(model, config)


# -- data ----------------------------------------------------------------------------------------------------


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
