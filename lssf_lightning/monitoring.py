"""The framework-neutral monitoring core of both training callbacks: refusal probes, perplexity, auto-α.

:class:`SafetyProbe` holds what is measured — harmful and harmless prompts (refusal and over-refusal), the
judge, the answer length, the utility texts whose perplexity is logged — and composes one measurement of the
raw and the realigned model (:meth:`SafetyProbe.measure`). :class:`AlphaTuner` is ``alpha="auto"``: the
target (the aligned model's own refusal rate minus a tolerance), the choice of form and strength over a
small grid of candidates with the utility budget (:func:`lssf_lightning.selection.recommend`, the sweep's
rule) and its state.

Neither imports Lightning or transformers. A framework adapter (``LSSFCallback``, ``LSSFTrainerCallback``)
only supplies the model, the tokenizer, how answers are gathered across processes (``answers``), how a rate
is reduced across processes (``rate``), how the fusion is swapped in (:func:`fused_call`), and translates
hooks and logging.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from lssf_lightning.config import AutoAlphaConfig
from lssf_lightning.forms import check_method_options, low_rank_methods
from lssf_lightning.metrics import generate_responses, load_prompts, resolve_judge
from lssf_lightning.metrics.perplexity import CausalLMPerplexity, load_utility_texts, model_perplexity
from lssf_lightning.selection import Recommendation, SelectionRule, SweepPoint, describe, recommend
from lssf_lightning.training import FusionState
from lssf_lightning.validation import SettingError, check_choice, check_fraction, check_int

__all__ = ["DEFAULT_AUTO_METHODS", "AlphaTuner", "FormChoice", "SafetyProbe", "auto_methods",
           "check_min_refusal_rate", "fused_call", "needs_realignment"]

T = TypeVar("T")
Realigned = Callable[[Callable[[], T], T], T]
"""``(measure, raw) ↦ measure()`` run with the missing fusion swapped in (``raw`` when nothing is missing)."""


def fused_call(fusion: FusionState, swap: Callable[[], AbstractContextManager]) -> Realigned:
    """The :data:`Realigned` of a run: ``swap()`` is the context that holds the realigned weights."""

    def realigned(measure: Callable[[], T], raw: T) -> T:
        if fusion.missing == 0:
            return raw
        with swap():
            return measure()

    return realigned


class SafetyProbe:
    """What the refusal monitor measures, and the measurement itself.

    Args:
        harmful_prompts: harmful prompts (a .txt/.jsonl/.csv path); default: the bundled set.
        harmless_prompts: harmless prompts for the over-refusal rate; default: the bundled set.
        num_prompts: how many prompts of each set are answered.
        max_new_tokens: tokens generated per answer.
        judge: ``None``/``"phrases"``, a local HF classifier directory, a callable, or its dotted path.
        utility_texts: general texts whose perplexity is measured (``"bundled"``, ``"stdlib"``, a file, or
            ``None`` for none).
        num_utility_texts: how many of them.
    """

    def __init__(
        self,
        harmful_prompts: str | None = None,
        harmless_prompts: str | None = None,
        num_prompts: int = 16,
        max_new_tokens: int = 8,
        judge: Any = None,
        utility_texts: str | None = "bundled",
        num_utility_texts: int = 8,
    ) -> None:
        self.num_prompts = check_int("num_prompts", num_prompts)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens)
        self.num_utility_texts = check_int("num_utility_texts", num_utility_texts)
        self.judge = resolve_judge(judge)
        self.harmful_prompts, self.harmless_prompts = harmful_prompts, harmless_prompts
        self.utility_texts = utility_texts
        self._prompts: dict[str, list[str]] | None = None
        self._utility: dict[str, list[str]] = {}

    def prompts(self) -> dict[str, list[str]]:
        """``{"harmful": [...], "harmless": [...]}``: the first ``num_prompts`` of each set (read once)."""
        if self._prompts is None:
            self._prompts = {
                "harmful": load_prompts(self.harmful_prompts or "harmful")[: self.num_prompts],
                "harmless": load_prompts(self.harmless_prompts or "harmless")[: self.num_prompts],
            }
        return self._prompts

    def utility(self, fallback: str | None = None) -> list[str] | None:
        """The utility texts (``fallback`` when none are set; ``None`` when neither is)."""
        source = self.utility_texts or fallback
        if source is None:
            return None
        if source not in self._utility:
            self._utility[source] = load_utility_texts(source, limit=self.num_utility_texts)
        return self._utility[source]

    def generate(self, model: nn.Module, tokenizer, prompts: Sequence[str]) -> list[str]:
        """Greedy answers to ``prompts`` (``max_new_tokens`` each)."""
        if not prompts:
            return []
        return generate_responses(model, tokenizer, list(prompts), max_new_tokens=self.max_new_tokens)

    def perplexity(self, model: nn.Module, tokenizer, fallback: str | None = None) -> torch.Tensor | None:
        """Perplexity on the utility texts; every process scores all of them (equal forward passes, as FSDP2
        needs) and the metric's sums are reduced across processes."""
        texts = self.utility(fallback)
        if texts is None:
            return None
        return torch.tensor(model_perplexity(model, tokenizer, texts, metric=CausalLMPerplexity()))

    def measure(
        self,
        answers: Callable[[], Mapping[str, list[str]]],
        rate: Callable[[list[str]], Any],
        perplexity: Callable[[], Any] | None = None,
        realigned: Realigned | None = None,
    ) -> dict[str, Any]:
        """The numbers to log, by name: ``refusal_rate``, ``harmless_refusal_rate``, ``perplexity`` and, with
        ``realigned``, each one's ``*_realigned`` twin.

        Args:
            answers: ``() ↦ {"harmful": answers, "harmless": answers}`` for this process's share.
            rate: answers ↦ refusal rate (reduced across processes: a collective, called in the same order on
                every process).
            perplexity: ``() ↦`` the perplexity on the utility texts, or ``None`` for none.
            realigned: runs a measurement with the fusion swapped in (:func:`fused_call`); ``None`` without a
                subspace.
        """

        def rates() -> dict[str, Any]:
            given = answers()
            return {"refusal_rate": rate(given["harmful"]), "harmless_refusal_rate": rate(given["harmless"])}

        raw = rates()
        fused = realigned(rates, raw) if realigned is not None else None
        values = {"refusal_rate": raw["refusal_rate"]}
        if fused is not None:
            values["refusal_rate_realigned"] = fused["refusal_rate"]
        values["harmless_refusal_rate"] = raw["harmless_refusal_rate"]
        if fused is not None:
            values["harmless_refusal_rate_realigned"] = fused["harmless_refusal_rate"]
        if perplexity is not None and self.utility_texts is not None:
            values["perplexity"] = perplexity()
            if realigned is not None:
                values["perplexity_realigned"] = realigned(perplexity, values["perplexity"])
        return values


def check_min_refusal_rate(value: float | None, monitored: bool) -> float | None:
    """``min_refusal_rate`` (a fusion policy of the callbacks): a share, and only with a refusal monitor."""
    if value is None:
        return None
    value = check_fraction("min_refusal_rate", value)
    if not monitored:
        raise SettingError(f"min_refusal_rate needs the refusal monitor, got {value!r} with monitor=False")
    return value


def needs_realignment(values: Mapping[str, Any], min_refusal_rate: float | None, fusion: FusionState) -> bool:
    """Whether the live weights should be realigned now: the raw refusal rate fell below
    ``min_refusal_rate`` and the live weights do not carry the whole fusion yet."""
    if min_refusal_rate is None or "refusal_rate" not in values or fusion.missing == 0:
        return False
    return float(values["refusal_rate"]) < min_refusal_rate


DEFAULT_AUTO_METHODS: tuple[str, ...] = ("lssf-reset", "lssf")
"""``alpha="auto"``'s forms when none is given, in order of preference (ties go to the earlier one): the reset
form first — on the demo's models it restored refusal at +2–3 % perplexity where the paper's additive form
cost +29–36 % (docs/demo.md) — and the paper's form, which a LoRA model under FSDP2 falls back to."""


def auto_methods(method: str | None, options: Mapping[str, Any], config: AutoAlphaConfig) -> tuple[str, ...]:
    """The forms ``alpha="auto"`` chooses among: ``(method,)`` when the callback names one, else
    ``config.methods`` or :data:`DEFAULT_AUTO_METHODS`; each a low-rank method, and ``add`` /
    ``input_share`` only with a named method that takes them (one-line :class:`SettingError`)."""
    if method is not None:
        check_method_options(method, options)
        return (method,)
    extra = sorted(name for name, value in options.items() if name != "alpha" and value is not None)
    if extra:
        raise SettingError(f"{extra} belong to one method: pass method= with them (alpha='auto' chooses "
                           f"among {list(config.methods or DEFAULT_AUTO_METHODS)})")
    methods = tuple(config.methods or DEFAULT_AUTO_METHODS)
    for name in methods:
        check_choice("auto_alpha.methods", name, tuple(low_rank_methods()))
    return methods


Swap = Callable[[str, float], AbstractContextManager]
"""``(method, α) ↦`` the context holding the live model with that candidate form applied (the exact live
weights come back after)."""


@dataclass(frozen=True)
class FormChoice:
    """What :meth:`AlphaTuner.choose` found: the form and strength to use, whether they are **recommended**
    (the target reached within the budget), the measured ``curve`` (one :class:`SweepPoint` per candidate)
    and :func:`~lssf_lightning.selection.recommend`'s whole answer."""

    method: str
    alpha: float
    recommended: bool
    curve: list[SweepPoint]
    recommendation: Recommendation
    reference_perplexity: float | None = None

    reached = property(lambda self: self.recommended, doc="Alias of ``recommended``.")

    def describe(self, target: float) -> str:
        """One line: the recommendation, or "target not reached" with the best point of each side and the
        fallback in use (never called recommended)."""
        if self.recommended:
            return (f"recommended {self.method} alpha={self.alpha:g}: reaches {target:.0%} refusal within "
                    "the budget")
        best = self.recommendation
        safest = describe(best.safest) if best.safest is not None else "none"
        cheapest = describe(best.cheapest_reaching) if best.cheapest_reaching is not None else "none"
        return (f"target not reached ({target:.0%} refusal within the budget): safest within budget "
                f"{safest}; cheapest reaching the target {cheapest}; using {self.method} "
                f"alpha={self.alpha:g}, NOT a recommendation")


class AlphaTuner:
    """``alpha="auto"``: the target, the choice of form and strength within the utility budget, its state.

    The candidates are ``methods`` × ``config.alphas``, each measured on the live model with the candidate
    applied (the callbacks' :data:`Swap`), each method's curve up to its first ``α`` reaching the target; the
    choice is :func:`~lssf_lightning.selection.recommend` (the sweep's rule, ``prefer="utility"``: the lowest
    perplexity among the candidates reaching the target within ``max_perplexity_increase``).

    Args:
        config: the grid, target, tolerance, tuning prompts and utility budget.
        probe: generates the answers and measures the perplexity (its texts; the bundled set when it has
            none and a budget is set).
        methods: the forms (:func:`auto_methods`); default ``config.methods`` or :data:`DEFAULT_AUTO_METHODS`.
    """

    def __init__(self, config: AutoAlphaConfig | None, probe: SafetyProbe,
                 methods: Sequence[str] | None = None) -> None:
        self.config = config or AutoAlphaConfig()
        self.probe = probe
        self.methods = tuple(methods) if methods else auto_methods(None, {}, self.config)
        self.target: float | None = self.config.target
        self.curve: list[dict[str, Any]] = []
        self.choice: FormChoice | None = None
        self._prompts: list[str] | None = None

    def prompts(self, shard: Callable[[list[str]], list[str]] = lambda prompts: prompts) -> list[str]:
        """This process's share (``shard``) of the tuning prompts (default: the bundled calibration set)."""
        if self._prompts is None:
            self._prompts = load_prompts(self.config.prompts or "harmful_calibration")
        return shard(self._prompts)

    def set_target(self, aligned_rate: float) -> float:
        """The target from the aligned model's own refusal rate, unless one is set already."""
        if self.target is None:
            self.target = max(float(aligned_rate) - self.config.tolerance, 0.0)
        return self.target

    def current_target(self) -> float:
        """The refusal rate to reach (``1 − tolerance`` until measured)."""
        return self.target if self.target is not None else 1.0 - self.config.tolerance

    def choose(
        self, model: nn.Module, tokenizer, swap: Swap, *, prompts: list[str],
        rate: Callable[[list[str]], float], raw: Callable[[], AbstractContextManager] | None = None,
        methods: Sequence[str] | None = None,
    ) -> FormChoice:
        """Measure the candidates on the live ``model`` (``raw()``: the context holding the weights without
        any correction, the utility baseline; default the live weights); choose the form and its total α."""
        target = self.current_target()
        perplexity = None
        if self.config.max_perplexity_increase is not None:
            def perplexity() -> float:
                return float(self.probe.perplexity(model, tokenizer, "bundled"))
        reference = None
        if perplexity is not None:
            with raw() if raw is not None else contextlib.nullcontext():
                reference = perplexity()
        points = []
        for method in methods or self.methods:
            for alpha in self.config.alphas:
                with swap(method, alpha):
                    refusal = float(rate(self.probe.generate(model, tokenizer, prompts)))
                    utility = perplexity() if perplexity is not None else None
                points.append(SweepPoint(method, {"alpha": float(alpha)}, refusal, None, utility))
                if refusal >= target:
                    break  # a larger α of this form only costs more utility
        return self.decide(points, reference)

    def decide(self, points: list[SweepPoint], reference: float | None) -> FormChoice:
        """The choice over measured ``points`` (the sweep's rule, :func:`~lssf_lightning.selection.recommend`,
        against the ``reference`` perplexity of the raw weights); sets :attr:`choice` and :attr:`curve`."""
        rule = SelectionRule(target_refusal=min(max(self.current_target(), 0.0), 1.0),
                             max_perplexity_increase=self.config.max_perplexity_increase,
                             max_over_refusal_margin=None, max_accuracy_drop=None, prefer="utility")
        found = recommend(points, rule, reference=SweepPoint("raw", {}, 0.0, None, reference))
        self.choice = FormChoice(found.point.method, found.point.params["alpha"], found.recommended, points,
                                 found, reference)
        self.curve = [{"method": p.method, "alpha": p.params["alpha"], "refusal": p.harmful_refusal,
                       **({"perplexity": p.perplexity} if p.perplexity is not None else {})} for p in points]
        return self.choice

    def describe(self, choice: FormChoice) -> str:
        """One line on the choice (``"target not reached ..."`` when it was not)."""
        grid = f"{list(self.methods)} x {self.config.alphas}"
        return f"alpha='auto' over {grid}: {choice.describe(self.current_target())}"

    def logs(self, method: str, alpha: float) -> dict[str, float]:
        """What both callbacks log (numbers only): ``lssf/alpha``, ``lssf/method/<name>`` (1 for the form in
        use, 0 for the other candidates) and, after a choice, ``lssf/target_reached`` (1 when recommended);
        the method's name is in the checkpoint's metadata (:meth:`state_dict`)."""
        logs = {"lssf/alpha": float(alpha)}
        logs.update({f"lssf/method/{name}": float(name == method) for name in self.methods})
        if self.choice is not None:
            logs["lssf/target_reached"] = float(self.choice.recommended)
        return logs

    def state_dict(self) -> dict[str, Any]:
        """The measured target, the last curve and choice (``auto_method``, ``auto_recommended``,
        ``auto_note``: "target not reached ..." when nothing reached it within the budget)."""
        choice = self.choice
        return {"auto_target": self.target, "alpha_curve": self.curve,
                "auto_method": choice.method if choice else None,
                "auto_recommended": choice.recommended if choice else None,
                "auto_note": self.describe(choice) if choice else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the curve and target; the choice is the caller's)."""
        self.target = state.get("auto_target", self.target)
        self.curve = list(state.get("alpha_curve") or [])
