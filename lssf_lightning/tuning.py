"""Choosing the fusion strength ``α`` from refusals on a validation set (``alpha="auto"``).

``refusal_curve`` measures, for each ``α`` of a grid, how often the realigned model refuses harmful
validation prompts (and, optionally, harmless ones); ``smallest_alpha_reaching`` picks the smallest ``α``
whose refusal reaches a target. Refusal is not monotone in ``α`` (too strong a correction degrades answers),
so the whole grid up to the first success is measured rather than bisected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from torch import nn

from lssf_lightning.subspace import SafetySubspace

__all__ = ["AlphaPoint", "refusal_curve", "smallest_alpha_reaching"]


@dataclass(frozen=True)
class AlphaPoint:
    """Refusal rates of the model realigned with one ``α``."""

    alpha: float
    harmful_refusal: float
    harmless_refusal: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def refusal_curve(
    model: nn.Module,
    tokenizer,
    subspace: SafetySubspace,
    alphas: Sequence[float],
    harmful_prompts: Sequence[str],
    harmless_prompts: Sequence[str] | None = None,
    *,
    judge: str | Callable[[list[str]], list[bool]] | None = None,
    target: float | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    rate: Callable[[list[str]], float] | None = None,
) -> list[AlphaPoint]:
    """Refusal rates of ``model`` realigned with each ``α`` (ascending); the raw weights come back after each.

    Args:
        model: the fine-tuned HF causal LM (a peft model works too).
        tokenizer: its tokenizer.
        subspace: the safety subspace to fuse.
        alphas: the grid, measured in ascending order.
        harmful_prompts: validation prompts whose refusal should be restored.
        harmless_prompts: optional prompts whose refusal (over-refusal) is measured too.
        judge: refusal judge (see :func:`lssf_lightning.metrics.resolve_judge`).
        target: stop after the first ``α`` whose harmful refusal reaches it.
        max_new_tokens: tokens generated per answer.
        batch_size: prompts per generation batch.
        rate: turns answers into a rate; default the harmful-refusal rate with ``judge``. (Distributed callers
            pass one that sums counts over ranks.)
    """
    from lssf_lightning.metrics import generate_responses, harmful_refusal_rate

    if rate is None:
        def rate(responses):
            return float(harmful_refusal_rate(responses, judge=judge))

    def answers(prompts):
        return generate_responses(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size)

    curve = []
    for alpha in sorted(float(a) for a in alphas):
        with subspace.temporarily_fused(model, alpha):
            harmful = rate(answers(harmful_prompts))
            harmless = rate(answers(harmless_prompts)) if harmless_prompts else None
        curve.append(AlphaPoint(alpha, harmful, harmless))
        if target is not None and harmful >= target:
            break
    return curve


def smallest_alpha_reaching(curve: Sequence[AlphaPoint], target: float) -> tuple[float, bool]:
    """``(α, reached)``: the smallest ``α`` whose harmful refusal is ``≥ target``; when none is, the ``α`` with
    the highest refusal (the smallest of ties) and ``False``."""
    if not curve:
        raise ValueError("the refusal curve is empty")
    reaching = [p.alpha for p in curve if p.harmful_refusal >= target]
    if reaching:
        return min(reaching), True
    best = max(curve, key=lambda p: (p.harmful_refusal, -p.alpha))
    return best.alpha, False
