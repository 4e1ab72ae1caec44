"""RESTA and SafeLoRA on the same footing as :class:`~lssf_lightning.subspace.SafetySubspace`.

Each baseline plans per-weight edits against a :class:`~lssf_lightning.io.weights.WeightStore` (``plan``) so that
the same code edits a live model, a state dict, or a checkpoint streamed tensor by tensor.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lssf_lightning.core.baselines import resta_weight, safelora_project
from lssf_lightning.io.lora import MergedLoraStore
from lssf_lightning.io.names import KeyMatcher, canonical_key
from lssf_lightning.io.weights import ModuleStore, WeightsLike, WeightStore, open_weights
from lssf_lightning.subspace import select_target_pairs

__all__ = ["Edit", "Resta", "SafeLoRA", "apply_edits", "resta", "safelora"]

Edit = Callable[[Tensor], Tensor]


def apply_edits(target: nn.Module | Mapping[str, Tensor], planner, inplace: bool = False):
    """Apply ``planner.plan(store)`` to a module (parameters) or a mapping; copy first unless ``inplace``."""
    if isinstance(target, nn.Module):
        module = target if inplace else copy.deepcopy(target)
        store = ModuleStore(module)
        with torch.no_grad():
            for key, edit in planner.plan(store).items():
                store.parameter(key).copy_(edit(store.parameter(key).detach()))
        return module
    out = target if inplace else dict(target)
    for key, edit in planner.plan(open_weights(target, name="target")).items():
        edited = edit(out[key])
        if inplace:
            out[key].copy_(edited)
        else:
            out[key] = edited
    return out


def _seed_for(seed: int, key: str) -> int:
    return (seed + int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little")) % 2**31


class Resta:
    """RESTA: ``W ← W + β·δ`` on every targeted weight, with optional DARE (drop ``p``, rescale ``1/(1−p)``).

    Args:
        aligned: the aligned model (module, mapping or path).
        unaligned: its unaligned counterpart.
        beta: the scale ``β`` of the safety vector.
        drop_rate: DARE drop probability ``p`` in ``[0, 1)``; ``0`` disables DARE.
        seed: DARE's seed (each weight gets its own stream derived from it and its name).
        target_modules: peft-style selection; default: the linear weights of the transformer blocks.
        exclude_modules: peft-style exclusion.
    """

    def __init__(
        self,
        aligned: WeightsLike,
        unaligned: WeightsLike,
        beta: float = 1.0,
        drop_rate: float = 0.0,
        seed: int = 0,
        target_modules: str | Sequence[str] | None = None,
        exclude_modules: str | Sequence[str] | None = None,
    ) -> None:
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        self.aligned = open_weights(aligned, name="aligned")
        self.unaligned = open_weights(unaligned, name="unaligned")
        self.pairs = select_target_pairs(self.aligned, self.unaligned, target_modules, exclude_modules)
        self.beta, self.drop_rate, self.seed = float(beta), float(drop_rate), int(seed)

    def plan(self, target: WeightStore) -> dict[str, Edit]:
        matched = KeyMatcher(self.pairs).match_all(target.keys())
        if not matched:
            raise ValueError(f"no weight of {target.location} matches the targeted weights of {self.aligned.location}")
        return {key: self._edit(name) for key, name in matched.items()}

    def _edit(self, name: str) -> Edit:
        def edit(weight: Tensor) -> Tensor:
            aligned_key, unaligned_key = self.pairs[name]
            delta = self.aligned.get(aligned_key).float() - self.unaligned.get(unaligned_key).float()
            generator = torch.Generator().manual_seed(_seed_for(self.seed, name))
            return resta_weight(weight, delta, self.beta, self.drop_rate, generator)

        return edit


class SafeLoRA:
    """SafeLoRA: project each LoRA update whose cosine with its projection onto the safety vector is ``≤ τ``.

    Works on a live peft model (``lora_B`` is replaced by ``C·B``) and on a checkpoint read through a
    :class:`~lssf_lightning.io.lora.MergedLoraStore` (the merged weight ``W + s·B'·A`` is written).

    Args:
        aligned: the aligned model (module, mapping or path).
        unaligned: its unaligned counterpart.
        threshold: ``τ``; layers with cosine ``≤ τ`` are projected.
    """

    def __init__(self, aligned: WeightsLike, unaligned: WeightsLike, threshold: float = 0.5) -> None:
        self.aligned = open_weights(aligned, name="aligned")
        self.unaligned = open_weights(unaligned, name="unaligned")
        self._unaligned_keys = KeyMatcher(self.unaligned.keys())
        self._aligned_keys = KeyMatcher(self.aligned.keys())
        self.threshold = float(threshold)
        self.cosines: dict[str, float] = {}
        self.projected: dict[str, bool] = {}

    def _safety_vector(self, key: str, conv1d: bool) -> Tensor:
        aligned_key, unaligned_key = self._aligned_keys.match(key), self._unaligned_keys.match(key)
        if aligned_key is None or unaligned_key is None:
            raise ValueError(f"LoRA layer {key} has no counterpart in {self.aligned.location} / {self.unaligned.location}")
        delta = self.aligned.get(aligned_key).float() - self.unaligned.get(unaligned_key).float()
        return delta.T if conv1d else delta

    def _project(self, key: str, a: Tensor, b: Tensor, conv1d: bool) -> Tensor:
        new_b, cosine, projected = safelora_project(a, b, self._safety_vector(key, conv1d), self.threshold)
        name = canonical_key(key)
        self.cosines[name], self.projected[name] = cosine, projected
        return new_b

    def plan(self, target: WeightStore) -> dict[str, Edit]:
        if isinstance(target, MergedLoraStore):
            return self._plan_merged(target)
        if isinstance(target, ModuleStore):
            return self._plan_module(target)
        raise ValueError("SafeLoRA needs LoRA factors: pass a peft model or a peft adapter directory")

    def _plan_merged(self, target: MergedLoraStore) -> dict[str, Edit]:
        edits = {}
        for key in target.keys():
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
        for key in target.keys():
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


def resta(target, aligned, unaligned, *, beta=1.0, drop_rate=0.0, seed=0, target_modules=None,
          exclude_modules=None, inplace=False):
    """RESTA on a module or state dict: ``W + β·DARE(δ)`` on every targeted weight (see :class:`Resta`)."""
    planner = Resta(aligned, unaligned, beta, drop_rate, seed, target_modules, exclude_modules)
    return apply_edits(target, planner, inplace)


def safelora(target, aligned, unaligned, *, threshold=0.5, inplace=False):
    """SafeLoRA on a peft LoRA model; returns ``(model, {layer: projected})`` (see :class:`SafeLoRA`)."""
    planner = SafeLoRA(aligned, unaligned, threshold)
    return apply_edits(target, planner, inplace), dict(planner.projected)
