"""Figures (matplotlib, headless): a safety subspace's ranks, and the sweep's safety–utility front."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lssf_lightning.io.guard import guarded_output
from lssf_lightning.subspace import SafetySubspace

if TYPE_CHECKING:
    from lssf_lightning.selection import SweepPoint

__all__ = ["plot_front", "plot_subspace", "pyplot"]

_LAYER = re.compile(r"\.(\d+)\.")


def pyplot():
    """``matplotlib.pyplot`` on the file-only ``Agg`` backend: the package's one matplotlib setup (every
    figure is written to a file, also on machines without a display)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from err
    return plt


def plot_subspace(
    subspace: SafetySubspace, path: str | os.PathLike, *, overwrite: bool = False, inputs: Any = ()
) -> Path:
    """Draw the safety-critical rank and the entropy ``H(n)`` of every matrix against its layer index.

    One line per module kind (``q_proj``, ``down_proj``…). Needs matplotlib (``pip install matplotlib``).
    The file is written through the output guard (:func:`lssf_lightning.io.guard.guarded_output`): an existing
    ``path`` is replaced only with ``overwrite``, never when it is (or lies inside) one of ``inputs``.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    series: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    for key, entry in subspace.entries.items():
        found = _LAYER.search(key)
        layer = int(found[1]) if found else 0
        kind = key.rsplit(".", 2)[-2] if key.count(".") >= 2 else key
        series[kind].append((layer, entry.rank, entry.entropy))
    figure, (rank_axis, entropy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, points in sorted(series.items()):
        points.sort()
        layers = [p[0] for p in points]
        rank_axis.plot(layers, [p[1] for p in points], marker="o", markersize=3, label=kind)
        entropy_axis.plot(layers, [p[2] for p in points], marker="o", markersize=3, label=kind)
    rank_axis.set(
        xlabel="layer",
        ylabel="safety-critical rank r",
        title=f"rank per matrix (η = {subspace.metadata.get('eta')})",
    )
    entropy_axis.set(xlabel="layer", ylabel="H(n)", title="safety singular value entropy")
    for axis in (rank_axis, entropy_axis):  # layers are whole numbers: no 0.5 ticks
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    rank_axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path = Path(path).expanduser()
    try:
        with guarded_output(path, inputs, overwrite=overwrite, directory=False) as staging:
            figure.savefig(staging, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(figure)
    return path


def plot_front(
    points: Sequence[SweepPoint],
    path: str | Path,
    *,
    reference: SweepPoint | None = None,
    aligned: SweepPoint | None = None,
    recommended: SweepPoint | None = None,
    limits: Mapping[str, float] | None = None,
    title: str = "safety–utility front (validation)",
) -> Path:
    """A PNG: harmful refusal against perplexity (left) and over-refusal against perplexity (right), one
    colour per method, the fine-tuned and aligned models marked, the recommended point circled, the budget
    dashed."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    measured = [p for p in points if p.perplexity is not None]
    if not measured:
        raise ValueError("plot_front needs points with a measured perplexity")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    methods = sorted({p.method for p in measured})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    panels = (("harmful_refusal", "harmful refusal (validation) ↑"), ("harmless_refusal", "over-refusal ↓"))
    for axis, (metric, label) in zip(axes, panels):
        for method in methods:
            rows = [p for p in measured if p.method == method and getattr(p, metric) is not None]
            axis.scatter([p.perplexity for p in rows], [getattr(p, metric) for p in rows], s=28,
                         color=colours[method], label=method, alpha=0.85)
        for marker, point, name in (("s", reference, "fine-tuned"), ("^", aligned, "aligned")):
            if point is not None and point.perplexity is not None and getattr(point, metric) is not None:
                axis.scatter([point.perplexity], [getattr(point, metric)], marker=marker, s=70, color="black",
                             label=name, zorder=3)
        if recommended is not None and getattr(recommended, metric) is not None:
            axis.scatter([recommended.perplexity], [getattr(recommended, metric)], s=200, facecolors="none",
                         edgecolors="red", linewidths=2, label="recommended", zorder=4)
        limits = limits or {}
        if "max_perplexity" in limits:
            axis.axvline(limits["max_perplexity"], color="grey", linestyle="--", linewidth=1)
        bound = {"harmful_refusal": "target_refusal", "harmless_refusal": "max_over_refusal"}[metric]
        if bound in limits:
            axis.axhline(limits[bound], color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("perplexity on general text (validation) ↓")
        axis.set_ylabel(label)
        axis.set_ylim(-0.03, 1.03)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
