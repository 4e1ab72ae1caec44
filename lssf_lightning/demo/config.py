"""The demo's settings: :class:`DemoConfig` (full and quick), the models it compares, and its sweep grids."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from lssf_lightning.config import SubspaceConfig
from lssf_lightning.demo.assets import SplitSizes
from lssf_lightning.sweep import SweepGrid

__all__ = ["FULL_GRID", "LORA_GRID", "MODEL_NAMES", "QUICK_GRID", "SAVED_MODELS", "DemoConfig"]

MODEL_NAMES = ("base", "aligned", "finetuned", "realigned", "guarded", "lssf_paper", "resta")
SAVED_MODELS = ("base", "aligned", "finetuned", "realigned", "guarded", "resta")  # written under models/
ALIGN_VERSION = 2  # bump when the alignment recipe changes, to invalidate cached aligned models
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# The sweeps (validation only). Every LSSF point uses the callback's subspace (η 0.8). On the full demo's
# validation split the rule picks the reset form with α 2 (the aligned model's refusal, 0.83, at +2.7 %
# perplexity); the paper's additive form (α 1) reaches it at +34 %, RESTA (β 1) too (README, demo section);
# they stay in the grid for the front.
FULL_GRID = SweepGrid(
    subspaces=(SubspaceConfig(eta=0.8),),
    points={
        "lssf": ((0.5,), (1.0,)),
        "lssf-reset": ((1.0, 0.0), (1.0, 0.15), (2.0, 0.0)),
        "lssf-two-sided": ((1.0, 0.5), (1.0, 1.0)),
        "resta": ((0.5, 0.0), (1.0, 0.0), (1.0, 0.9)),
    },
)
QUICK_GRID = SweepGrid(subspaces=(SubspaceConfig(eta=0.8),),
                       points={"lssf": ((1.0,),), "lssf-reset": ((2.0,),), "lssf-two-sided": ((1.0, 0.5),)})
LORA_GRID = SweepGrid(subspaces=(SubspaceConfig(eta=0.8),),
                      points={"lssf": ((0.5,), (1.0,)), "lssf-reset": ((2.0,),),
                              "lssf-two-sided": ((1.0, 0.5),), "safelora": ((0.5,),)})


@dataclass
class DemoConfig:
    """Every setting of the demo. :meth:`full` and :meth:`quick` are the two presets.

    The LSSF settings (``eta``, ``alpha_1``, ``source``, the callback's ``method`` and ``method_alpha``, the
    sweep ``grid``, the refusal target and the utility budget) were chosen on the validation split; see
    docs/demo.md. The realigned model is the fine-tune's own :class:`~lssf_lightning.LSSFCallback` export
    with ``method`` at ``method_alpha``; the sweep scores ``grid`` on validation beside it and the report says
    whether its rule agrees. ``alpha`` set to a number makes the callback fuse the paper's additive form with
    that ``α`` instead. ``guard``: a second fine-tune with the per-step guard (``method`` at ``α = 1`` after
    every ``guard_every`` optimizer steps). ``curve_every``: the training curves' interval (steps).
    """

    sizes: SplitSizes = field(default_factory=lambda: SplitSizes(
        val_harmful=32, val_harmless=32, val_ood_harmful=32,
        test_harmful=64, test_harmless=64, test_ood_harmful=64,
    ))
    task_train: int = 384
    task_val: int = 24
    task_test: int = 48
    # alignment (cached)
    align_steps: int = 60
    align_lr: float = 3e-5
    align_batch_size: int = 8
    answer_tokens: int = 48
    # downstream fine-tune
    finetune_steps: int = 48
    finetune_lr: float = 3e-5
    finetune_batch_size: int = 8
    lora: bool = True
    lora_steps: int = 48
    lora_lr: float = 2e-4
    lora_rank: int = 16
    # the LoRA run's realignment as adapters: the combined adapter (task rank 16 + the correction's rank) is
    # also evaluated at these rank caps (32: one of vLLM's max_lora_rank choices; 24: 8 left for the fix)
    adapter_rank_caps: tuple[int, ...] = (32, 24)
    precision: str = "bf16-mixed"
    # LSSF
    eta: float = 0.8
    alpha_1: float = 1.0
    source: str = "weights"
    alpha: float | str = "auto"
    method: str = "lssf-reset"
    method_alpha: float = 2.0
    guard: bool = True
    guard_every: int = 1
    curve_every: int = 12
    grid: SweepGrid = field(default_factory=lambda: FULL_GRID)
    lora_grid: SweepGrid = field(default_factory=lambda: LORA_GRID)
    alpha_target_margin: float = 0.05
    max_accuracy_drop: float = 0.02
    max_over_refusal_margin: float = 0.05
    max_perplexity_increase: float = 0.05
    paper_alpha: float = 1.0
    resta_beta: float = 1.0
    # evaluation
    eval_new_tokens: int = 16
    eval_batch_size: int = 32
    eval_dtype: str = "bfloat16"
    utility_texts: str = "stdlib"
    seed: int = 0
    threads: int | None = None
    save_models: bool = True

    @classmethod
    def full(cls, **overrides: Any) -> DemoConfig:
        return replace(cls(), **overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        quick = cls(
            sizes=SplitSizes(align_harmful=48, align_harmless=80, val_harmful=24, val_harmless=24,
                             test_harmful=32, test_harmless=32, test_ood_harmful=32, val_ood_harmful=0),
            task_train=192, task_val=24, task_test=32,
            align_steps=24, align_lr=5e-5, answer_tokens=40,
            finetune_steps=24, finetune_lr=3e-5,
            lora=False,
            grid=QUICK_GRID,
            eval_new_tokens=12,
            curve_every=8,
        )
        return replace(quick, **overrides)

    def align_key(self) -> str:
        """Content key of the aligned model: everything that changes it."""
        parts = {
            "version": ALIGN_VERSION, "steps": self.align_steps, "lr": self.align_lr,
            "batch_size": self.align_batch_size, "answer_tokens": self.answer_tokens, "seed": self.seed,
            "harmful": self.sizes.align_harmful, "harmless": self.sizes.align_harmless,
            "precision": self.precision,
        }
        return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=6).hexdigest()
