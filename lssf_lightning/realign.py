"""Post-hoc realignment of a fine-tuned Hugging Face checkpoint, streamed tensor by tensor.

``realign_checkpoint`` reads the fine-tuned model's safetensors one tensor at a time, edits the targeted
matrices with the planner of a registered method (:mod:`lssf_lightning.methods`: LSSF, RESTA, SafeLoRA, …;
one path for all, no branch per method), and writes a complete model directory — sharded safetensors, index,
config, generation config and tokenizer files — into a temporary sibling that is renamed into place at the
end. Peak memory is a few tensors (plus the factors of a precomputed subspace), whatever the model's size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lssf_lightning.adapters import AdapterReport, write_lora_adapter
from lssf_lightning.config import SubspaceConfig
from lssf_lightning.io.export import copy_support_files, write_model_directory
from lssf_lightning.io.guard import check_output
from lssf_lightning.io.hub import is_hub_id, resolve_model
from lssf_lightning.io.layout import MAX_SHARD_BYTES
from lssf_lightning.io.lora import LoraAdapter, MergedLoraStore, is_adapter_dir
from lssf_lightning.io.shards import parse_shard_size
from lssf_lightning.io.subspace_file import read_subspace_header
from lssf_lightning.io.weights import WeightStore, open_weights
from lssf_lightning.methods.base import LowRankPlanner
from lssf_lightning.methods.registry import check_options, make_planner
from lssf_lightning.methods.spec import MethodInputs
from lssf_lightning.subspace import SafetySubspace
from lssf_lightning.validation import SettingError

__all__ = [
    "RealignReport",
    "check_model_types",
    "check_settings_from_file",
    "open_finetuned",
    "realign_as_adapter",
    "realign_checkpoint",
]


@dataclass
class RealignReport:
    """What :func:`realign_checkpoint` did."""

    method: str
    output: Path
    tensors: int
    edited: int  # tensors the method planned an edit for
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    changed: int | None = None  # of those, tensors whose written values differ from the input's

    def __str__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items())
        changed = self.edited if self.changed is None else self.changed
        unchanged = f"; {self.edited - changed} planned edits changed nothing" * (changed < self.edited)
        return (
            f"{self.method}: edited {changed} of {self.tensors} tensors{unchanged} in {self.seconds:.1f} s "
            f"→ {self.output}" + (f" ({extra})" if extra else "")
        )


def open_finetuned(
    finetuned: str | os.PathLike, aligned: str | os.PathLike | None
) -> tuple[WeightStore, list]:
    """The fine-tuned weights and the directories to copy config/tokenizer files from.

    A peft adapter directory is read as ``base + s·B·A``, its base being ``aligned`` (the model the LoRA run
    started from) or, without it, the adapter's ``base_model_name_or_path`` when that is a local directory.
    """
    path = (
        resolve_model(finetuned, what="finetuned")
        if isinstance(finetuned, str)
        else Path(finetuned).expanduser()
    )
    if not is_adapter_dir(path):
        store = open_weights(path, name="finetuned")
        return store, [path if path.is_dir() else path.parent]
    adapter = LoraAdapter(path)
    base = aligned if aligned is not None else adapter.base_model_path
    base = resolve_model(base, what="adapter base") if is_hub_id(base) else base  # org/name: io/hub.py
    if base is None or not Path(base).expanduser().exists():
        raise FileNotFoundError(
            f"finetuned {path} is a LoRA adapter; its base model {base!r} is not a local directory: "
            "pass --aligned"
        )
    base_store = open_weights(base, name="adapter base")
    return MergedLoraStore(base_store, adapter), [path, Path(base)]


def realign_checkpoint(
    finetuned: str | os.PathLike,
    output: str | os.PathLike,
    *,
    aligned: str | os.PathLike | None = None,
    unaligned: str | os.PathLike | None = None,
    method: str = "lssf",
    subspace: SafetySubspace | str | os.PathLike | None = None,
    config: SubspaceConfig | Mapping[str, Any] | None = None,
    max_shard_bytes: int | str = MAX_SHARD_BYTES,
    overwrite: bool = False,
    allow_partial: bool = False,
    progress: bool = True,
    **options: Any,
) -> RealignReport:
    """Write a realigned copy of ``finetuned`` to ``output`` (a HF model directory).

    Args:
        finetuned: the fine-tuned model: a HF directory, safetensors file(s), or a peft LoRA adapter
            directory.
        output: the directory to write; must not exist unless ``overwrite``.
        aligned: the aligned model directory (needed unless ``subspace`` is given for ``lssf``).
        unaligned: the unaligned counterpart (same).
        method: a registered method (:data:`~lssf_lightning.methods.registry.METHODS`): ``"lssf"``
            (``W + α·P'δ``), ``"resta"`` (``W + β·DARE(δ)``), ``"safelora"`` (LoRA adapters only), …
        subspace: a precomputed :class:`SafetySubspace` or its file (``lssf``); otherwise the subspace is
            built from ``aligned``/``unaligned`` with ``config``, one matrix at a time as the weights stream
            past.
        config: the subspace settings (:class:`~lssf_lightning.config.SubspaceConfig` or a mapping); its
            ``target_modules`` / ``exclude_modules`` also select RESTA's weights.
        max_shard_bytes: size of the output shards: bytes, or ``"2GB"`` (decimal) / ``"2GiB"`` (binary).
        overwrite: replace an existing ``output`` (atomically).
        allow_partial: edit only the weights all inputs have in common (a warning gives the counts) instead
            of refusing inputs whose targeted weights do not correspond.
        progress: show progress bars.
        options: the parameters ``method`` declares (``alpha=`` for the LSSF forms, ``beta=``, ``drop_rate=``,
            ``seed=`` for RESTA, ``threshold=`` for SafeLoRA, …; see
            :data:`lssf_lightning.methods.registry.METHODS`); one it does not take is an error.
    """
    started = time.perf_counter()
    config = SubspaceConfig.coerce(config)
    options = check_options(method, options)  # before any work: the method's own, in range
    max_shard_bytes = parse_shard_size(max_shard_bytes, "max_shard_bytes")
    output = Path(output).expanduser()
    input_paths = [finetuned, aligned, unaligned, subspace, config.calibration]  # non-paths are ignored
    check_output(output, input_paths, overwrite=overwrite)  # before any work: overlap, existence
    check_settings_from_file(subspace, config)
    store, support_dirs = open_finetuned(finetuned, aligned)
    check_model_types(support_dirs, aligned, subspace)
    inputs = MethodInputs(store, aligned, unaligned, subspace, config, options, allow_partial, progress)
    planner = make_planner(method, inputs)
    if aligned is not None:
        support_dirs.append(Path(aligned))
    edits = planner.plan(store)
    changed: list[str] = []
    tensors = write_model_directory(
        store,
        output,
        edits={key: _noting_change(key, edit, changed) for key, edit in edits.items()},
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        progress=progress,
        inputs=[input_paths, support_dirs],
        write_support_files=lambda staging: _copy_support_files(support_dirs, staging, output),
    )
    if edits and not changed:
        warnings.warn(f"realign changed no tensor: {output} holds the fine-tuned weights unchanged (is the "
                      "safety subspace empty, e.g. aligned and unaligned identical?)", stacklevel=2)
    return RealignReport(
        method, output, tensors, len(edits), time.perf_counter() - started, planner.summary(), len(changed)
    )


def check_settings_from_file(
    subspace: SafetySubspace | str | os.PathLike | None, config: SubspaceConfig
) -> None:
    """A precomputed ``subspace`` brings its own settings (η, …): subspace settings other than the defaults
    are an error naming the value the subspace was built with, never silently ignored."""
    if subspace is None:
        return
    default = SubspaceConfig()
    given = [f.name for f in dataclasses.fields(SubspaceConfig)
             if getattr(config, f.name) != getattr(default, f.name)]
    if not given:
        return
    if isinstance(subspace, SafetySubspace):
        where, metadata = "the given subspace", subspace.metadata
    else:
        where, metadata = os.fspath(subspace), read_subspace_header(subspace)[0]["metadata"]
    built = ", ".join(f"{name} {metadata.get(name, 'not recorded')}" for name in given)
    asked = ", ".join(f"{name} {getattr(config, name)}" for name in given)
    raise SettingError(f"{asked}: a precomputed subspace brings its own settings, and {where} was built with "
                       f"{built}; leave these out, or build a new subspace with them")


def _model_type(directory: str | os.PathLike | None) -> str | None:
    """``model_type`` of the ``config.json`` in a local ``directory`` (``None`` when there is none)."""
    if directory is None or is_hub_id(directory):
        return None
    config = Path(directory).expanduser()
    config = config / "config.json" if config.is_dir() else config.with_name("config.json")
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def check_model_types(finetuned_dirs, aligned, subspace) -> None:
    """Warn when the fine-tuned model's ``model_type`` differs from the aligned model's (``aligned``, or the
    one ``subspace`` was built from, when its recorded location is a local directory): same shapes do not make
    the same architecture."""
    ours = next((t for t in map(_model_type, finetuned_dirs) if t is not None), None)
    if isinstance(subspace, SafetySubspace):
        source = subspace.metadata.get("aligned")
    elif subspace is not None:
        source = read_subspace_header(subspace)[0]["metadata"].get("aligned")
    else:
        source = aligned
    theirs = _model_type(aligned) or (_model_type(source) if isinstance(source, str) else None)
    if ours is not None and theirs is not None and ours != theirs:
        warnings.warn(f"the fine-tuned model is a {ours!r} model but the safety subspace comes from a "
                      f"{theirs!r} model ({aligned or source}): a subspace only fits the architecture it was "
                      "built on, whatever the shapes", stacklevel=3)


def _noting_change(key: str, edit, changed: list[str]):
    """``edit``, appending ``key`` to ``changed`` when the edited tensor differs from the input."""

    def run(raw):
        out = edit(raw)
        if not torch.equal(out.to(raw.dtype), raw):
            changed.append(key)
        return out

    return run


def _copy_support_files(support_dirs, staging, output) -> None:
    if "config.json" not in copy_support_files(support_dirs, staging):
        warnings.warn(f"no config.json found next to the inputs; {output} holds weights only", stacklevel=4)


def realign_as_adapter(
    finetuned: str | os.PathLike,
    output: str | os.PathLike,
    *,
    aligned: str | os.PathLike | None = None,
    unaligned: str | os.PathLike | None = None,
    subspace=None,
    config=None,
    method: str = "lssf",
    max_rank: int | None = None,
    overwrite: bool = False,
    allow_partial: bool = False,
    progress: bool = True,
    **options: Any,
) -> AdapterReport:
    """``lssf-lightning realign --as-adapter``: the correction for ``finetuned`` as a LoRA adapter in
    ``output``.

    A full fine-tune (a HF directory or hub ID) gets the correction alone, to load on it; a peft LoRA adapter
    directory gets ONE adapter with its task LoRA and the correction, to load on its base (``aligned``, else
    the adapter's ``base_model_name_or_path``). ``method`` is one of the LSSF fusion forms (``lssf``,
    ``lssf-reset``, ``lssf-erosion``, ``lssf-two-sided``; its parameters, e.g. ``alpha``, ``add`` or
    ``input_share``, as keywords in ``options``) over ``subspace`` (an object or file) or a subspace built
    from ``aligned`` and ``unaligned`` with ``config``.
    """
    config = SubspaceConfig.coerce(config)
    check_settings_from_file(subspace, config)
    check_output(output, [finetuned, aligned, unaligned, subspace, config.calibration], overwrite=overwrite)
    if subspace is None and (aligned is None or unaligned is None):
        raise SettingError("--as-adapter needs --aligned and --unaligned, or a precomputed --subspace")
    store, support_dirs = open_finetuned(finetuned, aligned)  # a LoRA adapter: base + task LoRA, lazily
    check_model_types(support_dirs, aligned, subspace)
    lora = isinstance(store, MergedLoraStore)
    # A LoRA run's base is its aligned model: --aligned, else the adapter's recorded base (as given: a hub ID
    # stays one in the written adapter_config.json).
    base = (aligned if aligned is not None else store.adapter.base_model_path) if lora else aligned
    inputs = MethodInputs(store, base, unaligned, subspace, config, options, allow_partial, progress)
    planner = make_planner(method, inputs)
    if not isinstance(planner, LowRankPlanner):
        raise SettingError(
            f"--as-adapter writes a low-rank LSSF correction; method {method!r} is not one (use lssf, "
            "lssf-reset, lssf-erosion or lssf-two-sided)"
        )
    settings = {"max_rank": max_rank, "overwrite": overwrite}
    if not lora:
        return write_lora_adapter(planner, output, base_model=finetuned, **settings)
    return write_lora_adapter(planner, output, base_model=base, task_adapter=store.adapter.path, **settings)
