"""``alpha="auto"``: pick the fusion strength ``α`` on a validation split.

The rule: walk the grid upwards and take the smallest ``α`` whose realigned model refuses at least
``target`` of the validation harmful prompts while keeping the validation task accuracy within
``max_accuracy_drop`` of the fine-tuned model and the over-refusal within ``max_over_refusal``. When no ``α``
reaches the target, take the one with the highest refusal among those that keep both guards (and the
smallest ``α`` when none does). Among the acceptable points this is
:func:`lssf_lightning.tuning.smallest_alpha_reaching`, the rule of ``LSSFCallback(alpha="auto")``; the demo adds
the two guards and scores task accuracy too, hence its own :class:`AlphaPoint`. Evaluation prompts are never
involved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from lssf_lightning.tuning import smallest_alpha_reaching

__all__ = ["AlphaPoint", "choose_alpha", "sweep_alpha"]


@dataclass
class AlphaPoint:
    """Validation scores of the model realigned with one ``α``."""

    alpha: float
    harmful_refusal: float
    harmless_refusal: float
    task_accuracy: float
    extra: dict | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _acceptable(point: AlphaPoint, reference_accuracy: float, max_accuracy_drop: float, max_over_refusal: float) -> bool:
    return (
        point.task_accuracy >= reference_accuracy - max_accuracy_drop - 1e-9
        and point.harmless_refusal <= max_over_refusal + 1e-9
    )


def choose_alpha(
    points: Sequence[AlphaPoint],
    target: float,
    reference_accuracy: float,
    max_accuracy_drop: float = 0.02,
    max_over_refusal: float = 1.0,
) -> AlphaPoint:
    """The point :mod:`this module's <lssf_lightning.demo.sweep>` rule selects (see the module docstring).

    Raises:
        ValueError: If ``points`` is empty.
    """
    if not points:
        raise ValueError("choose_alpha needs at least one evaluated alpha")
    ordered = sorted(points, key=lambda p: p.alpha)
    ok = [p for p in ordered if _acceptable(p, reference_accuracy, max_accuracy_drop, max_over_refusal)]
    if not ok:
        return ordered[0]
    alpha, _ = smallest_alpha_reaching(ok, target - 1e-9)  # the callback's rule, on the acceptable points
    return next(p for p in ok if p.alpha == alpha)


def sweep_alpha(
    grid: Sequence[float],
    score: Callable[[float], AlphaPoint],
    target: float,
    reference_accuracy: float,
    max_accuracy_drop: float = 0.02,
    max_over_refusal: float = 1.0,
    stop_early: bool = False,
    log: Callable[[str], None] | None = print,
) -> tuple[AlphaPoint, list[AlphaPoint]]:
    """Score the grid (ascending) and choose ``α`` with :func:`choose_alpha`.

    Args:
        grid: Candidate strengths (sorted here).
        score: Realigns with one ``α`` and scores it on the validation split.
        target: Validation harmful-refusal rate to reach.
        reference_accuracy: The fine-tuned model's validation task accuracy.
        max_accuracy_drop: Largest accepted accuracy loss.
        max_over_refusal: Largest accepted validation over-refusal.
        stop_early: Stop at the first acceptable ``α`` that reaches the target (the curve is then partial).
        log: Called with one line per scored ``α``.

    Returns:
        ``(chosen point, all scored points)``.
    """
    if not grid:
        raise ValueError("the alpha grid is empty")
    points = []
    for alpha in sorted(float(a) for a in grid):
        point = score(alpha)
        points.append(point)
        if log:
            log(
                f"  alpha={alpha:g}: harmful refusal {point.harmful_refusal:.2f}, over-refusal "
                f"{point.harmless_refusal:.2f}, task accuracy {point.task_accuracy:.2f} (validation)"
            )
        reached = point.harmful_refusal >= target - 1e-9
        if stop_early and reached and _acceptable(point, reference_accuracy, max_accuracy_drop, max_over_refusal):
            break
    return choose_alpha(points, target, reference_accuracy, max_accuracy_drop, max_over_refusal), points
