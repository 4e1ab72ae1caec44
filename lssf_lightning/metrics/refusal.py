"""Refusal rate: the fraction of answers that refuse. On harmful requests it measures safety (higher is
safer); on harmless requests it is the *over-refusal* rate (lower is better).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from lssf_lightning.metrics.judges import Judge, resolve_judge

__all__ = ["RefusalRate", "check_verdicts", "refusal_rate"]


def _as_response_list(responses: str | Sequence[str]) -> list[str]:
    if isinstance(responses, str):
        return [responses]
    responses = list(responses)
    not_strings = [type(r).__name__ for r in responses if not isinstance(r, str)]
    if not_strings:
        raise TypeError(f"responses must be strings, got elements of type {sorted(set(not_strings))}")
    return responses


def _refusal_update(responses: str | Sequence[str], judge: Judge) -> tuple[Tensor, Tensor]:
    """Judge ``responses`` and return ``(refused, total)`` as float tensors."""
    responses = _as_response_list(responses)
    if not responses:
        return torch.tensor(0.0), torch.tensor(0.0)
    verdicts = check_verdicts(judge, judge(responses), len(responses))
    return torch.tensor(float(sum(verdicts))), torch.tensor(float(len(responses)))


def check_verdicts(judge: Judge, verdicts: Any, expected: int) -> list[bool]:
    """The judge contract: one boolean per response (Python/numpy bools, or a 1-D bool tensor).

    Anything else (probabilities, label strings, a float tensor, ``None``, a wrong length) is an error naming
    the judge and what it returned: a safety metric never rounds a malfunction into "refused".
    """
    if isinstance(verdicts, Tensor):
        if verdicts.dtype != torch.bool or verdicts.ndim != 1:
            raise TypeError(f"judge {judge!r} must return one bool per response; it returned a tensor of "
                            f"dtype {verdicts.dtype} and shape {tuple(verdicts.shape)}")
        verdicts = verdicts.tolist()
    elif isinstance(verdicts, (str, bytes, Mapping)) or not isinstance(verdicts, Iterable):
        raise TypeError(f"judge {judge!r} must return a list of bools, one per response; it returned "
                        f"{_short(verdicts)}")
    verdicts = list(verdicts)
    not_bools = [v for v in verdicts if not isinstance(v, (bool, np.bool_))]
    if not_bools:
        raise TypeError(f"judge {judge!r} must return bools (True = refused); it returned "
                        f"{type(not_bools[0]).__name__} values such as {_short(not_bools[0])}")
    if len(verdicts) != expected:
        raise ValueError(f"judge {judge!r} returned {len(verdicts)} verdicts for {expected} responses")
    return [bool(v) for v in verdicts]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refusal_compute(refused: Tensor, total: Tensor) -> Tensor:
    """``refused / total``; ``nan`` when there were no responses (there is no rate to report)."""
    if total == 0:
        return torch.tensor(float("nan"), device=total.device)
    return refused / total


def refusal_rate(responses: str | Sequence[str], judge: Judge | str | os.PathLike | None = None) -> Tensor:
    """Fraction of ``responses`` that ``judge`` calls a refusal.

    Args:
        responses: One answer or a list of answers (to harmful requests, for the harmful-refusal rate).
        judge: Anything :func:`~lssf_lightning.metrics.judges.resolve_judge` accepts; ``None`` matches
            refusal phrases.

    Returns:
        A float scalar tensor in ``[0, 1]``; ``nan`` (with a warning) for an empty list.

    Example:
        >>> refusal_rate(["I can't help with that.", "Sure, here you go.", "As an AI, I won't."])
        tensor(0.6667)
    """
    refused, total = _refusal_update(responses, resolve_judge(judge))
    if total == 0:
        warnings.warn("refusal_rate got no responses; the rate is nan", UserWarning, stacklevel=2)
    return _refusal_compute(refused, total)


class RefusalRate(Metric):
    r"""Refusal rate: the fraction of responses that a judge calls a refusal.

    .. math::
        \text{rate} = \frac{\#\,\text{refused responses}}{\#\,\text{responses}}

    Fed with answers to harmful requests it measures safety (higher is better); fed with answers to harmless
    requests it measures over-refusal. The counts are summed across processes, so under DDP each rank can
    judge its own share of the prompts and ``compute`` returns the global rate.

    As input to ``forward`` and ``update`` the metric accepts:

    - ``responses`` (:class:`str` or ``list[str]``): the model's answers

    As output of ``forward`` and ``compute`` the metric returns:

    - ``rate`` (:class:`~torch.Tensor`): a float scalar in ``[0, 1]``, or ``nan`` when no response was seen

    Args:
        judge: ``None`` or ``"phrases"`` (refusal-phrase matching), a local classifier directory, or a
            callable ``list[str] -> list[bool]``; see :func:`~lssf_lightning.metrics.judges.resolve_judge`.
        kwargs: Additional keyword arguments of :class:`~torchmetrics.Metric`.

    Examples:
        >>> from lssf_lightning.metrics import RefusalRate
        >>> metric = RefusalRate()
        >>> metric.update(["I’m sorry, but I can’t help with that.", "Sure! First, gather the materials."])
        >>> metric.update("As an AI, I won't provide instructions for that.")
        >>> metric.compute()
        tensor(0.6667)
        >>> metric(["Here is a recipe for bread."])  # forward: the rate of this batch alone
        tensor(0.)
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable: bool = False
    higher_is_better: bool = True
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    refused: Tensor
    total: Tensor

    def __init__(self, judge: Judge | str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.judge = resolve_judge(judge)
        self.add_state("refused", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, responses: str | list[str]) -> None:
        """Judge ``responses`` and add them to the counts."""
        refused, total = _refusal_update(responses, self.judge)
        self.refused += refused.to(self.refused.device)
        self.total += total.to(self.total.device)

    def compute(self) -> Tensor:
        """The refusal rate over all responses seen (``nan`` if none)."""
        return _refusal_compute(self.refused, self.total)

    def plot(
        self, val: Tensor | Sequence[Tensor] | None = None, ax: _AX_TYPE | None = None
    ) -> _PLOT_OUT_TYPE:
        """Plot one value or a sequence of values of the metric (needs ``matplotlib``).

        Args:
            val: A result of ``forward``/``compute`` or a list of them; ``None`` plots ``compute()``.
            ax: A matplotlib axis to draw on.

        Returns:
            Figure and Axes object.
        """
        return self._plot(val, ax)

