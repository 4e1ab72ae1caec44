"""Finding the Hugging Face model and tokenizer inside a LightningModule (shared by the LSSF callbacks)."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule
from torch import nn

from lssf_lightning.io.hub import is_hub_id, resolve_model

__all__ = ["find_tokenizer", "hf_model", "hf_model_attribute"]


def _is_causal_lm(module: nn.Module) -> bool:
    return hasattr(module, "generate") and hasattr(module, "config")


def hf_model_attribute(
    pl_module: LightningModule, attribute: str | None = None, owner: str = "LSSFCallback"
) -> str:
    """The attribute of ``pl_module`` holding the HF causal LM: ``attribute`` (checked) or the only
    candidate."""
    if attribute:
        if not isinstance(getattr(pl_module, attribute, None), nn.Module):
            raise MisconfigurationException(
                f"`model_attribute={attribute!r}`: {type(pl_module).__name__} has no such module"
            )
        return attribute
    candidates = [name for name, child in pl_module.named_children() if _is_causal_lm(child)]
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(candidates)
        raise MisconfigurationException(
            f"{owner} could not tell which attribute of {type(pl_module).__name__} holds the HF model "
            f"(candidates: {found}); pass `model_attribute=`."
        )
    return candidates[0]


def hf_model(
    pl_module: LightningModule, attribute: str | None = None, owner: str = "LSSFCallback"
) -> nn.Module:
    """The HF causal LM inside ``pl_module`` (see :func:`hf_model_attribute`)."""
    return getattr(pl_module, hf_model_attribute(pl_module, attribute, owner))


def find_tokenizer(
    pl_module: LightningModule,
    path: str | os.PathLike | None = None,
    fallback_dir: str | os.PathLike | None = None,
    required: bool = True,
    owner: str = "LSSFCallback",
):
    """``path``'s tokenizer, else ``pl_module.tokenizer``, else the one saved in ``fallback_dir``; ``None``
    (or an error when ``required``) when there is none."""
    from transformers import AutoTokenizer

    if path is not None:
        return AutoTokenizer.from_pretrained(resolve_model(path, what="tokenizer", weights=False))
    if getattr(pl_module, "tokenizer", None) is not None:
        return pl_module.tokenizer
    if is_hub_id(fallback_dir):
        fallback_dir = resolve_model(fallback_dir, what="tokenizer", weights=False)
    saved = Path(fallback_dir) if fallback_dir is not None else None
    if saved is not None and saved.is_dir() and any(saved.glob("tokenizer*")):
        return AutoTokenizer.from_pretrained(fallback_dir)
    if required:
        raise MisconfigurationException(
            f"{owner} needs a tokenizer for the refusal monitor / calibration: pass `tokenizer=` or give the "
            "LightningModule a `tokenizer` attribute."
        )
    return None
