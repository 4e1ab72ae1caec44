"""Training-time LSSF state shared by the Lightning and the transformers callbacks (no Lightning import).

The pieces a callback composes, each a small function over tensors or a tiny state object:

- :func:`load_or_build_subspace`: the run's :class:`SafetySubspace`, from a cache file when its fingerprint
  matches the inputs, else built (and cached).
- :class:`FusionState`: how much of the fusion strength ``α`` the live weights already carry, so repeated
  applications never stack (each adds only ``target − applied``).
- :func:`fuse_checkpoint`: fuse ``α·U'(U'ᵀδ)`` into a checkpoint's state dict (new tensors: the live weights
  stay raw) and record the raw fix-ups that make a resume exact; :func:`restore_raw` undoes it on resume.
- :func:`realign_in_place`: live realignment; :func:`export_realigned`: a realigned HF model directory through
  :func:`~lssf_lightning.io.export.write_model_directory`; :func:`export_adapter`: the correction as a peft
  LoRA adapter.

Every function takes ``{key: tensor}`` mappings and a ``{key: subspace name}`` match, so a sharded caller can
pass local shards (see :mod:`lssf_lightning.distributed`).
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lssf_lightning import distributed
from lssf_lightning.adapters import write_model_adapter
from lssf_lightning.config import SubspaceConfig
from lssf_lightning.core.basis import add_correction
from lssf_lightning.core.checks import all_finite
from lssf_lightning.io.export import write_model_directory
from lssf_lightning.io.guard import check_output, check_overlap
from lssf_lightning.io.lazy_factors import LazyFactors
from lssf_lightning.io.names import canonical_key, is_adapter_key
from lssf_lightning.io.subspace_file import read_subspace_header
from lssf_lightning.methods import LSSF
from lssf_lightning.methods.base import temporarily_edited
from lssf_lightning.subspace import SafetySubspace
from lssf_lightning.validation import SettingError, check_finite, check_int, check_range

__all__ = [
    "APPLY_ON",
    "CHECKPOINT_INFO_KEY",
    "RAW_FIXUPS_KEY",
    "FusionState",
    "ResumeError",
    "apply_fixup",
    "CACHE_KEEP",
    "build_subspace",
    "cache_file",
    "cache_history_path",
    "check_alpha",
    "check_outputs",
    "check_apply_epochs",
    "checkpoint_info",
    "checkpoint_subspace",
    "disk_backed",
    "export_adapter",
    "export_names",
    "export_realigned",
    "find_cached",
    "fingerprint",
    "fuse_checkpoint",
    "hf_support_files",
    "load_or_build_subspace",
    "make_fixup",
    "matched_keys",
    "model_source",
    "named_tensors",
    "read_cache",
    "realign_in_place",
    "recover_subspace",
    "resolve_epochs",
    "restore_raw",
    "temporarily_fused",
]

RAW_FIXUPS_KEY = "lssf_raw_fixups"
"""Checkpoint key of the raw-weight fix-ups (``{state-dict key: {"index", "value", "checksum"}}``)."""
CHECKPOINT_INFO_KEY = "lssf"
"""Checkpoint key of what was fused: ``alpha_added``, ``applied_alpha``, ``fingerprint``, ``subspace``."""


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed exactly (the message says what changed and what to do)."""


# -- the subspace ------------------------------------------------------------------------------------------
def build_subspace(aligned, unaligned, config: SubspaceConfig, **options: Any) -> SafetySubspace:
    """:meth:`SafetySubspace.from_weights` with ``config`` (``options``: tokenizer, device, progress).

    Under ``torch.distributed`` (every rank calling) the ranks share the SVDs and exchange the factors: the
    same subspace, bit for bit, in about 1/world of the time
    (:func:`distributed.build_subspace_across_ranks`).
    """
    if distributed.world_size() > 1:
        return distributed.build_subspace_across_ranks(aligned, unaligned, config, **options)
    return SafetySubspace.from_weights(aligned, unaligned, config=config, **options)


def fingerprint(aligned, unaligned, config: SubspaceConfig) -> str:
    """The content hash a build of ``config`` on these inputs would record (reads the weights, no SVD)."""
    return SafetySubspace.fingerprint(aligned, unaligned, config=config)


CACHE_KEEP = 8
"""How many subspaces a ``subspace_cache`` keeps: the one at the given path plus up to ``CACHE_KEEP − 1``
earlier ones next to it (``<stem>.fp-<fingerprint[:16]><suffix>``), the oldest (by modification time) removed
first; the one at the given path (the run's own) is never removed."""


def read_cache(cache: str | os.PathLike | None) -> SafetySubspace | None:
    """The subspace saved in ``cache``, or ``None`` when there is no such file."""
    path = Path(cache).expanduser() if cache else None
    return SafetySubspace.load(path) if path is not None and path.is_file() else None


def cache_history_path(cache: str | os.PathLike, fingerprint: str) -> Path:
    """Where the cache ``cache`` keeps the subspace of ``fingerprint`` once another one took its place."""
    path = Path(cache).expanduser()
    return path.with_name(f"{path.stem}.fp-{fingerprint[:16]}{path.suffix}")


def _cache_history(cache: str | os.PathLike) -> list[Path]:
    path = Path(cache).expanduser()
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f"{glob.escape(path.stem)}.fp-*{glob.escape(path.suffix)}")
                  if p.is_file() and not p.is_symlink())


def _file_fingerprint(path: Path) -> str | None:
    try:
        header, _ = read_subspace_header(path)
    except (OSError, ValueError):
        return None
    value = header["metadata"].get("fingerprint")
    return value if isinstance(value, str) else None


def cache_file(cache: str | os.PathLike | None, fingerprint: str | None) -> Path | None:
    """The file of the cache ``cache`` holding the subspace of ``fingerprint`` (the given path or one of the
    earlier subspaces kept next to it), read from the headers only; ``None`` when none holds it."""
    if not cache or not fingerprint:
        return None
    path = Path(cache).expanduser()
    for candidate in (path, cache_history_path(path, fingerprint)):
        if candidate.is_file() and _file_fingerprint(candidate) == fingerprint:
            return candidate
    return None


def find_cached(cache: str | os.PathLike | None, fingerprint: str | None) -> SafetySubspace | None:
    """The subspace of ``fingerprint`` kept by the cache ``cache`` (see :func:`cache_file`), or ``None``."""
    path = cache_file(cache, fingerprint)
    return SafetySubspace.load(path) if path is not None else None


def _keep_previous(cache: Path, fingerprint: str) -> None:
    """Before the subspace of ``fingerprint`` is written to ``cache``: move the subspace there now (another
    fingerprint) next to it under its fingerprint; remove the oldest kept ones beyond :data:`CACHE_KEEP`."""
    previous = _file_fingerprint(cache) if cache.is_file() and not cache.is_symlink() else None
    if previous is not None and previous != fingerprint:
        history = cache_history_path(cache, previous)
        # never over a file that is not that same subspace (a user's file of that name, a link)
        if not history.exists() or (not history.is_symlink() and _file_fingerprint(history) == previous):
            os.replace(cache, history)
    kept = [p for p in _cache_history(cache) if p != cache_history_path(cache, fingerprint)]
    kept.sort(key=lambda p: p.stat().st_mtime_ns)
    for old in kept[: max(len(kept) - (CACHE_KEEP - 1), 0)]:
        if _file_fingerprint(old) is not None:  # only subspace files this cache wrote
            old.unlink()


def disk_backed(subspace: SafetySubspace, cache: str | os.PathLike | None, world_size: int) -> SafetySubspace:
    """``subspace`` over its factors in the cache's file of its fingerprint when several processes train: each
    rank then keeps at most 64 MiB of factors plus the entry (or the shard's block) in hand
    (:class:`~lssf_lightning.io.lazy_factors.LazyFactors`) instead of all of them. ``subspace`` itself for one
    process, without a cache file, or when no cache file holds this subspace (e.g. a cache path local to each
    node of a multi-node run, where rank 0 wrote only its own)."""
    if world_size <= 1:
        return subspace
    path = cache_file(cache, subspace.metadata.get("fingerprint"))
    if path is None:
        return subspace
    factors = LazyFactors(path)
    if factors.metadata.get("fingerprint") != subspace.metadata.get("fingerprint"):
        return subspace
    return SafetySubspace(factors, subspace.metadata)


def load_or_build_subspace(
    aligned,
    unaligned,
    config: SubspaceConfig,
    *,
    cache: str | os.PathLike | None = None,
    cached: SafetySubspace | None = None,
    write_cache: bool = True,
    info: Callable[[str], None] = lambda message: None,
    **options: Any,
) -> SafetySubspace:
    """The subspace of ``aligned − unaligned``: the one in ``cache`` (or ``cached``, already read from it)
    when its fingerprint matches, else one the cache kept from an earlier run with these inputs and settings
    (:func:`find_cached`), else built and written to ``cache`` when ``write_cache`` (e.g. on rank 0 only),
    the subspace it replaces kept next to it (up to :data:`CACHE_KEEP` in all)."""
    cached = cached if cached is not None else read_cache(cache)
    wanted = None  # computed (it reads every target weight) only when the cache holds a subspace
    if cached is not None or (cache is not None and _cache_history(cache)):
        wanted = fingerprint(aligned, unaligned, config)
    if cached is not None and cached.metadata.get("fingerprint") == wanted:
        info(f"LSSF: loaded the safety subspace from {cache} ({cached})")
        return cached
    kept = cache_file(cache, wanted)
    if kept is not None:
        subspace = SafetySubspace.load(kept)
        info(f"LSSF: loaded the safety subspace from {kept} ({subspace})")
        return subspace
    if cached is not None:
        warnings.warn(f"LSSF: {cache} was built from other weights or settings; it is kept as "
                      f"{cache_history_path(cache, str(cached.metadata.get('fingerprint')))} and the "
                      "subspace of this run is built.", stacklevel=2)
    subspace = build_subspace(aligned, unaligned, config, **options)
    info(f"LSSF: built {subspace}")
    if cache is not None and write_cache:
        path = Path(cache).expanduser()
        _keep_previous(path, str(subspace.metadata.get("fingerprint")))
        subspace.save(path, overwrite=True, inputs=[aligned, unaligned])
    return subspace


def matched_keys(subspace: SafetySubspace, keys) -> dict[str, str]:
    """``{state-dict key: subspace name}`` for the non-adapter keys naming a subspace matrix."""
    return subspace.match([k for k in keys if not is_adapter_key(k)])


# -- fusion strength bookkeeping ---------------------------------------------------------------------------
def check_alpha(alpha: Any, allow_auto: bool = False) -> float | str:
    """``alpha`` as a finite float (or ``"auto"`` when ``allow_auto``); the message names both forms."""
    if allow_auto and alpha == "auto":
        return alpha
    try:
        return check_finite("alpha", alpha)
    except SettingError:
        either = " or 'auto'" if allow_auto else ""
        raise SettingError(f"alpha must be a finite number{either}, got {alpha!r}") from None


@dataclass
class FusionState:
    """Fusion strength: ``target`` (what a realigned model carries) and ``applied`` (what the live weights
    already carry). Applications add only ``missing = target − applied``, so they never stack."""

    target: float = 1.0
    applied: float = 0.0

    @property
    def missing(self) -> float:
        """What a checkpoint, an export or the monitor's realigned pass still has to add."""
        return self.target - self.applied


# -- checkpoints -------------------------------------------------------------------------------------------
def fuse_checkpoint(
    state: MutableMapping[str, Tensor],
    subspace: SafetySubspace,
    alpha: float,
    *,
    keep_fixups: bool = True,
    matched: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]] | None:
    """Replace each matched tensor of ``state`` by ``W + α·U'U'ᵀδ`` (a new tensor: the caller's live weights,
    which ``state`` references, stay raw). Returns the raw fix-ups (see :func:`make_fixup`) when
    ``keep_fixups``, else ``None``.

    DTensor values (a sharded state dict under FSDP2, every rank calling): each rank fuses its own shards and
    the fix-ups of all ranks are gathered to rank 0 (a collective), which gets them as one record; others get
    ``None``.
    """
    matched = matched if matched is not None else matched_keys(subspace, state.keys())
    if any(distributed.is_dtensor(state[k]) for k in matched):
        fixups = distributed.fuse_state_shards(state, subspace, alpha, matched=matched,
                                               keep_fixups=keep_fixups)
        return distributed.gather_fixups(fixups) if keep_fixups else None
    fixups = {}
    for key, name in matched.items():
        raw = state[key]
        product = subspace.product(name, raw)
        state[key] = add_correction(raw, product, alpha)
        if not all_finite(state[key]):
            raise ValueError(f"LSSF: the fused checkpoint tensor {key!r} holds NaN or inf (alpha={alpha!r}); "
                             "the checkpoint is not written")
        if keep_fixups:
            fixups[key] = make_fixup(raw, add_correction(state[key], product, -alpha))
    return fixups if keep_fixups else None


def checkpoint_info(subspace: SafetySubspace, fusion: FusionState, config: SubspaceConfig) -> dict[str, Any]:
    """What :func:`restore_raw` needs: the α added, the α already live, the subspace's fingerprint and
    settings."""
    return {"alpha_added": fusion.missing, "applied_alpha": fusion.applied,
            "fingerprint": subspace.metadata.get("fingerprint"), "subspace": config.to_dict()}


def restore_raw(
    parameters: Mapping[str, Tensor],
    subspace: SafetySubspace,
    alpha_added: float,
    fixups: Mapping[str, Mapping[str, Any]] | None,
    *,
    matched: Mapping[str, str] | None = None,
) -> list[str]:
    """Turn the fused weights just loaded into ``parameters`` back into the raw ones, in place:
    ``fused − α·U'U'ᵀδ`` with the stored fix-ups written over. Returns (and warns about) the keys whose
    checksum still differs (the correction was recomputed differently); ``fixups=None``: exact up to rounding
    (warned)."""
    if fixups is None:
        warnings.warn("LSSF: the checkpoint holds no raw-weight fix-ups (keep_raw_fixups=False); resuming "
                      "from realigned weights minus the correction, equal to the raw ones up to rounding.",
                      stacklevel=2)
    matched = matched if matched is not None else matched_keys(subspace, parameters.keys())
    if distributed.is_sharded_fixups(fixups) or any(distributed.is_dtensor(parameters[k]) for k in matched):
        # FSDP2: each rank restores its own shards with the fix-ups saved for that block
        saved_by = fixups.get("world_size", 1) if isinstance(fixups, Mapping) else None
        if distributed.is_sharded_fixups(fixups):
            fixups = distributed.fixups_of_rank(fixups, distributed.global_rank())
        problem = distributed.fixup_layout_mismatch(parameters, fixups, matched)
        if problem:
            raise ResumeError(
                f"{problem} ({saved_by} process(es) saved it, {distributed.world_size()} resume it), so the "
                "raw weights cannot be recovered exactly. Resume with the strategy, number of processes and "
                "sharding the checkpoint was written with, or start a new run from its realigned weights."
            )
        inexact = distributed.restore_raw_shards(parameters, subspace, alpha_added, fixups, matched=matched)
    else:
        inexact = []
        with torch.no_grad():
            for key, name in matched.items():
                fused = parameters[key]
                raw = add_correction(fused, subspace.product(name, fused), -alpha_added)
                if fixups is not None and key in fixups and not apply_fixup(raw, fixups[key]):
                    inexact.append(key)
                fused.copy_(raw)
    if inexact:
        warnings.warn(f"LSSF: {len(inexact)} weights (e.g. {inexact[0]}) came back close to, not exactly, "
                      "their raw values: the correction was recomputed differently (other hardware or "
                      "threads?).", stacklevel=2)
    return inexact


def recover_subspace(
    info: Mapping[str, Any],
    *,
    known: Sequence[SafetySubspace] = (),
    cache: str | os.PathLike | None = None,
    aligned=None,
    unaligned=None,
    **options: Any,
) -> SafetySubspace | None:
    """The subspace with the checkpoint's fingerprint: one of ``known``, one the ``cache`` kept, or a
    rebuild from ``aligned``/``unaligned`` with the settings stored in the checkpoint (only if it reproduces
    the fingerprint); ``None`` when none of these has it."""
    stored = info.get("fingerprint")
    for subspace in known:
        if subspace.metadata.get("fingerprint") == stored:
            return subspace
    cached = find_cached(cache, stored)
    if cached is not None:
        return cached
    settings = info.get("subspace")
    if settings is not None and aligned is not None and unaligned is not None:
        config = SubspaceConfig(**settings)
        if fingerprint(aligned, unaligned, config) == stored:
            return build_subspace(aligned, unaligned, config, **options)
    return None


def checkpoint_subspace(
    info: Mapping[str, Any], current: SafetySubspace, where: Any = "the checkpoint", **recover: Any
) -> SafetySubspace:
    """The subspace a checkpoint (``where``: its path, for the message) was fused with, checked by its
    fingerprint before any weight is touched: ``current`` when the fingerprints agree, else what
    :func:`recover_subspace` finds (``recover``: its arguments). Raises :class:`ResumeError` saying what
    changed when nothing has that fingerprint."""
    stored, now = info.get("fingerprint"), current.metadata.get("fingerprint")
    if stored is None or stored == now:
        return current
    found = recover_subspace(info, **recover)
    if found is not None:
        return found
    changed = "the aligned or unaligned weights"
    if info.get("subspace") is not None:
        settings = SubspaceConfig(**info["subspace"]).hashed_settings()
        differs = [f"{k} {v!r} -> {current.metadata.get(k)!r}" for k, v in settings.items()
                   if current.metadata.get(k) != v]
        changed = ", ".join(differs) or changed
    raise ResumeError(
        f"LSSF cannot resume from {where}: its weights were fused with another safety subspace (fingerprint "
        f"{stored[:12]}, this run {str(now)[:12]}; changed: {changed}), which is not in the cache and cannot "
        "be rebuilt from the given models, so its raw weights cannot be recovered exactly. Resume with the "
        "settings and models the checkpoint was written with (or pass `aligned=` the aligned model's path), "
        "or start a new run from its weights."
    )


def make_fixup(raw: Tensor, recovered: Tensor) -> dict[str, Any]:
    """What turns ``recovered`` (``fused − correction``) back into ``raw`` exactly: the few entries where
    rounding differs (index and raw value) and a checksum of ``raw``."""
    flat_raw, flat_recovered = raw.reshape(-1), recovered.reshape(-1)
    index = torch.nonzero(flat_recovered != flat_raw).squeeze(1)
    return {"index": index.cpu(), "value": flat_raw[index].cpu(), "checksum": _checksum(raw)}


def apply_fixup(recovered: Tensor, fixup: Mapping[str, Any]) -> bool:
    """Write the stored raw entries into ``recovered`` in place; True when the result matches the checksum."""
    flat = recovered.view(-1)
    flat[fixup["index"].to(flat.device)] = fixup["value"].to(device=flat.device, dtype=flat.dtype)
    return _checksum(recovered) == tuple(fixup["checksum"])


def _checksum(tensor: Tensor) -> tuple[float, float]:
    values = tensor.detach().double()
    return float(values.sum()), float(values.square().sum())


# -- live weights and export -------------------------------------------------------------------------------
def realign_in_place(
    parameters: Mapping[str, Tensor],
    subspace: SafetySubspace,
    alpha: float,
    *,
    matched: Mapping[str, str] | None = None,
) -> None:
    """``W ← W + α·U'U'ᵀδ`` for each matched live tensor of ``parameters`` (``alpha``: the missing
    strength)."""
    if alpha == 0:
        return
    matched = matched if matched is not None else matched_keys(subspace, parameters.keys())
    if any(distributed.is_dtensor(parameters[k]) for k in matched):  # FSDP2: rank-local shards, no collective
        distributed.realign_shards_in_place(parameters, subspace, alpha, matched=matched)
        return
    with torch.no_grad():
        for key, name in matched.items():
            parameters[key].copy_(subspace.fuse_tensor(name, parameters[key], alpha))


def export_realigned(
    store,
    directory: str | os.PathLike,
    subspace: SafetySubspace,
    alpha: float,
    *,
    names: Mapping[str, str | None] | None = None,
    write_support_files: Callable[[Path], object] | None = None,
    inputs: Any = (),
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Stream ``store`` (a :class:`~lssf_lightning.io.weights.WeightStore`) into a HF model directory with
    ``α·U'U'ᵀδ`` added to each matched tensor (``alpha``: the missing strength), atomically; refused when the
    directory overlaps ``inputs`` (model paths, Trainer folders, the cache), or exists and ``overwrite`` is
    false or it holds files lssf_lightning does not write."""
    edits = LSSF(subspace, alpha).plan(store)
    write_model_directory(store, directory, edits=edits, names=names, write_support_files=write_support_files,
                          overwrite=overwrite, inputs=inputs, progress=progress)
    return Path(directory)


def export_adapter(
    model: torch.nn.Module,
    subspace: SafetySubspace,
    directory: str | os.PathLike,
    alpha: float,
    max_rank: int | None = None,
    info: Callable[[str], object] | None = None,
    *,
    overwrite: bool = False,
    inputs: Any = (),
):
    """Both callbacks' ``export_adapter_dir``: ``α·U'U'ᵀδ`` (``alpha``: the missing strength) for ``model``'s
    live weights as a peft LoRA adapter (:func:`~lssf_lightning.adapters.write_model_adapter`; a peft
    LoRA ``model`` gets ONE adapter with its task LoRA, to load on the aligned model). The correction reads
    no weight, only names and shapes: FSDP2 (DTensor) shards give their global shapes. Skipped with a warning
    for FSDP1's flat parameters and a sharded peft LoRA model (its task adapter is sharded); returns the
    report (also passed to ``info`` as one line), or ``None``. ``overwrite`` and ``inputs``: as in
    :func:`export_realigned`."""
    sharded = any(distributed.is_dtensor(p) for p in model.parameters())
    sharded_lora = sharded and hasattr(model, "peft_config")
    if sharded_lora or _fsdp1_wrapped(model):
        warnings.warn(f"export_adapter_dir={os.fspath(directory)!r} skipped: the weights are sharded (FSDP); "
                      "run `lssf-lightning realign --as-adapter` on the exported model instead", stacklevel=2)
        return None
    report = write_model_adapter(model, subspace, directory, alpha=alpha, max_rank=max_rank,
                                 overwrite=overwrite, inputs=inputs)
    if info is not None:
        info(f"LSSF: wrote the {report}")
    return report


def model_source(model: torch.nn.Module) -> str | None:
    """The path or hub ID ``model`` was loaded from (``config._name_or_path`` of the base model), if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(getattr(base, "config", None), "_name_or_path", None)
    return str(name) if name else None


def check_outputs(
    outputs: Sequence[str | os.PathLike | None],
    inputs: Any,
    *,
    overwrite: bool,
    cache: str | os.PathLike | None = None,
    cache_inputs: Any = (),
) -> None:
    """Both callbacks' output check, before training and (through the guard) again at commit: each output
    directory must not be, contain or lie inside one of ``inputs`` or another output, and an existing one is
    replaced only with ``overwrite`` and only if it holds files lssf_lightning writes
    (:func:`~lssf_lightning.io.guard.check_output`); the ``cache`` file must not overlap ``cache_inputs``.
    Raises the guard's one-line errors."""
    given = [o for o in outputs if o]
    for index, output in enumerate(given):
        check_output(output, [inputs, given[:index], given[index + 1:]], overwrite=overwrite)
    if cache:
        check_overlap(cache, cache_inputs)


def _fsdp1_wrapped(model: torch.nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())


# -- when to apply (apply_on="epochs") ---------------------------------------------------------------------
APPLY_ON: tuple[str, ...] = ("checkpoint", "epochs", "train_end")


def check_apply_epochs(apply_on: str, apply_epochs) -> None:
    """``apply_epochs``: a non-empty list of epoch indices ``≥ 0`` or a share of ``max_epochs`` in ``(0, 1]``,
    and only with ``apply_on="epochs"``."""
    if apply_on != "epochs":
        if apply_epochs is not None:
            raise SettingError(f"apply_epochs is only used with apply_on='epochs', not {apply_on!r}")
        return
    if isinstance(apply_epochs, float):
        check_range("apply_epochs (as a float)", apply_epochs, 0.0, 1.0, low_open=True)
        return
    try:
        if not (isinstance(apply_epochs, Sequence) and not isinstance(apply_epochs, str) and apply_epochs):
            raise SettingError(apply_epochs)
        for epoch in apply_epochs:
            check_int("apply_epochs", epoch, minimum=0)
    except SettingError:
        raise SettingError("apply_on='epochs' needs apply_epochs: a non-empty list of epoch indices >= 0 or "
                           f"a float in (0, 1], got {apply_epochs!r}") from None


def resolve_epochs(apply_on: str, apply_epochs, max_epochs: int | None) -> set[int]:
    """The 0-based epochs at whose end ``apply_on="epochs"`` fuses (a share needs a finite ``max_epochs``)."""
    if apply_on != "epochs":
        return set()
    if isinstance(apply_epochs, float):
        if max_epochs is None or max_epochs < 1:
            raise SettingError("apply_epochs as a fraction needs a finite `Trainer(max_epochs=...)`")
        return {max(math.ceil(apply_epochs * max_epochs) - 1, 0)}
    return set(apply_epochs)


# -- helpers for the callbacks -----------------------------------------------------------------------------
def named_tensors(module: torch.nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by their state-dict names (what checkpoint keys refer to)."""
    return {**dict(module.named_buffers()), **dict(module.named_parameters())}


def export_names(keys, prefix: str = "") -> dict[str, str | None]:
    """``{key: HF name}`` for an export: wrapper prefixes removed, adapter tensors (LoRA) dropped."""
    return {k: None if is_adapter_key(k) else canonical_key(k.removeprefix(prefix)) for k in keys}


def hf_support_files(model: torch.nn.Module, tokenizer=None) -> Callable[[Path], None]:
    """A ``write_support_files`` for :func:`export_realigned`: the (base) model's config and generation
    config, and ``tokenizer``."""
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model

    def support(staging: Path) -> None:
        base_model.config.save_pretrained(staging)
        if getattr(base_model, "generation_config", None) is not None:
            base_model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return support


@contextlib.contextmanager
def temporarily_fused(
    module: torch.nn.Module, subspace: SafetySubspace, alpha: float
) -> Iterator[torch.nn.Module]:
    """``module``'s matched weights fused with ``alpha`` for the ``with`` block, the exact raw ones back
    after: shard-local for DTensor weights (FSDP2), else through the LSSF planner (the raw values of the
    matched weights wait on the CPU meanwhile)."""
    parameters = dict(module.state_dict(keep_vars=True))
    matched = matched_keys(subspace, parameters.keys())
    if any(distributed.is_dtensor(parameters[k]) for k in matched):
        with distributed.temporarily_fused_shards(parameters, subspace, alpha, matched=matched):
            yield module
    elif alpha == 0:  # nothing to fuse, nothing to check
        yield module
    else:
        with temporarily_edited(module, LSSF(subspace, alpha)):
            yield module
