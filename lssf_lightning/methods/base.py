"""The edit protocol every realignment method follows: a planner maps weight keys to per-tensor edits.

A planner looks at a :class:`~lssf_lightning.io.weights.WeightStore` (a live module, a state dict, or a
checkpoint streamed tensor by tensor) and returns ``{key: edit}``; an edit takes the tensor stored under
``key`` and returns its replacement. The same plan is applied to a module or a mapping by :func:`apply_edits`
and streamed into a new model directory by :func:`lssf_lightning.io.export.write_model_directory`, so LSSF,
RESTA, SafeLoRA and any new method share one path.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lssf_lightning.io.weights import ModuleStore, WeightStore, open_weights

__all__ = ["Correction", "Edit", "LowRankPlanner", "Planner", "apply_edits", "temporarily_edited"]

Edit = Callable[[Tensor], Tensor]
"""A per-tensor edit: the stored tensor in, its replacement (a new tensor, same shape and dtype) out."""


@runtime_checkable
class Planner(Protocol):
    """What a realignment method provides."""

    def plan(self, target: WeightStore) -> dict[str, Edit]:
        """``{key of target: edit}`` for every weight of ``target`` the method changes.

        Raises ``ValueError`` when ``target`` does not correspond to the method's inputs.
        """
        ...

    def summary(self) -> dict[str, Any]:
        """What the method did, for reports (read after the edits ran)."""
        ...


class Correction(NamedTuple):
    """A rank-``k`` edit ``W ← W + left @ right`` in the output-major ``(d_out, d_in)`` layout (transposed
    for a GPT-2 ``Conv1D`` weight, ``conv1d``); ``dtype`` is the factors' natural storage dtype."""

    left: Tensor
    right: Tensor
    conv1d: bool
    dtype: torch.dtype


@runtime_checkable
class LowRankPlanner(Planner, Protocol):
    """A planner whose every edit is a low-rank correction (the LSSF forms): what a LoRA adapter can carry.

    ``reads_weights`` says whether a correction depends on the weight it corrects (the reset forms) or not
    (the additive form: the weight passed is then ``None``).
    """

    reads_weights: bool

    def low_rank_plan(self, target: WeightStore) -> dict[str, Callable[[Tensor | None], Correction | None]]:
        """``{key of target: W ↦ its Correction}`` (``None`` for a matrix left unchanged), matched and checked
        as :meth:`Planner.plan`."""
        ...


def apply_edits(target: nn.Module | Mapping[str, Tensor], planner: Planner, inplace: bool = False):
    """Apply ``planner.plan(store)`` to a module (its parameters) or a mapping; copy first unless ``inplace``.

    A module is deep-copied; a mapping is shallow-copied (untouched tensors are shared, edited ones are new).
    """
    if isinstance(target, nn.Module):
        module = target if inplace else copy.deepcopy(target)
        store = ModuleStore(module)
        with torch.no_grad():
            for key, edit in planner.plan(store).items():
                store.parameter(key).copy_(edit(store.parameter(key).detach()))
        return module
    if not isinstance(target, Mapping):
        raise TypeError(f"target must be an nn.Module or a name→tensor mapping, got {type(target).__name__}")
    out = target if inplace else dict(target)
    for key, edit in planner.plan(open_weights(target, name="target")).items():
        edited = edit(out[key])
        if inplace:
            out[key].copy_(edited)
        else:
            out[key] = edited
    return out


@contextlib.contextmanager
def temporarily_edited(module: nn.Module, planner: Planner) -> Iterator[nn.Module]:
    """Apply ``planner``'s edits to ``module``'s own parameters for the ``with`` block; the exact raw values
    come back after (they wait on the CPU meanwhile: one copy of the edited weights, not of the model)."""
    store = ModuleStore(module)
    saved: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            for key, edit in planner.plan(store).items():
                parameter = store.parameter(key)
                saved[key] = parameter.detach().to("cpu", copy=True)
                parameter.copy_(edit(parameter.detach()))
        yield module
    finally:
        with torch.no_grad():
            for key, raw in saved.items():
                store.parameter(key).copy_(raw)
