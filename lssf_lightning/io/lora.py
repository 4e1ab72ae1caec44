"""peft LoRA adapters on disk: read the factors, and view ``base + adapter`` as merged weights, lazily.

A peft adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. The merged weight of a module is
``W + s·B·A`` with ``s = lora_alpha / r`` (``lora_alpha / √r`` with rsLoRA), per-module overrides from
``rank_pattern`` / ``alpha_pattern``, transposed for ``fan_in_fan_out`` (GPT-2 ``Conv1D``) layers.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lssf_lightning.io.names import KeyMatcher, canonical_key
from lssf_lightning.io.shards import SafetensorsReader
from lssf_lightning.io.weights import WeightStore, find_safetensors

__all__ = ["LoraAdapter", "LoraFactors", "MergedLoraStore", "is_adapter_dir"]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(\.[^.]+)?\.weight$")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a peft adapter directory (it has ``adapter_config.json``)."""
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file()


@dataclass
class LoraFactors:
    """One adapted module: ``ΔW = scale · B @ A`` (in the module's stored layout unless ``fan_in_fan_out``)."""

    a: Tensor
    b: Tensor
    scale: float
    fan_in_fan_out: bool = False

    def delta(self) -> Tensor:
        """``scale · B @ A`` in the weight's stored layout, float32."""
        product = self.scale * (self.b.float() @ self.a.float())
        return product.T if self.fan_in_fan_out else product


class LoraAdapter:
    """The LoRA factors of a saved peft adapter, keyed by canonical module name (``model.layers.0.mlp.up_proj``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        if not is_adapter_dir(self.path):
            raise FileNotFoundError(f"{self.path} is not a peft adapter directory (no adapter_config.json)")
        self.config = json.loads((self.path / "adapter_config.json").read_text())
        peft_type = self.config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"{self.path}: adapter type {peft_type} is not supported, only LORA")
        if self.config.get("use_dora"):
            raise ValueError(f"{self.path}: DoRA adapters are not supported; merge it with peft first")
        reader = SafetensorsReader(find_safetensors(self.path))
        pieces: dict[str, dict[str, str]] = {}
        for key in reader.keys():
            found = _LORA_KEY.match(key)
            if found:
                pieces.setdefault(canonical_key(found["module"]), {})[found["which"]] = key
        incomplete = [m for m, p in pieces.items() if set(p) != {"A", "B"}]
        if incomplete:
            raise ValueError(f"{self.path}: LoRA layer {incomplete[0]} lacks its A or B factor")
        if not pieces:
            raise ValueError(f"{self.path}: no LoRA factors (lora_A / lora_B weights) found")
        self._reader = reader
        self._pieces = pieces

    @property
    def base_model_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def modules(self) -> list[str]:
        return list(self._pieces)

    def factors(self, module: str) -> LoraFactors:
        keys = self._pieces[module]
        a, b = self._reader.get(keys["A"]), self._reader.get(keys["B"])
        rank = a.shape[0]
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        return LoraFactors(a, b, float(scale), bool(self.config.get("fan_in_fan_out", False)))


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return value
    return default


class MergedLoraStore(WeightStore):
    """``base`` with an adapter's ``s·B·A`` added to each adapted weight, computed when the weight is read."""

    def __init__(self, base: WeightStore, adapter: LoraAdapter) -> None:
        self.base = base
        self.adapter = adapter
        self.location = f"{base.location} + adapter {adapter.path}"
        matcher = KeyMatcher([m + ".weight" for m in adapter.modules()])
        self._module_of = {k: matcher.match(k)[: -len(".weight")] for k in base.keys() if matcher.match(k)}
        unmatched = set(adapter.modules()) - set(self._module_of.values())
        if unmatched:
            raise ValueError(
                f"adapter {adapter.path} adapts modules that {base.location} lacks, e.g. {sorted(unmatched)[:3]}"
            )

    def keys(self) -> list[str]:
        return self.base.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)

    def is_conv1d(self, key: str) -> bool:
        return self.base.is_conv1d(key)

    def is_linear(self, key: str) -> bool | None:
        return self.base.is_linear(key)

    def lora_factors(self, key: str) -> LoraFactors | None:
        module = self._module_of.get(key)
        return self.adapter.factors(module) if module else None

    def get(self, key: str) -> Tensor:
        weight = self.base.get(key)
        factors = self.lora_factors(key)
        if factors is None:
            return weight
        delta = factors.delta()
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(f"adapter update for {key} has shape {tuple(delta.shape)}, weight {tuple(weight.shape)}")
        return (weight.float() + delta).to(weight.dtype)
