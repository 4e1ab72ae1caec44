"""A generic causal-LM fine-tuning ``LightningModule``: :class:`CausalLMModule` wraps a Hugging Face causal
LM (optionally with a peft LoRA adapter) and trains it on the loss of the labelled tokens (the data:
:mod:`lssf_lightning.lightning.data`). It takes arguments a YAML config can express::

    model:
      class_path: lssf_lightning.lightning.module.CausalLMModule
      init_args: {model: ./my-aligned-model, learning_rate: 1.0e-5, lora: {r: 16, lora_alpha: 32}}
"""

from __future__ import annotations

import copy
import inspect
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lssf_lightning.io.hub import is_hub_id, resolve_model
from lssf_lightning.lightning.data import IGNORE_INDEX
from lssf_lightning.validation import check_int, check_positive, check_range

__all__ = ["CausalLMModule"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        learning_rate = check_positive("learning_rate", learning_rate)  # a bool is refused, not read as 1
        weight_decay = check_range("weight_decay", weight_decay, 0.0, float("inf"))
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
