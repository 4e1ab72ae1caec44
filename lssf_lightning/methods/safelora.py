"""SafeLoRA (Hsu et al., NeurIPS 2024) as a planner: project the LoRA updates that point away from safety.

The per-layer math is :func:`lssf_lightning.core.baselines.safelora_project`; this module finds the LoRA
factors in a live peft model or a peft adapter directory and plans the edits.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lssf_lightning.config import DEFAULT_THRESHOLD
from lssf_lightning.core.baselines import safelora_project
from lssf_lightning.io.lora import MergedLoraStore
from lssf_lightning.io.names import KeyMatcher, canonical_key
from lssf_lightning.io.weights import ModuleStore, WeightsLike, WeightStore, open_weights
from lssf_lightning.methods.base import Edit, apply_edits
from lssf_lightning.methods.spec import MethodInputs, MethodSpec, Param
from lssf_lightning.validation import SettingError, check_cosine

__all__ = ["SPEC", "SafeLoRA", "safelora"]

THRESHOLD = Param(
    "threshold", float, DEFAULT_THRESHOLD, "SafeLoRA's cosine threshold tau", low=-1.0, high=1.0
)


class SafeLoRA:
    """SafeLoRA: project each LoRA update whose cosine with its projection onto the safety vector is ``≤ τ``.

    Works on a live peft model (``lora_B`` is replaced by ``C·B``) and on a checkpoint read through a
    :class:`~lssf_lightning.io.lora.MergedLoraStore` (the merged weight ``W + s·B'·A`` is written).

    Args:
        aligned: the aligned model (module, mapping or path).
        unaligned: its unaligned counterpart.
        threshold: ``τ``; layers with cosine ``≤ τ`` are projected.
    """

    def __init__(
        self, aligned: WeightsLike, unaligned: WeightsLike, threshold: float = DEFAULT_THRESHOLD
    ) -> None:
        self.aligned = open_weights(aligned, name="aligned")
        self.unaligned = open_weights(unaligned, name="unaligned")
        self._unaligned_keys = KeyMatcher(self.unaligned.keys())
        self._aligned_keys = KeyMatcher(self.aligned.keys())
        self.threshold = check_cosine("threshold", threshold)
        self.cosines: dict[str, float] = {}
        self.projected: dict[str, bool] = {}

    def _safety_vector(self, key: str, conv1d: bool) -> Tensor:
        aligned_key, unaligned_key = self._aligned_keys.match(key), self._unaligned_keys.match(key)
        if aligned_key is None or unaligned_key is None:
            raise ValueError(
                f"LoRA layer {key} has no counterpart in {self.aligned.location} / {self.unaligned.location}"
            )
        delta = self.aligned.get(aligned_key).float() - self.unaligned.get(unaligned_key).float()
        return delta.T if conv1d else delta

    def _project(self, key: str, a: Tensor, b: Tensor, conv1d: bool) -> Tensor:
        new_b, cosine, projected = safelora_project(a, b, self._safety_vector(key, conv1d), self.threshold)
        name = canonical_key(key)
        self.cosines[name], self.projected[name] = cosine, projected
        return new_b

    def plan(self, target: WeightStore) -> dict[str, Edit]:
        """``{key: edit}`` of the LoRA layers of ``target`` (a peft model or an adapter read merged)."""
        if isinstance(target, MergedLoraStore):
            return self._plan_merged(target)
        if isinstance(target, ModuleStore):
            return self._plan_module(target)
        raise ValueError("SafeLoRA needs LoRA factors: pass a peft model or a peft adapter directory")

    def summary(self) -> dict[str, Any]:
        """``τ`` and how many layers were projected (filled in as the edits run)."""
        return {
            "threshold": self.threshold,
            "projected": f"{sum(self.projected.values())}/{len(self.projected)} layers",
        }

    def _plan_merged(self, target: MergedLoraStore) -> dict[str, Edit]:
        edits = {}
        for key in target:
            factors = target.lora_factors(key)
            if factors is None:
                continue

            def edit(weight: Tensor, key=key, factors=factors) -> Tensor:
                conv1d = factors.fan_in_fan_out
                new_b = self._project(key, factors.a.float(), factors.b.float(), conv1d)
                base = target.base.get(key).float()
                update = factors.scale * (new_b.float() @ factors.a.float())
                return (base + (update.T if conv1d else update)).to(weight.dtype)

            edits[key] = edit
        if not edits:
            raise ValueError(f"{target.location} has no LoRA layers")
        return edits

    def _plan_module(self, target: ModuleStore) -> dict[str, Edit]:
        edits = {}
        for key in target:
            layer = target.lora_layer(key)
            if layer is None:
                continue
            conv1d = bool(getattr(layer, "fan_in_fan_out", False))
            for adapter in layer.active_adapters:
                if adapter not in layer.lora_A:
                    continue
                a = layer.lora_A[adapter].weight
                b_full_key = f"{key[: -len('base_layer.weight')]}lora_B.{adapter}.weight"

                def edit(b: Tensor, key=key, a=a, conv1d=conv1d) -> Tensor:
                    return self._project(key, a.detach().float(), b.float(), conv1d).to(b.dtype)

                edits[b_full_key] = edit
        if not edits:
            raise ValueError(f"{target.location} has no active LoRA layers")
        return edits


def safelora(target, aligned, unaligned, *, threshold=DEFAULT_THRESHOLD, inplace=False):
    """SafeLoRA on a peft LoRA model; returns ``(model, {layer: projected})`` (see :class:`SafeLoRA`)."""
    planner = SafeLoRA(aligned, unaligned, threshold)
    return apply_edits(target, planner, inplace), dict(planner.projected)


def _factory(inputs: MethodInputs) -> SafeLoRA:
    inputs.require_pair("safelora")
    if inputs.finetuned is not None and not isinstance(inputs.finetuned, MergedLoraStore):
        raise SettingError(
            f"safelora needs a LoRA run: {inputs.finetuned.location} is not a peft adapter directory"
        )
    return SafeLoRA(inputs.aligned, inputs.unaligned, inputs.options["threshold"])


SPEC = MethodSpec(
    "safelora", _factory, (THRESHOLD,), grid=((0.5,),), lora_only=True,
    help="SafeLoRA: project the LoRA updates that point away from safety (LoRA runs only)",
)
