"""Lazy ``name → tensor`` views over the places weights live: modules, mappings, safetensors files, HF dirs.

:func:`open_weights` turns whatever the user passed into a :class:`WeightStore`. A store lists its keys and
shapes without loading anything and loads one tensor per :meth:`WeightStore.get`, so the core can stream
through checkpoints larger than memory. Each store also knows, where it can, which keys belong to GPT-2-style
``Conv1D`` modules (weights stored transposed, ``(d_in, d_out)``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lssf_lightning.io.hub import resolve_model
from lssf_lightning.io.layout import PICKLE_SUFFIXES
from lssf_lightning.io.names import canonical_key, module_name
from lssf_lightning.io.shards import SafetensorsReader, index_files

__all__ = [
    "MappingStore",
    "ModuleStore",
    "SafetensorsStore",
    "WeightStore",
    "WeightsLike",
    "find_safetensors",
    "open_weights",
]

WeightsLike = nn.Module | Mapping[str, Tensor] | str | os.PathLike | Sequence[str | os.PathLike]


class WeightStore:
    """Read access to named weights, one tensor at a time."""

    location: str = "<weights>"

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> Tensor:
        """The tensor for ``key`` (may alias live storage for modules: do not modify it in place)."""
        raise NotImplementedError

    def is_conv1d(self, key: str) -> bool:
        """True when ``key`` is a GPT-2-style ``Conv1D`` weight, stored as ``(d_in, d_out)``."""
        return False

    def is_linear(self, key: str) -> bool | None:
        """True/False when the store knows the module type of ``key``, ``None`` when it cannot tell."""
        return None

    def __iter__(self) -> Iterator[str]:
        """The keys, in store order (so ``for key in store`` reads like a mapping)."""
        return iter(self.keys())


class MappingStore(WeightStore):
    """A plain ``{name: tensor}`` mapping (a state dict)."""

    def __init__(self, tensors: Mapping[str, Tensor], location: str = "<state dict>") -> None:
        bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
        if bad:
            raise TypeError(
                f"{location}: value of {bad[0]!r} is {type(tensors[bad[0]]).__name__}, not a Tensor"
            )
        self._tensors = tensors
        self.location = location

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> Tensor:
        return self._tensors[key].detach()


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return Conv1D


class ModuleStore(WeightStore):
    """The parameters of a live ``nn.Module`` (a HF model, a LightningModule, a peft model).

    For a peft LoRA layer that is not merged, :meth:`get` on its ``base_layer`` weight returns the effective
    weight ``W + Σ_adapters scale · B·A`` of the active adapters, so a peft model reads like its merged self
    (the raw weight inside peft's ``disable_adapter()``).
    """

    def __init__(self, module: nn.Module, location: str | None = None) -> None:
        self.module = module
        self.location = location or f"<{type(module).__name__}>"
        # The state dict's tensors (parameters and persistent buffers), each shared tensor once (tied
        # weights).
        self._params: dict[str, Tensor] = {}
        seen: set[int] = set()
        for key, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                self._params[key] = tensor
        self._modules = dict(module.named_modules())

    def keys(self) -> list[str]:
        return list(self._params)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._params[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._params[key].dtype

    def owner(self, key: str) -> nn.Module | None:
        return self._modules.get(module_name(key))

    def lora_layer(self, key: str) -> nn.Module | None:
        """The peft tuner layer wrapping ``key`` when ``key`` is a ``.base_layer.weight``, else ``None``."""
        if not key.endswith(".base_layer.weight"):
            return None
        layer = self._modules.get(key[: -len(".base_layer.weight")])
        return layer if layer is not None and hasattr(layer, "get_delta_weight") else None

    def get(self, key: str) -> Tensor:
        weight = self._params[key].detach()
        layer = self.lora_layer(key)
        if layer is None or getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
            return weight
        deltas = [layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A]
        return weight + sum(d.to(weight.dtype) for d in deltas) if deltas else weight

    def parameter(self, key: str) -> Tensor:
        """The live parameter for ``key`` (what fusion writes into)."""
        return self._params[key]

    def is_conv1d(self, key: str) -> bool:
        conv1d = _conv1d_type()
        return bool(conv1d) and isinstance(self.owner(key), conv1d)

    def is_linear(self, key: str) -> bool | None:
        owner = self.owner(key)
        if owner is None:
            return None
        conv1d = _conv1d_type()
        return isinstance(owner, nn.Linear) or (bool(conv1d) and isinstance(owner, conv1d))


def find_safetensors(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a file, a HF model directory (via its index when present) or a peft adapter.

    Raises:
        FileNotFoundError: the path does not exist or holds no safetensors file.
        ValueError: the path is a pickled checkpoint, which is never loaded.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise ValueError(
                f"{path} is a pickled checkpoint; lssf_lightning reads safetensors only (pickles can run "
                "code). Convert it with `model.save_pretrained(dir, safe_serialization=True)`."
            )
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return index_files(index)  # validated: weight_map present, shards plain files of this directory
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    hint = (
        f" It holds {pickles[:3]}: pickled checkpoints are not loaded; re-save with safe_serialization=True."
        if pickles
        else ""
    )
    raise FileNotFoundError(f"no *.safetensors file in {path}.{hint}")


class SafetensorsStore(WeightStore):
    """Safetensors file(s) or a HF model directory; tensors are read one at a time, never memory-mapped.

    When the directory has a ``config.json``, the model is built on the ``meta`` device (no memory) to learn
    which weights are ``Conv1D`` and which are linear layers.
    """

    def __init__(self, path: str | os.PathLike | list[str | os.PathLike]) -> None:
        paths = (
            [Path(p).expanduser() for p in path]
            if isinstance(path, (list, tuple))
            else [Path(path).expanduser()]
        )
        files = [f for p in paths for f in find_safetensors(p)]
        self.location = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more)"
        self.directory = paths[0] if len(paths) == 1 and paths[0].is_dir() else None
        self.reader = SafetensorsReader(files)
        self._paths = [*paths, *files]
        self._kinds: dict[str, str] | None = None

    def keys(self) -> list[str]:
        return self.reader.keys()

    def input_paths(self) -> list[Path]:
        """The paths read (what an output must not overlap: see :mod:`lssf_lightning.io.guard`)."""
        return list(self._paths)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.reader.entries[key].dtype

    def get(self, key: str) -> Tensor:
        return self.reader.get(key)

    def _module_kinds(self) -> dict[str, str]:
        if self._kinds is None:
            self._kinds = _kinds_from_config(self.directory) if self.directory else {}
        return self._kinds

    def _kind(self, key: str) -> str | None:
        return self._module_kinds().get(canonical_key(module_name(key)))

    def is_conv1d(self, key: str) -> bool:
        return self._kind(key) == "conv1d"

    def is_linear(self, key: str) -> bool | None:
        kinds = self._module_kinds()
        if not kinds:
            return None
        kind = self._kind(key)
        return None if kind is None else kind in ("linear", "conv1d")


def _kinds_from_config(directory: Path) -> dict[str, str]:
    """``{module name: "linear" | "conv1d" | "other"}`` from a meta-device model built from
    ``config.json``."""
    if not (directory / "config.json").is_file():
        return {}
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - any architecture transformers cannot build: fall back to name rules
        return {}
    conv1d = _conv1d_type()
    kinds = {}
    for name, module in model.named_modules():
        if conv1d and isinstance(module, conv1d):
            kinds[name] = "conv1d"
        elif isinstance(module, nn.Linear):
            kinds[name] = "linear"
        else:
            kinds[name] = "other"
    # Saved checkpoints may drop the base-model prefix (``transformer.``): index by every dotted suffix too.
    return {**{n.split(".", 1)[1]: k for n, k in kinds.items() if "." in n}, **kinds}


def open_weights(source: WeightsLike | WeightStore, *, name: str = "weights") -> WeightStore:
    """A :class:`WeightStore` for an ``nn.Module``, a ``{name: Tensor}`` mapping, or a path (file, list, HF
    dir).

    Args:
        source: where the weights are.
        name: what the weights are, for error messages (e.g. ``"unaligned"``).

    Raises:
        FileNotFoundError: a path that does not exist or holds no safetensors.
        TypeError: anything else.
    """
    if isinstance(source, WeightStore):
        return source
    if isinstance(source, nn.Module):
        return ModuleStore(source, location=f"{name} <{type(source).__name__}>")
    if isinstance(source, Mapping):
        return MappingStore(source, location=f"{name} <state dict>")
    if isinstance(source, (str, os.PathLike, list, tuple)):
        source = resolve_model(source, what=name) if isinstance(source, str) else source  # hub IDs: io/hub.py
        try:
            return SafetensorsStore(source)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{name}: {err}") from None
    raise TypeError(
        f"{name} must be an nn.Module, a name→tensor mapping or a path to safetensors / a HF model "
        f"directory, got {type(source).__name__}"
    )
