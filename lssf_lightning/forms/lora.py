"""The forms on a peft LoRA model: the weight a form reads is the merged one, ``base + Σ s·B·A``.

A LoRA run trains the adapters; the base weights stay frozen. Every form other than the per-step guard
(:class:`~lssf_lightning.forms.LoraHoldOut`) reads the merged weight of each adapted matrix and puts its
correction into the frozen ``base_layer.weight``: ``base ← (base − A) + C(merged − A)``, with ``A`` the
correction the base already carries (tracked as factors, :class:`~lssf_lightning.forms.AppliedForms`), so the
merged weight becomes the form of (merged − A) and the adapters are left as they are. A checkpoint holds
``base + C(merged)`` (and the factors and fix-ups that give the raw base back); an export the merged form.

:class:`LoraUpdate` is what a form needs of one adapted matrix: the dense update (one matrix at a time, for
the forms that read the whole weight) and its ``r × d_in`` coordinates ``U'ᵀ·s·B·A = s·(U'ᵀB)·A`` (rank-sized,
for the reset and the erosion). Nothing copies the model.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from lssf_lightning.validation import SettingError

LORA_SUFFIX = ".base_layer.weight"


class LoraUpdate:
    """The active adapters' update ``Σ s·B·A`` of one peft LoRA layer, read from its live factors."""

    def __init__(self, layer: nn.Module, fan_in_fan_out: bool) -> None:
        self.layer, self.fan_in_fan_out = layer, fan_in_fan_out

    def _factors(self) -> list[tuple[Tensor, Tensor, float]]:
        layer = self.layer
        if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
            return []
        return [(layer.lora_B[name].weight.detach(), layer.lora_A[name].weight.detach(),
                 float(layer.scaling[name])) for name in layer.active_adapters if name in layer.lora_A]

    def dense(self, like: Tensor) -> Tensor | None:
        """``Σ s·B·A`` in the stored layout and dtype of ``like`` (the base weight), or ``None``."""
        total = None
        for b, a, scale in self._factors():
            product = scale * (b.to(like.device, like.dtype) @ a.to(like.device, like.dtype))
            total = product if total is None else total + product
        if total is None:
            return None
        return total.T if self.fan_in_fan_out else total

    def coordinates(self, left: Tensor) -> Tensor | None:
        """``U'ᵀ·Σ s·B·A`` (``r × d_in``, the matrix layout; ``left``: ``U'``, its device and dtype), or
        ``None``."""
        total = None
        for b, a, scale in self._factors():
            product = scale * ((left.T @ b.to(left.device, left.dtype)) @ a.to(left.device, left.dtype))
            total = product if total is None else total + product
        return total


def lora_updates(module: nn.Module, keys: Iterable[str]) -> dict[str, LoraUpdate]:
    """``{key: LoraUpdate}`` for the keys (state-dict names in ``module``) that are the ``base_layer.weight``
    of a peft LoRA layer; a DoRA layer is refused (its merged weight is not a low-rank update)."""
    modules = dict(module.named_modules())
    updates = {}
    for key in keys:
        layer = modules.get(key[: -len(LORA_SUFFIX)]) if key.endswith(LORA_SUFFIX) else None
        if layer is None or not isinstance(getattr(layer, "lora_A", None), nn.ModuleDict):
            continue
        if any((getattr(layer, "use_dora", None) or {}).get(name) for name in layer.lora_A):
            raise SettingError(f"{key[: -len(LORA_SUFFIX)]} is a DoRA layer: a form other than the paper's "
                               "needs plain LoRA adapters (or the merged model)")
        updates[key] = LoraUpdate(layer, bool(getattr(layer, "fan_in_fan_out", False)))
    return updates


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model (its adapters' base is ``model.get_base_model()``)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


PEFT_BASE = "base_model.model"
"""Where a peft model holds the model it adapts (``get_base_model()``): its keys lack this prefix."""

