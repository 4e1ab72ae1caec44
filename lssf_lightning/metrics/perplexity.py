"""General language ability as perplexity on general text: the utility figure next to every safety number.

``CausalLMPerplexity`` (class) and :func:`causal_lm_perplexity` (functional) are torchmetrics' ``Perplexity``
with the causal-LM label convention of transformers: ``labels`` are the input ids, position ``t`` is predicted
from the logits at ``t − 1``, and ``-100`` marks tokens that do not count (padding). So for one batch
``causal_lm_perplexity(model(ids).logits, labels) == exp(model(ids, labels=labels).loss)``.
:func:`model_perplexity` runs a model over texts and returns the perplexity of all their tokens together.

Text sets (:func:`load_utility_texts`), loaded at run time:

* ``"bundled"`` — 32 paragraphs of everyday English prose written for this project
  (``lssf_lightning/metrics/prompts/general_text.txt``); small and fast, the callback's default.
* ``"stdlib"`` — English technical prose from the module docstrings of the Python standard library of the
  running interpreter (read with :mod:`ast`, nothing is imported), one paragraph per text, code examples
  left out. Present on every machine; no demo model is trained or tuned on it (a pre-training corpus may
  well hold it). Its numbers depend on the Python version, so compare models measured with the same one.
* a path: a ``.txt`` file of blank-line-separated paragraphs, or one of ``.jsonl``/``.json`` with a
  ``"text"`` field (or plain strings).

``split="validation"`` / ``"test"`` cut a set into two disjoint halves by a hash of each text's group (the
module for ``"stdlib"``, the paragraph otherwise): choose settings on validation, report on test.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.text import Perplexity

from lssf_lightning.validation import check_choice, check_int

__all__ = [
    "UTILITY_SOURCES",
    "CausalLMPerplexity",
    "causal_lm_perplexity",
    "load_utility_texts",
    "model_perplexity",
]

IGNORE_INDEX = -100  # transformers' label value for tokens that do not count
UTILITY_SOURCES: tuple[str, ...] = ("bundled", "stdlib")
Split = Literal["all", "validation", "test"]
_SPLITS = ("all", "validation", "test")


def _shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits at ``t − 1`` against labels at ``t``, in float32 or wider (torchmetrics refuses bfloat16)."""
    if logits.ndim != 3 or labels.ndim != 2 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"logits must be (batch, seq, vocab) and labels (batch, seq) with the same first two sizes, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits[:, :-1].to(dtype), labels[:, 1:].long()


def causal_lm_perplexity(logits: Tensor, labels: Tensor) -> Tensor:
    """``exp`` of the mean next-token negative log-likelihood over the labels that are not ``-100``.

    Args:
        logits: ``(batch, seq, vocab)`` outputs of a causal LM.
        labels: ``(batch, seq)`` token ids (the inputs themselves), ``-100`` where a token does not count.

    Example:
        >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
        >>> causal_lm_perplexity(logits, torch.tensor([[0, 1, 2]]))
        tensor(4.)
    """
    from torchmetrics.functional.text import perplexity

    return perplexity(*_shifted(logits, labels), ignore_index=IGNORE_INDEX)


class CausalLMPerplexity(Perplexity):
    r"""Perplexity of a causal LM over every counted token of every ``update``.

    .. math::
        \text{PPL} = \exp\Big(-\frac{1}{N}\sum_{t} \log p(x_t \mid x_{<t})\Big)

    ``update(logits, labels)`` takes a model's logits and its labels (``-100`` = not counted); the sums are
    reduced across processes like any torchmetrics state.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(ignore_index=IGNORE_INDEX, **kwargs)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add the next-token log-likelihoods of one batch."""
        super().update(*_shifted(logits, labels))


def _batches(
    tokenizer, texts: Sequence[str], max_length: int, batch_size: int
) -> Iterator[dict[str, Tensor]]:
    """Right-padded batches (positions must start at 0 for every text), longest texts first."""
    encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    encoded = sorted((ids for ids in encoded if len(ids) >= 2), key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, tokens in enumerate(chunk):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


def model_perplexity(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    metric: CausalLMPerplexity | None = None,
) -> float:
    """The perplexity of ``model`` on all tokens of ``texts`` together (a forward pass, no generation).

    Args:
        model: a causal LM (HF or peft) returning ``.logits``; run in eval mode without gradients.
        tokenizer: its tokenizer; each text is encoded on its own (special tokens as the tokenizer adds them)
            and truncated to ``max_length`` tokens.
        texts: the general-text set (see :func:`load_utility_texts`).
        max_length: tokens per text at most.
        batch_size: texts per forward pass.
        metric: accumulate into this metric instead of a fresh one (e.g. to reduce across processes).

    Raises:
        ValueError: if no text has two or more tokens (nothing to predict).
    """
    check_int("max_length", max_length, minimum=2)
    check_int("batch_size", batch_size)
    metric = metric if metric is not None else CausalLMPerplexity()
    device = next(model.parameters()).device
    metric = metric.to(device)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.inference_mode():
            for batch in _batches(tokenizer, list(texts), max_length, batch_size):
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                metric.update(logits, batch["labels"])
                seen += 1
    finally:
        model.train(was_training)
    if not seen:
        raise ValueError("model_perplexity got no text with at least two tokens")
    return float(metric.compute())


# -- text sets -----------------------------------------------------------------------------------------------

# Not real modules' prose: Easter eggs, the test suite, IDLE and tkinter demos, and the platform-specific
# ones.
_STDLIB_SKIP = ("this", "antigravity", "test", "idlelib", "turtledemo", "lib2to3", "pydoc_data", "__phello__")


def _paragraphs(text: str) -> list[str]:
    blocks = re.split(r"\n\s*\n", text)
    return [" ".join(line.strip() for line in block.splitlines()) for block in blocks]


def _is_prose(paragraph: str, min_chars: int) -> bool:
    """A paragraph of sentences, not code, a table or a list of names."""
    if len(paragraph) < min_chars or paragraph.lstrip().startswith((">>>", "$", "-", "*", "|", "+", "=")):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters / len(paragraph) >= 0.88 and paragraph.count(". ") + paragraph.endswith(".") >= 2


def stdlib_docstring_texts(min_chars: int = 200) -> list[tuple[str, str]]:
    """``(module, paragraph)`` for every prose paragraph of the top-level standard-library modules'
    docstrings.

    Source files are parsed with :mod:`ast`; no module is imported. Deterministic for one Python version.
    """
    import importlib.util

    out = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _STDLIB_SKIP:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None)
        if not origin or not origin.endswith(".py") or not os.path.isfile(origin):
            continue
        try:
            tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        docstring = ast.get_docstring(tree) or ""
        out.extend((name, p) for p in _paragraphs(docstring) if _is_prose(p, min_chars))
    return out


def _read_text_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
        return [p for p in _paragraphs("\n".join(lines)) if p.strip()]
    if path.suffix in (".jsonl", ".json"):
        raw = path.read_text(encoding="utf-8")
        records = [json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(raw)
        texts = [r if isinstance(r, str) else r.get("text") if isinstance(r, dict) else None for r in records]
        if any(not isinstance(t, str) for t in texts):
            raise ValueError(f"{path}: every record must be a string or an object with a string 'text' field")
        return [t for t in texts if t.strip()]
    raise ValueError(f"{path}: utility texts are read from .txt, .jsonl or .json files, got {path.suffix!r}")


def _in_split(group: str, split: str) -> bool:
    if split == "all":
        return True
    bucket = hashlib.blake2b(group.encode("utf-8"), digest_size=2).digest()[0] % 2
    return bucket == (0 if split == "validation" else 1)


def load_utility_texts(
    source: str | os.PathLike = "bundled", split: Split = "all", limit: int | None = None
) -> list[str]:
    """The general-text set ``source`` (``"bundled"``, ``"stdlib"`` or a file path), optionally one half of
    it.

    Args:
        source: see the module docstring.
        split: ``"all"``, or the disjoint ``"validation"`` / ``"test"`` half.
        limit: keep the first ``limit`` texts (in the set's fixed order).

    Raises:
        FileNotFoundError: if ``source`` is neither a bundled name nor an existing file.
        ValueError: for an unreadable file or an empty result.
    """
    check_choice("split", split, _SPLITS)
    if limit is not None:
        check_int("limit", limit)
    if source == "stdlib":
        grouped = stdlib_docstring_texts()
    elif source == "bundled":
        bundled = resources.files("lssf_lightning.metrics").joinpath("prompts", "general_text.txt")
        text = bundled.read_text("utf-8")
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        grouped = [(p, p) for p in _paragraphs("\n".join(lines)) if p.strip()]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"no utility text file {path} (bundled sets: {', '.join(UTILITY_SOURCES)})"
            )
        grouped = [(t, t) for t in _read_text_file(path)]
    texts = [text for group, text in grouped if _in_split(group, split)]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise ValueError(f"the utility text set {str(source)!r} (split {split!r}) is empty")
    return texts
