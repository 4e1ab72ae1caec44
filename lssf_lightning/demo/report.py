"""The demo's report: ``results.json``, ``report.json``, ``results.md`` and the figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from lssf_lightning.demo.config import MODEL_NAMES
from lssf_lightning.demo.figures import plot_scores, plot_training_curves
from lssf_lightning.demo.state import Run, save_responses, score_summary
from lssf_lightning.io.guard import write_json
from lssf_lightning.plots import plot_front, plot_subspace
from lssf_lightning.selection import SweepPoint

__all__ = ["COLUMNS", "markdown_table", "plot_sweep", "report_stage"]

def markdown_table(rows: dict[str, dict], columns: Sequence[tuple[str, str]]) -> str:
    header = "| model | " + " | ".join(label for _, label in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, scores in rows.items():
        cells = [
            f"{scores[key]:.2f}" if isinstance(scores.get(key), float) and not math.isnan(scores[key])
            else "—"
            for key, _ in columns
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLUMNS = (
    ("harmful_refusal", "harmful refusal ↑ (AdvBench test)"),
    ("harmful_refusal_ood", "harmful refusal ↑ (other benchmarks)"),
    ("harmful_refusal_bundled", "harmful refusal ↑ (project set)"),
    ("harmless_refusal", "over-refusal ↓"),
    ("task_accuracy", "task accuracy ↑"),
    ("perplexity", "perplexity ↓ (general text)"),
)


def report_stage(run: Run, subspace) -> dict:
    config, log, output, report = run.config, run.log, run.output, run.report
    log.stage("6/6 report")
    names = [name for name in MODEL_NAMES if name in run.evaluations]  # "guarded": with config.guard
    results = {name: score_summary(run.evaluations[name]) for name in names}
    for name in names:
        save_responses(output, name, run.evaluations[name])
    write_json(output / "results.json", results)
    figures = {"scores": plot_scores(results, output / "scores.png", "full fine-tune"),
               "front": plot_sweep(report["sweep"], output / "front.png", "full fine-tune")}
    lora = report.get("lora")
    if lora:
        rows = {"aligned": results["aligned"], **{f"lora {k}": v for k, v in lora["scores"].items()}}
        figures["scores_lora"] = plot_scores(rows, output / "scores_lora.png", "LoRA fine-tune")
        figures["front_lora"] = plot_sweep(lora["sweep"], output / "front_lora.png", "LoRA fine-tune")
    figures["subspace"] = plot_subspace(subspace, output / "subspace_ranks.png")
    if run.curves:
        figures["training"] = plot_training_curves(run.curves, output / "training_curves.png")
    timings = log.finish()
    report.update(
        mode="quick" if run.quick else "full",
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        sizes={"test": run.test_sets.sizes(), "validation": run.val_sets.sizes(),
               "task_train": len(run.task_train)},
        aligned_validation=run.aligned_val,
        results=results,
        training_curves=run.curves,
        figures={k: str(v) for k, v in figures.items()},
        timings_s=timings,
        judge="RefusalPhraseJudge (refusal phrases near the start of the answer)",
        decoding=f"greedy, {config.eval_new_tokens} new tokens (task: 6), {config.eval_dtype} weights "
                 "(models are trained, fused and saved in float32)",
        sources=run.prompts.sources,
    )
    write_json(output / "report.json", report)
    table = markdown_table(results, COLUMNS)
    if lora:
        table += "\n\nLoRA run:\n\n" + markdown_table(
            {"aligned": results["aligned"], **{f"lora {k}": v for k, v in lora["scores"].items()}}, COLUMNS
        )
    (output / "results.md").write_text(table + "\n", encoding="utf-8")
    print("\n" + table, flush=True)
    lssf = report["lssf"]
    choice = lssf["sweep_choice"]["label"]
    found = "recommends" if lssf["reached"] else "reaches no target; its best is"
    verdict = ("the sweep's rule on validation agrees" if lssf["sweep_agrees"] else
               f"the sweep's rule on validation {found} {choice}")
    form = lssf["callback"]
    print(f"\nrealigned by the callback with {form['method']} α={form['alpha']:g}; {verdict}"
          + f"; subspace mean rank {lssf['mean_rank']:.1f}; sweep cost "
          f"{report['sweep']['cost']['seconds_per_point']:.0f} s per point", flush=True)
    print(f"done in {timings['total'] / 60:.1f} min; results in {output}", flush=True)
    return results


def plot_sweep(sweep: dict, path: Path, title: str) -> Path:
    def point(data):
        return SweepPoint.from_dict(data) if data else None

    recommended = sweep.get("recommended") or {**sweep["target_not_reached"], "point": None}
    return plot_front([point(p) for p in sweep["points"]], path, reference=point(sweep["reference"]),
                      aligned=point(sweep["aligned"]), recommended=point(recommended["point"]),
                      limits=recommended["limits"], title=f"safety–utility front on validation ({title})")
