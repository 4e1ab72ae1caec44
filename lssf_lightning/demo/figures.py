"""The demo's PNG figures (matplotlib, Agg backend): scores per model and the refusal/accuracy curve over α.

The per-layer rank/entropy figure of the safety subspace is :func:`lssf_lightning.plots.plot_subspace`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_alpha_curve", "plot_scores"]

_METRICS = (
    ("harmful_refusal", "harmful refusal (AdvBench test)"),
    ("harmful_refusal_ood", "harmful refusal (other benchmarks)"),
    ("harmless_refusal", "over-refusal (harmless)"),
    ("task_accuracy", "task accuracy"),
)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the demo's figures need matplotlib: pip install matplotlib") from err
    return plt


def plot_scores(results: Mapping[str, Mapping[str, float]], path: str | os.PathLike, title: str = "") -> Path:
    """Grouped bars: one group per model, one bar per metric present in the results."""
    plt = _pyplot()
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


def plot_alpha_curve(
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | os.PathLike,
    chosen: Mapping[str, float] | None = None,
    reference: Mapping[str, float] | None = None,
) -> Path:
    """Left: validation harmful refusal against task accuracy, one line per method, points labelled with
    their strength. Right: harmful refusal and over-refusal against the strength.

    Args:
        curves: ``{method: [{"alpha", "harmful_refusal", "harmless_refusal", "task_accuracy"}, ...]}``.
        path: Where to write the PNG.
        chosen: ``{method: alpha}`` to mark.
        reference: ``{label: harmful refusal}`` drawn as horizontal lines (e.g. the aligned model's).
    """
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, points in curves.items():
        points = sorted(points, key=lambda p: p["alpha"])
        accuracy = [p["task_accuracy"] for p in points]
        refusal = [p["harmful_refusal"] for p in points]
        line = left.plot(accuracy, refusal, marker="o", label=method)[0]
        for p in points:
            left.annotate(f"{p['alpha']:g}", (p["task_accuracy"], p["harmful_refusal"]), fontsize=7,
                          textcoords="offset points", xytext=(4, 3))
        alphas = [p["alpha"] for p in points]
        right.plot(alphas, refusal, marker="o", color=line.get_color(), label=f"{method}: harmful refusal")
        right.plot(alphas, [p["harmless_refusal"] for p in points], marker="x", linestyle="--",
                   color=line.get_color(), label=f"{method}: over-refusal")
        if chosen and method in chosen:
            pick = min(points, key=lambda p: abs(p["alpha"] - chosen[method]))
            left.scatter([pick["task_accuracy"]], [pick["harmful_refusal"]], s=160, facecolors="none",
                         edgecolors=line.get_color(), linewidths=2)
    for label, value in (reference or {}).items():
        for axis in (left, right):
            axis.axhline(value, color="grey", linestyle=":", linewidth=1)
        right.annotate(label, (right.get_xlim()[0], value), fontsize=7, color="grey", xytext=(2, 2),
                       textcoords="offset points")
    left.set(xlabel="task accuracy (validation)", ylabel="harmful refusal (validation)",
             title="refusal vs accuracy (labels: α or β)")
    left.set_xlim(-0.05, 1.05)
    left.set_ylim(-0.05, 1.05)
    right.set(xlabel="fusion strength α (RESTA: β)", ylabel="rate (validation)", title="refusal over α")
    right.set_ylim(-0.05, 1.05)
    left.legend(fontsize=7)
    right.legend(fontsize=6)
    figure.tight_layout()
    return _save(figure, plt, path)


def _save(figure, plt, path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
