"""Figures of a safety subspace (matplotlib, headless)."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from lssf_lightning.io.guard import guarded_output
from lssf_lightning.subspace import SafetySubspace

__all__ = ["plot_subspace"]

_LAYER = re.compile(r"\.(\d+)\.")


def plot_subspace(
    subspace: SafetySubspace, path: str | os.PathLike, *, overwrite: bool = False, inputs: Any = ()
) -> Path:
    """Draw the safety-critical rank and the entropy ``H(n)`` of every matrix against its layer index.

    One line per module kind (``q_proj``, ``down_proj``…). Needs matplotlib (``pip install matplotlib``).
    The file is written through the output guard (:func:`lssf_lightning.io.guard.guarded_output`): an existing
    ``path`` is replaced only with ``overwrite``, never when it is (or lies inside) one of ``inputs``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from err
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
