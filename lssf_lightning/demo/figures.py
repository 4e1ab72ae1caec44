"""The demo's PNG figures (matplotlib, Agg backend): scores per model, and the training curves.

The safety–utility front is :func:`lssf_lightning.plots.plot_front`.

The per-layer rank/entropy figure of the safety subspace is :func:`lssf_lightning.plots.plot_subspace`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lssf_lightning.plots import pyplot

__all__ = ["plot_scores", "plot_training_curves"]

_METRICS = (
    ("harmful_refusal", "harmful refusal (AdvBench test)"),
    ("harmful_refusal_ood", "harmful refusal (other benchmarks)"),
    ("harmless_refusal", "over-refusal (harmless)"),
    ("task_accuracy", "task accuracy"),
)


def plot_scores(results: Mapping[str, Mapping[str, float]], path: str | os.PathLike, title: str = "") -> Path:
    """Grouped bars: one group per model, one bar per metric present in the results."""
    plt = pyplot()
    names = list(results)
    metrics = [(key, label) for key, label in _METRICS if any(key in results[n] for n in names)]
    width = 0.8 / max(len(metrics), 1)
    figure, axis = plt.subplots(figsize=(max(7.0, 1.3 * len(names) + 2), 4.2))
    for index, (key, label) in enumerate(metrics):
        values = [results[n].get(key, float("nan")) for n in names]
        positions = [i + (index - (len(metrics) - 1) / 2) * width for i in range(len(names))]
        bars = axis.bar(positions, values, width, label=label)
        axis.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    axis.set_xticks(range(len(names)), names, rotation=15)
    axis.set_ylim(0, 1.1)
    axis.set_ylabel("rate")
    axis.set_title(title or "refusal and task accuracy per model")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return _save(figure, plt, path)


def plot_training_curves(curves: Mapping[str, list[Mapping[str, float]]], path: str | os.PathLike) -> Path:
    """Three panels over the optimizer steps of each run: harmful refusal raw (solid) and realigned
    (dashed), perplexity raw and realigned, and the share of the update since fit start inside the safety
    subspace."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    panels = (("refusal_rate", "harmful refusal (validation)"), ("perplexity", "perplexity (general text)"),
              ("update_in_subspace", "share of the update inside the subspace"))
    for axis, (key, label) in zip(axes, panels):
        for index, (run, rows) in enumerate(curves.items()):
            colour = plt.cm.tab10(index % 10)
            for suffix, style in (("", "-"), ("_realigned", "--")):
                points = [(r["step"], r[key + suffix]) for r in rows if key + suffix in r]
                if points:
                    steps, values = zip(*points)
                    name = f"{run}{' realigned' if suffix else ''}"
                    axis.plot(steps, values, style, color=colour, marker="o", markersize=3, label=name)
        axis.set_xlabel("optimizer step")
        axis.set_title(label, fontsize=9)
        axis.grid(alpha=0.3)
    axes[0].set_ylim(-0.03, 1.03)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, plt, path)


def _save(figure, plt, path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
