"""peft LoRA adapters on disk: read the factors, and view ``base + adapter`` as merged weights, lazily.

A peft adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. The merged weight of a module is
``W + s·B·A`` with ``s = lora_alpha / r`` (``lora_alpha / √r`` with rsLoRA), per-module overrides from
``rank_pattern`` / ``alpha_pattern``, transposed for ``fan_in_fan_out`` (GPT-2 ``Conv1D``) layers.

Tensors an adapter trains in full (``modules_to_save``, e.g. ``base_model.model.lm_head.weight``; trained
biases) replace the base's, as peft's ``merge_and_unload`` does. Trained tensors of other kinds
(``lora_bias``'s ``lora_B.bias``, ``trainable_token_indices``' deltas, embedding LoRA) are refused when the
adapter is merged: nothing an adapter trains is left out of the merged weights silently.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lssf_lightning.io.names import KeyMatcher, canonical_key
from lssf_lightning.io.schema import FormatError, field, load_json
from lssf_lightning.io.shards import SafetensorsReader
from lssf_lightning.io.weights import WeightStore, find_safetensors

__all__ = ["LoraAdapter", "LoraFactors", "MergedLoraStore", "is_adapter_dir"]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(\.[^.]+)?\.weight$")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a peft adapter directory (it has ``adapter_config.json``)."""
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file()


@dataclass
class LoraFactors:
    """One adapted module: ``ΔW = scale · B @ A`` (in the module's stored layout unless
    ``fan_in_fan_out``)."""

    a: Tensor
    b: Tensor
    scale: float
    fan_in_fan_out: bool = False

    def delta(self) -> Tensor:
        """``scale · B @ A`` in the weight's stored layout, float32."""
        product = self.scale * (self.b.float() @ self.a.float())
        return product.T if self.fan_in_fan_out else product


class LoraAdapter:
    """The LoRA factors of a saved peft adapter, keyed by canonical module name
    (``model.layers.0.mlp.up_proj``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        if not is_adapter_dir(self.path):
            raise FileNotFoundError(f"{self.path} is not a peft adapter directory (no adapter_config.json)")
        self.config = _read_config(self.path / "adapter_config.json")
        peft_type = self.config["peft_type"]
        if peft_type != "LORA":
            raise ValueError(f"{self.path}: adapter type {peft_type} is not supported, only LORA")
        if self.config["use_dora"]:
            raise ValueError(f"{self.path}: DoRA adapters are not supported; merge it with peft first")
        reader = SafetensorsReader(find_safetensors(self.path))
        pieces: dict[str, dict[str, str]] = {}
        self._full: dict[str, str] = {}  # canonical weight name → key of a tensor trained in full
        self.unmergeable: list[str] = []  # trained tensors that are neither LoRA factors nor whole weights
        for key in reader.entries:
            found = _LORA_KEY.match(key)
            if found:
                pieces.setdefault(canonical_key(found["module"]), {})[found["which"]] = key
            elif "lora_" in key or "token_adapter" in key or "trainable_tokens" in key:
                self.unmergeable.append(key)
            else:
                self._full[canonical_key(key)] = key
        incomplete = [m for m, p in pieces.items() if set(p) != {"A", "B"}]
        if incomplete:
            raise ValueError(f"{self.path}: LoRA layer {incomplete[0]} lacks its A or B factor")
        if not pieces:
            raise ValueError(f"{self.path}: no LoRA factors (lora_A / lora_B weights) found")
        for module, keys in pieces.items():
            a, b = reader.entries[keys["A"]].shape, reader.entries[keys["B"]].shape
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise FormatError(reader.entries[keys["A"]].file, f"LoRA layer {module}: factor shapes "
                                  f"disagree: lora_A {list(a)} must be (r, d_in) and lora_B {list(b)} "
                                  "(d_out, r)")
        self._reader = reader
        self._pieces = pieces

    @property
    def base_model_path(self) -> str | None:
        return self.config["base_model_name_or_path"]

    def modules(self) -> list[str]:
        return list(self._pieces)

    def full_tensors(self) -> list[str]:
        """The weights the adapter trains in full (``modules_to_save``, biases), canonical names."""
        return list(self._full)

    def full_tensor(self, name: str) -> Tensor:
        """The trained tensor ``name`` (one of :meth:`full_tensors`)."""
        return self._reader.get(self._full[name])

    def factors(self, module: str) -> LoraFactors:
        keys = self._pieces[module]
        a, b = self._reader.get(keys["A"]), self._reader.get(keys["B"])
        rank = a.shape[0]
        default_alpha = rank if self.config["lora_alpha"] is None else self.config["lora_alpha"]
        alpha = _pattern_value(self.config["alpha_pattern"] or {}, module, default_alpha)
        scale = alpha / math.sqrt(rank) if self.config["use_rslora"] else alpha / rank
        return LoraFactors(a, b, float(scale), self.config["fan_in_fan_out"])


# adapter_config.json fields this module reads, with their types and defaults (peft's defaults).
_CONFIG_FIELDS: dict[str, tuple[tuple[type, ...], object]] = {
    "peft_type": ((str,), "LORA"),
    "use_dora": ((bool,), False),
    "use_rslora": ((bool,), False),
    "fan_in_fan_out": ((bool,), False),
    "lora_alpha": ((float, type(None)), None),
    "alpha_pattern": ((dict, type(None)), None),
    "base_model_name_or_path": ((str, type(None)), None),
}


def _read_config(path: Path) -> dict:
    """``adapter_config.json`` checked against the fields above (other fields are kept unchecked)."""
    config = load_json(path)
    if not isinstance(config, dict):
        raise FormatError(path, f"must hold a JSON object, got {type(config).__name__}")
    config = dict(config)
    for name, (kinds, default) in _CONFIG_FIELDS.items():
        config[name] = field(path, config, name, kinds, default=default)
    for pattern in config["alpha_pattern"] or {}:
        field(path, config["alpha_pattern"], pattern, float, where="alpha_pattern")
        try:
            re.compile(pattern)
        except re.error as err:
            problem = f"alpha_pattern key {pattern!r} is not a valid regular expression ({err})"
            raise FormatError(path, problem) from None
    return config


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return value
    return default


class MergedLoraStore(WeightStore):
    """``base`` with an adapter's ``s·B·A`` added to each adapted weight, computed when the weight is read,
    and the tensors it trains in full (``modules_to_save``) in place of the base's."""

    def __init__(self, base: WeightStore, adapter: LoraAdapter) -> None:
        self.base = base
        self.adapter = adapter
        self.location = f"{base.location} + adapter {adapter.path}"
        matcher = KeyMatcher([m + ".weight" for m in adapter.modules()])
        self._module_of = {k: matcher.match(k)[: -len(".weight")] for k in base.keys() if matcher.match(k)}  # noqa: SIM118
        unmatched = set(adapter.modules()) - set(self._module_of.values())
        if unmatched:
            raise ValueError(
                f"adapter {adapter.path} adapts modules that {base.location} lacks, "
                f"e.g. {sorted(unmatched)[:3]}"
            )
        if adapter.unmergeable:
            raise ValueError(f"adapter {adapter.path} trains {adapter.unmergeable[0]}, which lssf_lightning "
                             "cannot merge into the weights; merge the adapter with peft's "
                             "merge_and_unload() and pass the merged model")
        full = KeyMatcher(adapter.full_tensors())
        self._replaced = {k: full.match(k) for k in base.keys() if full.match(k)}  # noqa: SIM118
        missing = sorted(set(adapter.full_tensors()) - set(self._replaced.values()))
        if missing:
            raise ValueError(f"adapter {adapter.path} trains {missing[0]} (modules_to_save), which "
                             f"{base.location} does not store (tied to another weight?); merge the adapter "
                             "with peft's merge_and_unload() and pass the merged model")

    def keys(self) -> list[str]:
        return self.base.keys()

    def input_paths(self) -> list:
        """The base's paths and the adapter directory (for the output guard)."""
        return [self.base, self.adapter.path]

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
        if key in self._replaced:
            trained = self.adapter.full_tensor(self._replaced[key])
            if tuple(trained.shape) != tuple(self.base.shape(key)):
                shape = tuple(self.base.shape(key))
                raise ValueError(f"adapter {self.adapter.path} trains {self._replaced[key]} with shape "
                                 f"{tuple(trained.shape)}, the base's {key} has {shape}")
            return trained.to(self.base.dtype(key))
        weight = self.base.get(key)
        factors = self.lora_factors(key)
        if factors is None:
            return weight
        delta = factors.delta()
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(f"adapter update for {key} has shape {tuple(delta.shape)}, "
                             f"weight {tuple(weight.shape)}")
        return (weight.float() + delta).to(weight.dtype)
