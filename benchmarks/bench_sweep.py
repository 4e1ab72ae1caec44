"""Cost of the safety–utility sweep (target: ≥ 20 points on the demo's models in ≤ 10 min on
2 cores).

    python benchmarks/bench_sweep.py [--models demo_output/models] [--output /tmp/bench_sweep]

Inputs: the demo's real base / aligned / fine-tuned SmolLM2-135M directories (``lssf-lightning demo`` writes
them). The grid: two subspaces (η 0.8 and 0.5), each with the additive form at α 0.25 / 0.5 / 1, the reset
form at (α, β) = (1, 0) / (1, 0.15) / (2, 0), the erosion form at (1, 0) and the two-sided reset at
(α, ρ) = (1, 0.5) / (1, 1), plus RESTA at β 0.5 / 1 and β 1 with DARE 0.9: 21 points, scored on the bundled
calibration prompts (32), the bundled harmless prompts (48) and the validation half of the standard-library
prose. Printed against a plain baseline: one scoring of the unedited fine-tuned model (the same generation
and forward passes, no edit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo_output/models", help="the demo's models directory")
    parser.add_argument("--output", default="/tmp/bench_sweep", help="where sweep.json / front.png go")
    args = parser.parse_args(argv)
    models = Path(args.models)
    names = ("base", "aligned", "finetuned")
    missing = [name for name in names if not (models / name / "config.json").is_file()]
    if missing:
        print(f"no demo models {missing} under {models}: run `lssf-lightning demo` first", file=sys.stderr)
        return 1

    from lssf_lightning.config import SubspaceConfig
    from lssf_lightning.methods.registry import METHODS
    from lssf_lightning.sweep import SweepGrid, sweep_checkpoints

    points = {**{name: spec.grid for name, spec in METHODS.items()}, "lssf": ((0.25,), (0.5,), (1.0,))}
    grid = SweepGrid(subspaces=(SubspaceConfig(eta=0.8), SubspaceConfig(eta=0.5)), points=points)
    started = time.perf_counter()
    report = sweep_checkpoints(
        str(models / "finetuned"), str(models / "aligned"), str(models / "base"), args.output,
        grid=grid, progress=False, log=None,
    )
    wall = time.perf_counter() - started
    cost = report["cost"]
    plain = report["reference"]["seconds"]  # the unedited fine-tuned model, scored once
    summary = {
        "points": cost["points"], "wall_s": round(wall, 1), "seconds_per_point": cost["seconds_per_point"],
        "building_s": cost["seconds_building"], "plain_scoring_s": plain,
    }
    print(json.dumps(summary, indent=1))
    per_point = cost["seconds_per_point"]
    print(f"{cost['points']} points in {wall / 60:.1f} min (target ≤ 10 min): {per_point:.1f} s per "
          f"point = {per_point / plain:.2f} × one plain scoring of the fine-tuned model ({plain:.1f} s)")
    if "recommended" in report:
        print(f"recommended: {report['recommended']['point']['label']}")
    else:
        print(f"target not reached: {report['target_not_reached']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
