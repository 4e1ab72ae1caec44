"""Layer inputs on a calibration set, for the activation-aware safety subspace (``source="activations"``).

The paper takes the SVD of ``Z = W·X̂`` where ``X̂`` holds the normalised inputs of a layer on harmful prompts
paired with the aligned model's refusals. Only the left singular vectors and the singular values of ``Z`` are
needed, and they depend on ``X̂`` only through ``X̂ᵀX̂``: this module keeps, per layer, a small triangular
factor ``R`` with ``RᵀR = X̂ᵀX̂`` (updated by QR as batches arrive), so ``δ·Rᵀ`` stands in for ``δ·X̂ᵀ`` with
at most ``min(tokens, d_in)`` columns.

Normalisation (our choice, the paper leaves it open): every response token's input vector is scaled to unit
L2 norm, and the whole set by ``1/√T``. Unit rows stop a few high-norm tokens (attention sinks, the first
response token) from deciding the subspace alone; the ``1/√T`` keeps singular values comparable across
calibration sizes. Prompt tokens are left out: like ActSVD, we look at the tokens where the model refuses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lssf_lightning.io.names import KeyMatcher
from lssf_lightning.io.weights import ModuleStore
from lssf_lightning.metrics import generate_responses, load_prompt_pairs, load_prompts

__all__ = [
    "InputSketch",
    "calibration_factors",
    "collect_input_sketches",
    "response_token_batches",
]


class InputSketch:
    """A running triangular factor ``R`` of the (row-normalised) inputs seen by one layer."""

    def __init__(self) -> None:
        self.factor: Tensor | None = None
        self.tokens = 0

    def add(self, rows: Tensor) -> None:
        """Add input rows of shape ``(tokens, d_in)``."""
        rows = rows.detach().reshape(-1, rows.shape[-1]).to(torch.float32)
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.tokens += rows.shape[0]
        stacked = rows if self.factor is None else torch.cat([self.factor, rows])
        # Keep at most d_in rows: R of the QR of the stack has the same Gram matrix as the stack.
        self.factor = (
            stacked if stacked.shape[0] <= stacked.shape[1] else torch.linalg.qr(stacked, mode="r")[1]
        )

    def right_factor(self) -> Tensor:
        """``Rᵀ / √T`` of shape ``(d_in, k)``; ``δ @`` it has the left singular vectors/values of
        ``δ·X̂ᵀ``."""
        if self.factor is None or self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer")
        return self.factor.T / self.tokens**0.5


def response_token_batches(
    tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8, max_length: int = 256
) -> list[dict[str, Tensor]]:
    """Tokenise (prompt, response) pairs with the chat template; ``response_mask`` marks the response
    tokens."""
    batches = []
    for start in range(0, len(pairs), batch_size):
        rows, masks = [], []
        for prompt, response in pairs[start : start + batch_size]:
            prompt_ids = _prompt_ids(tokenizer, prompt)
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
            ids = (prompt_ids + response_ids)[:max_length]
            rows.append(ids)
            masks.append(([0] * len(prompt_ids) + [1] * len(response_ids))[:max_length])
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batches.append(
            {
                "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
                "response_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.bool),
            }
        )
    return batches


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(f"User: {prompt}\nAssistant:", add_special_tokens=True)["input_ids"]


@torch.inference_mode()
def collect_input_sketches(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: list[dict[str, Tensor]],
    progress: bool = True,
) -> dict[str, InputSketch]:
    """Run ``model`` over ``batches`` and sketch the inputs of each of ``modules`` at response tokens."""
    sketches = {name: InputSketch() for name in modules}
    current_mask: list[Tensor] = []

    def hook(name):
        def capture(_module, args):
            mask = current_mask[0]
            inputs = args[0]
            if inputs.shape[:2] == mask.shape:
                sketches[name].add(inputs[mask.to(inputs.device)])

        return capture

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, desc="calibration", disable=not progress, leave=False):
            current_mask[:] = [batch["response_mask"]]
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sketches


def calibration_factors(aligned_store, aligned, pairs, calibration, tokenizer, max_tokens, progress):
    """``{subspace key: Rᵀ/√T}`` for every target pair, from the aligned model's inputs at response tokens,
    and counts of what was used (``{"pairs", "tokens"}``)."""
    model, tokenizer = _calibration_model(aligned_store, aligned, tokenizer)
    prompt_pairs = _calibration_pairs(calibration, model, tokenizer, progress)
    batches = response_token_batches(tokenizer, prompt_pairs)
    if max_tokens is not None:
        batches = _limit_tokens(batches, max_tokens)
    store = ModuleStore(model)
    matcher = KeyMatcher(store.keys())
    modules = {}
    for name, (aligned_key, _) in pairs.items():
        key = matcher.match(aligned_key)
        owner = store.owner(key) if key else None
        if owner is None:
            raise ValueError(f"calibration model has no module for {name}")
        modules[name] = owner
    sketches = collect_input_sketches(model, modules, batches, progress=progress)
    info = {"pairs": len(prompt_pairs), "tokens": int(sum(b["response_mask"].sum() for b in batches))}
    return {name: sketch.right_factor() for name, sketch in sketches.items()}, info


def _calibration_model(aligned_store, aligned, tokenizer):
    if isinstance(aligned, nn.Module):
        model = aligned
    else:
        directory = getattr(aligned_store, "directory", None)
        if directory is None:
            raise ValueError(
                "source='activations' needs the aligned model as an nn.Module or a HF model directory"
            )
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if tokenizer is None:
        directory = getattr(aligned_store, "directory", None) or getattr(
            getattr(model, "config", None), "_name_or_path", None
        )
        if not directory:
            raise ValueError("source='activations' needs a tokenizer (pass tokenizer=...)")
        tokenizer = directory
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return model, tokenizer


def _calibration_pairs(calibration, model, tokenizer, progress) -> list[tuple[str, str]]:
    if calibration is None:
        items: list = load_prompts("harmful_calibration")
    elif isinstance(calibration, (str, os.PathLike)):
        items = load_prompt_pairs(str(calibration))
    else:
        items = list(calibration)
    if not items:
        raise ValueError("the calibration set is empty")
    prompts = [i if isinstance(i, str) else i[0] for i in items]
    responses = [None if isinstance(i, str) else i[1] for i in items]
    todo = [i for i, r in enumerate(responses) if not r]
    if todo:
        generated = generate_responses(
            model, tokenizer, [prompts[i] for i in todo], max_new_tokens=64, progress=progress
        )
        for i, text in zip(todo, generated):
            responses[i] = text
    return list(zip(prompts, responses))


def _limit_tokens(batches, max_tokens):
    kept, total = [], 0
    for batch in batches:
        if total >= max_tokens:
            break
        kept.append(batch)
        total += int(batch["response_mask"].sum())
    return kept
