"""Post-hoc realignment of a fine-tuned Hugging Face checkpoint, streamed tensor by tensor.

``realign_checkpoint`` reads the fine-tuned model's safetensors one tensor at a time, edits the targeted
matrices (LSSF, RESTA or SafeLoRA), and writes a complete model directory — sharded safetensors, index, config,
generation config and tokenizer files — into a temporary sibling that is renamed into place at the end.
Peak memory is a few tensors (plus the factors of a precomputed subspace), whatever the model's size.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lssf_lightning.baselines import Resta, SafeLoRA
from lssf_lightning.io.export import copy_support_files, write_model_directory
from lssf_lightning.io.lora import LoraAdapter, MergedLoraStore, is_adapter_dir
from lssf_lightning.io.weights import WeightStore, open_weights
from lssf_lightning.io.names import KeyMatcher
from lssf_lightning.subspace import SafetySubspace, SubspaceBuilder, fuse_entry, select_target_pairs

__all__ = ["RealignReport", "open_finetuned", "realign_checkpoint"]

Method = Literal["lssf", "resta", "safelora"]


@dataclass
class RealignReport:
    """What :func:`realign_checkpoint` did."""

    method: str
    output: Path
    tensors: int
    edited: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items())
        return (
            f"{self.method}: edited {self.edited} of {self.tensors} tensors in {self.seconds:.1f} s → {self.output}"
            + (f" ({extra})" if extra else "")
        )


def open_finetuned(finetuned: str | os.PathLike, aligned: str | os.PathLike | None) -> tuple[WeightStore, list]:
    """The fine-tuned weights and the directories to copy config/tokenizer files from.

    A peft adapter directory is read as ``base + s·B·A``, its base being ``aligned`` (the model the LoRA run
    started from) or, without it, the adapter's ``base_model_name_or_path`` when that is a local directory.
    """
    path = Path(finetuned).expanduser()
    if not is_adapter_dir(path):
        store = open_weights(path, name="finetuned")
        return store, [path if path.is_dir() else path.parent]
    adapter = LoraAdapter(path)
    base = aligned if aligned is not None else adapter.base_model_path
    if base is None or not Path(base).expanduser().exists():
        raise FileNotFoundError(
            f"finetuned {path} is a LoRA adapter; its base model {base!r} is not a local directory: pass --aligned"
        )
    base_store = open_weights(base, name="adapter base")
    return MergedLoraStore(base_store, adapter), [path, Path(base)]


def realign_checkpoint(
    finetuned: str | os.PathLike,
    output: str | os.PathLike,
    *,
    aligned: str | os.PathLike | None = None,
    unaligned: str | os.PathLike | None = None,
    method: Method = "lssf",
    subspace: SafetySubspace | str | os.PathLike | None = None,
    alpha: float = 1.0,
    eta: float = 0.9,
    alpha_1: float = 1.0,
    source: Literal["weights", "activations"] = "weights",
    calibration: str | None = None,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    max_rank: int | None = None,
    beta: float = 1.0,
    drop_rate: float = 0.0,
    seed: int = 0,
    threshold: float = 0.5,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    progress: bool = True,
) -> RealignReport:
    """Write a realigned copy of ``finetuned`` to ``output`` (a HF model directory).

    Args:
        finetuned: the fine-tuned model: a HF directory, safetensors file(s), or a peft LoRA adapter directory.
        output: the directory to write; must not exist unless ``overwrite``.
        aligned: the aligned model directory (needed unless ``subspace`` is given for ``lssf``).
        unaligned: the unaligned counterpart (same).
        method: ``"lssf"`` (``W + α·P'δ``), ``"resta"`` (``W + β·DARE(δ)``), ``"safelora"`` (LoRA adapters only).
        subspace: a precomputed :class:`SafetySubspace` or its file; otherwise built from ``aligned``/``unaligned``
            with ``eta``, ``alpha_1``, ``source``, ``calibration``, ``target_modules``, ``exclude_modules``, ``max_rank``.
        alpha: LSSF fusion strength.
        beta: RESTA scale; ``drop_rate`` and ``seed`` configure its DARE step.
        threshold: SafeLoRA's ``τ``.
        max_shard_bytes: size of the output shards.
        overwrite: replace an existing ``output`` (atomically).
        progress: show progress bars.
    """
    started = time.perf_counter()
    if method not in ("lssf", "resta", "safelora"):
        raise ValueError(f"method must be 'lssf', 'resta' or 'safelora', got {method!r}")
    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {output} already exists (pass --overwrite to replace it)")
    store, support_dirs = open_finetuned(finetuned, aligned)
    needs_pair = method != "lssf" or subspace is None
    if needs_pair and (aligned is None or unaligned is None):
        raise ValueError(f"method {method!r} needs both --aligned and --unaligned" +
                         ("" if method != "lssf" else " (or a precomputed --subspace)"))
    if aligned is not None:
        support_dirs.append(Path(aligned))
    details: dict[str, Any] = {}
    if method == "lssf":
        if needs_pair:
            # Fail before any SVD when the fine-tuned model lacks the aligned model's target weights.
            select_target_pairs(open_weights(aligned, name="aligned"), store, target_modules, exclude_modules)
        edits, details, ranks = _lssf_edits(store, subspace, aligned, unaligned, alpha, eta, alpha_1, source,
                                            calibration, target_modules, exclude_modules, max_rank, progress)
    elif method == "resta":
        edits = Resta(aligned, unaligned, beta, drop_rate, seed, target_modules, exclude_modules).plan(store)
        details = {"beta": beta, "drop_rate": drop_rate}
    else:
        if not isinstance(store, MergedLoraStore):
            raise ValueError(f"safelora needs a LoRA run: {finetuned} is not a peft adapter directory")
        planner = SafeLoRA(aligned, unaligned, threshold)
        edits = planner.plan(store)
        details = {"threshold": threshold, "projected": planner.projected}
    tensors = write_model_directory(
        store, output, edits=edits, max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress,
        write_support_files=lambda staging: _copy_support_files(support_dirs, staging, output),
    )
    if method == "lssf":
        details["mean_rank"] = round(sum(ranks.values()) / max(len(ranks), 1), 1)
    if method == "safelora":
        details["projected"] = f"{sum(planner.projected.values())}/{len(planner.projected)} layers"
    return RealignReport(method, output, tensors, len(edits), time.perf_counter() - started, details)


def _lssf_edits(store, subspace, aligned, unaligned, alpha, eta, alpha_1, source, calibration, target_modules,
                exclude_modules, max_rank, progress):
    """``{fine-tuned key: edit}``. Without a precomputed subspace each entry is built when its weight streams
    past and dropped after fusing, so only one matrix's factors are ever held."""
    if subspace is None:
        builder = SubspaceBuilder(
            aligned, unaligned, eta=eta, alpha_1=alpha_1, source=source, calibration=calibration,
            target_modules=target_modules, exclude_modules=exclude_modules, max_rank=max_rank, progress=progress,
        )
        names, ranks = builder.names, builder.ranks

        def edit(weight, name):
            return fuse_entry(name, builder.build(name), weight, alpha)
    else:
        if not isinstance(subspace, SafetySubspace):
            subspace = SafetySubspace.load(subspace)
        names, ranks = subspace.keys(), subspace.ranks

        def edit(weight, name):
            return subspace.fuse_tensor(name, weight, alpha)

    matched = KeyMatcher(names).match_all(store.keys())
    missing = set(names) - set(matched.values())
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(names)} subspace matrices have no weight in {store.location} "
            f"(mismatched architectures?), e.g. {sorted(missing)[:3]}"
        )
    edits = {key: (lambda w, name=name: edit(w, name)) for key, name in matched.items()}
    details = {"alpha": alpha}
    # ``ranks`` fills in as the entries are built; the report reads it after the write.
    return edits, details, ranks


def _copy_support_files(support_dirs, staging, output) -> None:
    if "config.json" not in copy_support_files(support_dirs, staging):
        warnings.warn(f"no config.json found next to the inputs; {output} holds weights only", stacklevel=4)
