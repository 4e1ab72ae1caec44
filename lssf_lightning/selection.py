"""The recommendation rule of the safety–utility sweep and ``alpha="auto"``.

A scored setting is a :class:`SweepPoint`; :func:`recommend` picks one under a :class:`SelectionRule`:

1. A point is **acceptable** when it keeps the utility budget — perplexity at most ``(1 +
   max_perplexity_increase)`` × the fine-tuned model's — the over-refusal at most the aligned model's plus
   ``max_over_refusal_margin``, and the task metric at least the fine-tuned model's minus
   ``max_accuracy_drop`` (each guard only where both numbers are known).
2. Among the acceptable points whose harmful refusal reaches the **target** (``target_refusal``, or the
   aligned model's rate minus ``refusal_tolerance``), take — with ``prefer="refusal"`` (the default) — the
   one with the most refusal (ties: lower perplexity, then earlier in the grid): the budget is spent on
   safety margin; or — with ``prefer="utility"`` — the one with the lowest perplexity (then the earliest in
   the grid, e.g. the smallest ``α``; without perplexities this is the smallest ``α`` reaching the target,
   ``alpha="auto"``'s rule). That point is the **recommended** one.
3. When no acceptable point reaches the target, nothing is recommended: the result says "target not
   reached" and names the best point on each side — the **safest within the budget** (the acceptable point
   with the most refusal) and the **cheapest reaching the target** (the lowest perplexity among the points
   that reach it, over budget). ``Recommendation.point`` is then the safest within the budget (the cheapest
   point when none is acceptable), for callers that must use something.

The sweep (:mod:`lssf_lightning.sweep`) and ``alpha="auto"`` in both training callbacks
(:class:`lssf_lightning.monitoring.AlphaTuner`, over forms and strengths) use this rule, nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lssf_lightning.validation import check_choice, check_fraction, check_range

__all__ = ["Recommendation", "SelectionRule", "SweepPoint", "describe", "recommend"]


@dataclass(frozen=True)
class SweepPoint:
    """The validation scores of one setting (``method`` with ``params``).

    ``harmful_refusal`` pools every harmful validation set; ``harmless_refusal`` is the over-refusal;
    ``perplexity`` is measured on the utility texts; ``task_accuracy`` where the fine-tune has a task metric.
    ``seconds`` is the cost of scoring this point (the edit, the evaluation, the restore).
    """

    method: str
    params: Mapping[str, Any]
    harmful_refusal: float
    harmless_refusal: float | None = None
    perplexity: float | None = None
    task_accuracy: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        """``method(k=v, ...)`` for tables and plots."""
        inside = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items()
        )
        return f"{self.method}({inside})" if inside else self.method

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["params"], data["extra"] = dict(self.params), dict(self.extra)
        data["label"] = self.label
        return data

    @classmethod
    def from_scores(cls, method: str, params: Mapping[str, Any], scores: Mapping[str, Any],
                    seconds: float = 0.0) -> SweepPoint:
        """A point from a scorer's output; keys beyond the four scores go to ``extra``."""
        known = ("harmful_refusal", "harmless_refusal", "perplexity", "task_accuracy")
        extra = {k: v for k, v in scores.items() if k not in known}
        values = (scores.get(k) for k in known)
        return cls(method, dict(params), *values, extra=extra, seconds=round(seconds, 2))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepPoint:
        names = {"method", "params", "harmful_refusal", "harmless_refusal", "perplexity", "task_accuracy",
                 "extra", "seconds"}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class SelectionRule:
    """The refusal target and the utility budget of :func:`recommend` (``None`` switches a guard off).

    Args:
        target_refusal: the harmful-refusal rate to reach; ``None``: the aligned model's minus
            ``refusal_tolerance``.
        refusal_tolerance: see ``target_refusal``.
        max_perplexity_increase: largest relative perplexity increase over the fine-tuned model
            (``0.05`` = +5 %).
        max_over_refusal_margin: largest over-refusal above the aligned model's.
        max_accuracy_drop: largest task-metric loss below the fine-tuned model's.
        prefer: among acceptable points reaching the target: ``"refusal"`` (the most refusal) or
            ``"utility"`` (the lowest perplexity). On the demo's validation split the two differed by 0.02
            refusal (one or two prompts); on its held-out sets the ``"utility"`` choice fell 8 points short
            of the aligned model's refusal and the ``"refusal"`` choice did not (README, demo section).
    """

    target_refusal: float | None = None
    refusal_tolerance: float = 0.05
    max_perplexity_increase: float | None = 0.05
    max_over_refusal_margin: float | None = 0.05
    max_accuracy_drop: float | None = 0.02
    prefer: str = "refusal"

    def __post_init__(self) -> None:
        check_choice("prefer", self.prefer, ("refusal", "utility"))
        if self.target_refusal is not None:
            check_fraction("target_refusal", self.target_refusal)
        check_fraction("refusal_tolerance", self.refusal_tolerance)
        if self.max_perplexity_increase is not None:
            check_range("max_perplexity_increase", self.max_perplexity_increase, 0.0, math.inf)
        if self.max_over_refusal_margin is not None:
            check_fraction("max_over_refusal_margin", self.max_over_refusal_margin)
        if self.max_accuracy_drop is not None:
            check_fraction("max_accuracy_drop", self.max_accuracy_drop)

    def target(self, aligned: SweepPoint | None) -> float:
        """The harmful-refusal rate to reach."""
        if self.target_refusal is not None:
            return self.target_refusal
        if aligned is None:
            raise ValueError("the selection rule needs target_refusal or the aligned model's scores")
        return max(aligned.harmful_refusal - self.refusal_tolerance, 0.0)

    def limits(self, reference: SweepPoint | None, aligned: SweepPoint | None) -> dict[str, float]:
        """The numeric bounds the guards compare with (only those that can be computed)."""
        limits = {"target_refusal": self.target(aligned)}
        perplexity = reference.perplexity if reference is not None else None
        over_refusal = aligned.harmless_refusal if aligned is not None else None
        accuracy = reference.task_accuracy if reference is not None else None
        if self.max_perplexity_increase is not None and perplexity is not None:
            limits["max_perplexity"] = perplexity * (1.0 + self.max_perplexity_increase)
        if self.max_over_refusal_margin is not None and over_refusal is not None:
            limits["max_over_refusal"] = over_refusal + self.max_over_refusal_margin
        if self.max_accuracy_drop is not None and accuracy is not None:
            limits["min_task_accuracy"] = accuracy - self.max_accuracy_drop
        return limits


@dataclass(frozen=True)
class Recommendation:
    """What :func:`recommend` found.

    ``recommended`` is true when an acceptable point reaches the target: ``point`` is then the recommendation.
    Otherwise nothing is recommended ("target not reached"): ``safest`` is the acceptable point with the most
    refusal, ``cheapest_reaching`` the lowest-perplexity point reaching the target (either may be ``None``),
    and ``point`` the safest within the budget (the cheapest point when none is acceptable).
    """

    point: SweepPoint
    reached: bool
    acceptable: bool
    limits: Mapping[str, float]
    safest: SweepPoint | None = None
    cheapest_reaching: SweepPoint | None = None

    @property
    def recommended(self) -> bool:
        """Whether ``point`` reaches the target within the budget."""
        return self.reached and self.acceptable

    def to_dict(self) -> dict[str, Any]:
        """The recommendation (``point``, ``limits``), or — target not reached — the best point of each side
        (``safest_within_budget``, ``cheapest_reaching_target``) and no ``point``."""
        if self.recommended:
            return {"point": self.point.to_dict(), "reached": True, "acceptable": True,
                    "limits": dict(self.limits)}
        return {
            "safest_within_budget": self.safest.to_dict() if self.safest else None,
            "cheapest_reaching_target": self.cheapest_reaching.to_dict() if self.cheapest_reaching else None,
            "limits": dict(self.limits),
        }

    def __str__(self) -> str:
        if self.recommended:
            return f"recommended: {describe(self.point)}"
        safest = describe(self.safest) if self.safest else "none (no point keeps the budget)"
        cheapest = describe(self.cheapest_reaching) if self.cheapest_reaching else "none"
        return (f"target not reached within the budget (refusal >= {self.limits['target_refusal']:.2f}); "
                f"safest within budget: {safest}; cheapest reaching the target: {cheapest}")


_EPS = 1e-9  # rates are ratios of small counts: compare with a tolerance, never exactly


def _acceptable(point: SweepPoint, limits: Mapping[str, float]) -> bool:
    checks = [
        ("max_perplexity", point.perplexity, lambda v, b: v <= b * (1 + _EPS)),
        ("max_over_refusal", point.harmless_refusal, lambda v, b: v <= b + _EPS),
        ("min_task_accuracy", point.task_accuracy, lambda v, b: v >= b - _EPS),
    ]
    return all(value is None or name not in limits or ok(value, limits[name]) for name, value, ok in checks)


def recommend(
    points: Sequence[SweepPoint],
    rule: SelectionRule | None = None,
    *,
    reference: SweepPoint | None = None,
    aligned: SweepPoint | None = None,
) -> Recommendation:
    """The setting to use, or "target not reached" with the best point of each side (the rule is spelled out
    in the module docstring).

    Args:
        points: the scored grid, in grid order (the order breaks ties: put smaller strengths first).
        rule: target and budget; default :class:`SelectionRule`'s defaults.
        reference: the fine-tuned model's own scores (the utility and task baselines).
        aligned: the aligned model's scores (the refusal target and the over-refusal baseline).

    Raises:
        ValueError: if ``points`` is empty, or no target can be computed.
    """
    if not points:
        raise ValueError("recommend needs at least one scored point")
    rule = rule or SelectionRule()
    limits = rule.limits(reference, aligned)
    target = limits["target_refusal"]

    def cost(indexed: tuple[int, SweepPoint]) -> tuple[float, int]:
        index, point = indexed
        return (point.perplexity if point.perplexity is not None else 0.0, index)

    def safest(candidates):
        return min(candidates, key=lambda ip: (-ip[1].harmful_refusal, *cost(ip)))[1] if candidates else None

    indexed = list(enumerate(points))
    acceptable = [(i, p) for i, p in indexed if _acceptable(p, limits)]
    reaching = [(i, p) for i, p in indexed if p.harmful_refusal >= target - _EPS]
    good = [(i, p) for i, p in acceptable if p.harmful_refusal >= target - _EPS]
    if good:
        point = safest(good) if rule.prefer == "refusal" else min(good, key=cost)[1]
        return Recommendation(point, True, True, limits, point, point)
    within = safest(acceptable)
    cheapest = min(reaching, key=cost)[1] if reaching else None
    point = within if within is not None else min(indexed, key=cost)[1]
    return Recommendation(point, point.harmful_refusal >= target - _EPS, within is not None, limits, within,
                          cheapest)


def describe(point: SweepPoint) -> str:
    """One line: the label and the scores that were measured."""
    parts = [f"harmful refusal {point.harmful_refusal:.2f}"]
    if point.harmless_refusal is not None:
        parts.append(f"over-refusal {point.harmless_refusal:.2f}")
    if point.perplexity is not None:
        parts.append(f"perplexity {point.perplexity:.2f}")
    if point.task_accuracy is not None:
        parts.append(f"task {point.task_accuracy:.2f}")
    return f"{point.label}: " + ", ".join(parts) + f" ({point.seconds:.1f} s)"
