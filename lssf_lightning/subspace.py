"""``SafetySubspace``: the per-matrix safety subspaces of an aligned model, as rank-``r`` factors.

Built once from an aligned model and its unaligned counterpart, it holds, for every targeted weight matrix,
``U'`` (``d_out × r``) and ``U'ᵀδ`` (``r × d_in``) — never ``δ`` itself or a second model. It is data:
the fusion ``W ← W + α·U'(U'ᵀδ)`` into a fine-tuned copy is the :class:`~lssf_lightning.methods.LSSF`
planner's (``apply_edits(model, LSSF(subspace))``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import zlib
from collections.abc import Container, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lssf_lightning.calibration import calibration_factors
from lssf_lightning.config import SubspaceConfig
from lssf_lightning.core.basis import fusion_factors, weighted_basis
from lssf_lightning.core.checks import all_finite
from lssf_lightning.core.factors import SubspaceEntry
from lssf_lightning.core.svd import safety_spectrum
from lssf_lightning.io.names import (
    KeyMatcher,
    canonical_key,
    in_transformer_block,
    is_adapter_key,
    matches_modules,
    module_name,
)
from lssf_lightning.io.subspace_file import read_subspace_file, write_subspace_file
from lssf_lightning.io.weights import WeightsLike, WeightStore, open_weights
from lssf_lightning.validation import SettingError

__all__ = [
    "EmptySubspaceWarning",
    "SafetySubspace",
    "SubspaceBuilder",
    "check_correspondence",
    "select_target_pairs",
    "target_keys",
]


class EmptySubspaceWarning(UserWarning):
    """The aligned and unaligned weights are identical in every targeted matrix: the subspace is empty."""


def target_keys(
    store: WeightStore,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    *,
    known_linear: Container[str] = (),
) -> list[str]:
    """The keys of ``store`` that the selection targets (see :func:`select_target_pairs`), in store order.

    ``known_linear``: keys already known to be linear layers (e.g. matched by a subspace); the store is not
    asked about them. Asking a checkpoint directory builds its model on the meta device once (~15 s of
    transformers imports on a loaded 2-core machine), which a precomputed-subspace realign otherwise avoids.
    """
    default = target_modules is None or target_modules == "all-linear"

    def is_target(key: str) -> bool:
        if len(store.shape(key)) != 2 or not key.endswith(".weight") or is_adapter_key(key):
            return False
        name = canonical_key(module_name(key))
        if default:
            selected = in_transformer_block(canonical_key(key)) and (
                key in known_linear or store.is_linear(key) is not False
            )
        else:
            selected = matches_modules(name, target_modules)
        return selected and not matches_modules(name, exclude_modules)

    return [k for k in store if is_target(k)]


def check_correspondence(
    keys: Sequence[str],
    reference: Sequence[str],
    location: str,
    reference_location: str,
    *,
    allow_partial: bool = False,
    pool: Sequence[str] | None = None,
    reference_pool: Sequence[str] | None = None,
) -> dict[str, str]:
    """``{key: reference key}`` after checking that two sides' targeted weights correspond both ways.

    ``keys`` are the targeted weights of one side, ``reference`` those of the other; a weight has a
    counterpart when it matches (through wrapper prefixes, :class:`~lssf_lightning.io.names.KeyMatcher`) a key
    of the other side's ``pool`` (default: its targets) that no other weight claimed. A weight on either side
    without one is an error naming a few of each side, unless ``allow_partial``: then a warning gives the
    counts and the common ones are kept.

    Raises:
        ValueError: the two sides do not correspond (mismatched architectures), or have nothing in common.
    """
    keys, reference = list(keys), list(reference)
    matched = KeyMatcher(reference if reference_pool is None else reference_pool).match_all(keys)
    back = KeyMatcher(keys if pool is None else pool)
    lonely_keys = [k for k in keys if k not in matched]
    claimed = set(matched.values())
    # A reference weight that no key claimed still has a counterpart when it matches an unclaimed pool key (a
    # weight the two sides select differently, e.g. a store that cannot tell linear layers from others).
    lonely_reference = [k for k in reference if k not in claimed and back.match(k) in (None, *matched)]
    if not lonely_keys and not lonely_reference:
        return matched
    parts = []
    if lonely_keys:
        parts.append(
            f"{len(lonely_keys)} of {len(keys)} target weights of {location} have no counterpart in "
            f"{reference_location}, e.g. {lonely_keys[:3]}"
        )
    if lonely_reference:
        parts.append(
            f"{len(lonely_reference)} of {len(reference)} target weights of {reference_location} have "
            f"no counterpart in {location}, e.g. {lonely_reference[:3]}"
        )
    message = "; ".join(parts)
    if not allow_partial or not matched:
        hint = (
            ""
            if not matched
            else "; pass allow_partial=True (CLI: --allow-partial) to edit only the common ones"
        )
        raise ValueError(f"{message} (mismatched architectures?){hint}")
    warnings.warn(
        f"partial realignment: {message}; only the {len(matched)} common weights are edited", stacklevel=3
    )
    return matched


def select_target_pairs(
    aligned: WeightStore,
    unaligned: WeightStore,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    *,
    allow_partial: bool = False,
) -> dict[str, tuple[str, str]]:
    """``{subspace key: (aligned key, unaligned key)}`` for every targeted 2-D weight, checked for shape.

    Default targets are the linear (and ``Conv1D``) weights inside the transformer blocks; embeddings,
    ``lm_head``, norms and biases are left out. ``target_modules`` / ``exclude_modules`` follow peft: a list
    matches module names equal to or ending in ``.item``, a string is a full-match regular expression, and
    ``"all-linear"`` is the default. The targets of both models must correspond both ways (see
    :func:`check_correspondence`; ``allow_partial`` keeps the common ones).

    Raises:
        ValueError: nothing matches, a pattern matches nothing, the targets do not correspond, or shapes
            differ.
    """
    targets = target_keys(aligned, target_modules, exclude_modules)
    if isinstance(target_modules, (list, tuple)):
        names = [canonical_key(module_name(k)) for k in targets]
        unused = [p for p in target_modules if not any(n == p or n.endswith("." + p) for n in names)]
        if unused:
            raise ValueError(f"target_modules {list(unused)} match no 2-D weight of {aligned.location}")
    if not targets:
        raise ValueError(
            f"no target weight found in {aligned.location} (target_modules={target_modules!r}, "
            f"exclude_modules={exclude_modules!r}); first keys: {aligned.keys()[:5]}"
        )
    matched = check_correspondence(
        targets,
        target_keys(unaligned, target_modules, exclude_modules),
        aligned.location,
        unaligned.location,
        allow_partial=allow_partial,
        pool=aligned.keys(),
        reference_pool=unaligned.keys(),
    )
    pairs, mismatched = {}, []
    for key in targets:
        other = matched.get(key)
        if other is None:
            continue
        if tuple(unaligned.shape(other)) != tuple(aligned.shape(key)):
            mismatched.append(f"{key}: {tuple(aligned.shape(key))} vs {tuple(unaligned.shape(other))}")
            continue
        name = min((canonical_key(key), canonical_key(other)), key=lambda k: (k.count("."), k))
        pairs[name] = (key, other)
    if mismatched:
        raise ValueError(
            f"shapes differ between {aligned.location} and {unaligned.location} for {len(mismatched)} "
            f"weights (mismatched architectures?), e.g. {mismatched[:3]}"
        )
    return pairs


class _Fingerprint:
    """A content hash of the inputs: the settings, and each tensor's name, shape, dtype and a CRC-32 of its
    bytes.

    Independent of the order tensors arrive in, so a module and its saved checkpoint hash alike.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = json.dumps(settings, sort_keys=True)
        self.digests: dict[str, str] = {}

    def add(self, key: str, tensor: Tensor) -> None:
        self.digests[key] = tensor_digest(tensor)

    def by_model(self) -> dict[str, dict[str, str]]:
        """``{"aligned": {matrix: digest}, "unaligned": {...}}``: what a subspace records of its inputs, so
        that a model it is later used with can be checked against it (:func:`check_input_weight`)."""
        out: dict[str, dict[str, str]] = {"aligned": {}, "unaligned": {}}
        for key, digest in sorted(self.digests.items()):
            side, _, name = key.partition(":")
            out[side][name] = digest
        return out

    def hexdigest(self) -> str:
        return hashlib.blake2b(
            json.dumps([self._settings, sorted(self.digests.items())]).encode(), digest_size=16
        ).hexdigest()


def tensor_digest(tensor: Tensor) -> str:
    """``"(shape)|dtype|crc32"`` of one tensor: what the fingerprint hashes of each input weight."""
    data = tensor.detach().reshape(-1).contiguous().cpu()
    crc = zlib.crc32(memoryview(data.view(torch.uint8).numpy()))
    return f"{tuple(tensor.shape)}|{tensor.dtype}|{crc:08x}"


def check_input_weight(subspace: SafetySubspace, side: str, name: str, tensor: Tensor, location: Any, *,
                       subspace_file: str | None = None) -> None:
    """Refuse to use ``subspace`` with the ``side`` (``"aligned"``/``"unaligned"``) model at ``location``
    whose weight ``name`` (just read: nothing else is read) is not the one the subspace was built from.

    A subspace written before it recorded its inputs' digests, or a weight in another dtype than the one it
    was built from (a cast copy), cannot be checked: nothing is said then, except once, a warning.

    Raises:
        ValueError: one line naming the subspace (``subspace_file``, its fingerprint and the model it was
            built from), the model and the weight.
    """
    recorded = subspace.metadata.get("input_digests")
    expected = recorded.get(side, {}).get(name) if isinstance(recorded, Mapping) else None
    if expected is None:
        if not getattr(subspace, "_unverified_warned", False):
            subspace._unverified_warned = True
            warnings.warn(f"the safety subspace records no digest of its {side} weights (written by an "
                          f"earlier version?): it cannot be checked to come from {location}", stacklevel=3)
        return
    got = tensor_digest(tensor)
    (want_shape, want_dtype, _), (got_shape, got_dtype, _) = expected.split("|"), got.split("|")
    if got == expected or (got_shape == want_shape and got_dtype != want_dtype):
        return  # identical, or the same shape in another dtype (a cast copy: not checkable)
    source = subspace.metadata.get(side)
    which = f"the safety subspace {subspace_file}" if subspace_file else "the safety subspace"
    raise ValueError(
        f"{which} (fingerprint {str(subspace.metadata.get('fingerprint'))[:12]}, built from the "
        f"{side} model {source!r}) was not built from the {side} model {location}: its weight {name} differs "
        f"({expected} vs {got}); pass the {side} model the subspace was built from, or rebuild the subspace"
    )


class SafetySubspace:
    """The low-rank safety subspace of every targeted weight matrix.

    Build it with :meth:`from_weights`, keep it with :meth:`save` / :meth:`load`, and apply it with the
    :class:`~lssf_lightning.methods.LSSF` planner. Keys are the weights' state-dict keys as the HF model names
    them (``model.layers.0.self_attn.q_proj.weight``); fusion matches them through wrapper prefixes.

    Example::

        config = SubspaceConfig(eta=0.9)
        subspace = SafetySubspace.from_weights("Llama-3.1-8B-Instruct", "Llama-3.1-8B", config=config)
        subspace.save("safety.safetensors")
        model = apply_edits(finetuned_model, LSSF(subspace, alpha=1.0), inplace=True)
    """

    def __init__(self, entries: Mapping[str, SubspaceEntry], metadata: dict[str, Any] | None = None) -> None:
        # A disk-backed mapping (io.lazy_factors.LazyFactors) is kept as it is: copying it would read every
        # entry.
        lazy = isinstance(entries, Mapping) and not isinstance(entries, dict)
        self.entries = entries if lazy else dict(entries)
        self.metadata = dict(metadata or {})
        self.source: Path | None = None  # the file it was loaded from (an input no output may overlap)

    def input_paths(self) -> list[Path]:
        """The file it was loaded from, if any (for the output guard)."""
        return [self.source] if self.source is not None else []

    # -- building ---------------------------------------------------------------------------------------
    @classmethod
    def from_weights(
        cls,
        aligned: WeightsLike,
        unaligned: WeightsLike,
        config: SubspaceConfig | Mapping[str, Any] | None = None,
        *,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        allow_partial: bool = False,
        progress: bool = True,
    ) -> SafetySubspace:
        """Compute the safety subspace of ``δ = aligned − unaligned`` for every targeted weight.

        Args:
            aligned: the safety-aligned model: an ``nn.Module``, a ``{name: tensor}`` mapping, or a path to a
                HF model directory / safetensors file(s). Read one tensor at a time.
            unaligned: its unaligned counterpart (the pre-trained base, or a harmful fine-tune), same forms.
            config: the settings (η, α₁, source, calibration, target/exclude modules, max_rank, svd_method):
                a :class:`~lssf_lightning.config.SubspaceConfig` or a mapping of its fields; default: its
                defaults.
            tokenizer: tokenizer (or its path) for ``source="activations"``; default: from ``aligned``'s
                directory.
            device: where to run the SVDs (default: where each tensor is).
            dtype: dtype of the stored factors (default: the aligned weights' dtype, at least float32 when
                those are integer).
            allow_partial: build the weights the two models have in common (a warning gives the counts)
                instead of refusing models whose targeted weights do not correspond.
            progress: show a progress bar.
        """
        config = SubspaceConfig.coerce(config)
        builder = SubspaceBuilder(
            aligned,
            unaligned,
            config,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            allow_partial=allow_partial,
            progress=progress,
        )
        entries = {
            name: builder.build(name)
            for name in tqdm(builder.names, desc="safety subspace", disable=not progress, unit="matrix")
        }
        if entries and not any(entry.rank for entry in entries.values()):
            warnings.warn(
                f"aligned ({builder.aligned.location}) and unaligned ({builder.unaligned.location}) are "
                f"identical in all {len(entries)} targeted matrices (δ = 0): the safety subspace is empty "
                "and realigning with it changes nothing; pass the unaligned model the aligned one came from",
                EmptySubspaceWarning, stacklevel=2,
            )
        return cls(entries, builder.metadata())

    @staticmethod
    def fingerprint(
        aligned: WeightsLike,
        unaligned: WeightsLike,
        config: SubspaceConfig | Mapping[str, Any] | None = None,
        *,
        allow_partial: bool = False,
    ) -> str:
        """The content hash :meth:`from_weights` would record for these inputs, without any SVD.

        Used to decide whether a cached subspace still fits (it reads every target tensor once).
        """
        config = SubspaceConfig.coerce(config)
        aligned_store = open_weights(aligned, name="aligned")
        unaligned_store = open_weights(unaligned, name="unaligned")
        pairs = select_target_pairs(
            aligned_store,
            unaligned_store,
            config.target_modules,
            config.exclude_modules,
            allow_partial=allow_partial,
        )
        fingerprint = _Fingerprint(config.hashed_settings())
        for name, (aligned_key, unaligned_key) in pairs.items():
            fingerprint.add(f"aligned:{name}", aligned_store.get(aligned_key))
            fingerprint.add(f"unaligned:{name}", unaligned_store.get(unaligned_key))
        return fingerprint.hexdigest()

    # -- reading ----------------------------------------------------------------------------------------
    @property
    def ranks(self) -> dict[str, int]:
        """``{state-dict key: safety-critical rank}``."""
        return {key: entry.rank for key, entry in self.entries.items()}

    def keys(self) -> list[str]:
        return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __getitem__(self, key: str) -> SubspaceEntry:
        return self.entries[key]

    def __repr__(self) -> str:
        ranks = list(self.ranks.values())
        mean = sum(ranks) / len(ranks) if ranks else 0.0
        return (
            f"SafetySubspace({len(self)} matrices, mean rank {mean:.1f}, eta={self.metadata.get('eta')}, "
            f"alpha_1={self.metadata.get('alpha_1')}, source={self.metadata.get('source')!r})"
        )

    def summary(self, max_rows: int | None = None) -> str:
        """A per-matrix table: shape, rank, entropy ``H(n)``, energy kept; then totals."""
        header = f"{'matrix':<52} {'shape':>13} {'rank':>5} {'H(n)':>7} {'energy kept':>11}"
        lines = [header, "-" * len(header)]
        items = list(self.entries.items())
        for key, entry in items[:max_rows] if max_rows else items:
            shape = "x".join(map(str, entry.shape))
            lines.append(
                f"{key[-52:]:<52} {shape:>13} {entry.rank:>5} {entry.entropy:>7.3f} "
                f"{entry.energy_kept:>10.1%}"
            )
        if max_rows and len(items) > max_rows:
            lines.append(f"... {len(items) - max_rows} more")
        ranks = [e.rank for e in self.entries.values()]
        dense = sum(math.prod(e.shape) for e in self.entries.values())
        factors = sum(e.left.numel() + e.right.numel() for e in self.entries.values())
        lines.append("-" * len(header))
        lines.append(
            f"{len(ranks)} matrices, rank mean {sum(ranks) / max(len(ranks), 1):.1f} "
            f"(min {min(ranks, default=0)}, max {max(ranks, default=0)}), factors hold "
            f"{factors / max(dense, 1):.1%} of the dense weights' numbers; eta={self.metadata.get('eta')}, "
            f"alpha_1={self.metadata.get('alpha_1')}, source={self.metadata.get('source')}"
        )
        return "\n".join(lines)

    # -- fusing -----------------------------------------------------------------------------------------
    @property
    def config(self) -> SubspaceConfig | None:
        """The settings this subspace was built with, as far as its metadata records them."""
        try:
            return SubspaceConfig.from_metadata(self.metadata) if "eta" in self.metadata else None
        except (TypeError, ValueError):
            return None

    def fuse_tensor(self, key: str, weight: Tensor, alpha: float = 1.0) -> Tensor:
        """``weight + α·U'U'ᵀδ`` for the subspace entry ``key`` (a new tensor, in ``weight``'s dtype)."""
        return self.entries[key].fuse(weight, alpha, key)

    def product(self, key: str, like: Tensor) -> Tensor:
        """The dense ``U'U'ᵀδ`` of entry ``key`` in the checkpoint's layout, in at least float32, on
        ``like``'s device. Memory: one matrix."""
        return self.entries[key].product(like)

    def match(self, keys: Sequence[str]) -> dict[str, str]:
        """``{target key: subspace key}`` for the keys that name a weight of this subspace."""
        return KeyMatcher(self.entries).match_all(keys)

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False, inputs: Any = ()) -> Path:
        """Write one safetensors file: three tensors per matrix and the metadata as JSON, through the output
        guard (atomic; refused when it would overlap ``inputs``; every factor checked finite first).

        Args:
            path: the file to write.
            overwrite: ``True`` replaces an existing file, ``False`` (default) refuses it.
            inputs: paths the run read (the aligned/unaligned models...): ``path`` must not be one or lie in
                one.
        """
        return write_subspace_file(path, self.entries, self.metadata, overwrite=overwrite, inputs=inputs)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SafetySubspace:
        """Read a file written by :meth:`save` (plain safetensors + JSON; nothing is unpickled).

        The file is checked against its schema (:mod:`lssf_lightning.io.subspace_file`) and every factor is
        checked finite, so a damaged or tampered file is refused with one line naming the file and the field.
        """
        entries, metadata = read_subspace_file(path, map_location)
        subspace = cls(
            {
                key: SubspaceEntry(
                    left=e["left"],
                    right=e["right"],
                    singular_values=e["sigma"],
                    entropy=e["entropy"],
                    total_energy=e["total_energy"],
                    conv1d=e["conv1d"],
                )
                for key, e in entries.items()
            },
            metadata,
        )
        subspace.source = Path(path).expanduser()
        return subspace


class SubspaceBuilder:
    """Builds the entries of a safety subspace one matrix at a time, in any order.

    :meth:`SafetySubspace.from_weights` builds every entry with it; :func:`lssf_lightning.realign_checkpoint`
    builds each entry just when the fine-tuned weight it edits streams past and drops it after, so a post-hoc
    run never holds the factors of the whole model. Arguments as in :meth:`SafetySubspace.from_weights`.
    For ``source="activations"`` the calibration pass runs on the first :meth:`build`, after the inputs have
    been checked.
    """

    def __init__(
        self,
        aligned: WeightsLike,
        unaligned: WeightsLike,
        config: SubspaceConfig | Mapping[str, Any] | None = None,
        *,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        allow_partial: bool = False,
        progress: bool = True,
    ) -> None:
        self.config = SubspaceConfig.coerce(config)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise SettingError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        self.settings = self.config.hashed_settings()
        self._aligned_source = aligned
        self.aligned = open_weights(aligned, name="aligned")
        self.unaligned = open_weights(unaligned, name="unaligned")
        self.pairs = select_target_pairs(
            self.aligned,
            self.unaligned,
            self.config.target_modules,
            self.config.exclude_modules,
            allow_partial=allow_partial,
        )
        self.tokenizer, self.device, self.dtype, self.progress = tokenizer, device, dtype, progress
        self._right_factors: dict[str, Tensor] | None = None
        self._calibration_stats: dict[str, int] | None = None
        self._fingerprint = _Fingerprint(self.settings)
        self.ranks: dict[str, int] = {}

    def input_paths(self) -> list:
        """The aligned and unaligned weights it reads (for the output guard)."""
        return [self.aligned, self.unaligned]

    @property
    def names(self) -> list[str]:
        """The state-dict keys of the targeted matrices."""
        return list(self.pairs)

    def _activation_factor(self, name: str) -> Tensor | None:
        if self.config.source != "activations":
            return None
        if self._right_factors is None:
            self._right_factors, self._calibration_stats = calibration_factors(
                self.aligned,
                self._aligned_source,
                self.pairs,
                self.config.calibration,
                self.tokenizer,
                self.config.max_calibration_tokens,
                self.progress,
            )
        return self._right_factors[name]

    def build(self, name: str) -> SubspaceEntry:
        """The entry of matrix ``name`` (reads its aligned and unaligned weights)."""
        entry = _build_entry(
            name,
            self.aligned,
            self.unaligned,
            self.pairs[name],
            self._fingerprint,
            self.config,
            activation_factor=self._activation_factor(name),
            device=self.device,
            dtype=self.dtype,
        )
        self.ranks[name] = entry.rank
        return entry

    def fingerprint_digests(self) -> dict[str, str]:
        """``{tensor: digest}`` of the inputs hashed so far (the parts of a distributed build are merged)."""
        return dict(self._fingerprint.digests)

    def add_fingerprint_digests(self, digests: Mapping[str, str]) -> None:
        """Merge digests another process hashed (:mod:`lssf_lightning.distributed`), as if built here."""
        self._fingerprint.digests.update(digests)

    def metadata(self) -> dict[str, Any]:
        """The subspace's metadata; the fingerprint covers the entries built so far."""
        metadata = {
            **self.settings,
            "svd_method": self.config.svd_method,
            "fingerprint": self._fingerprint.hexdigest(),
            "aligned": self.aligned.location,
            "unaligned": self.unaligned.location,
            "input_digests": self._fingerprint.by_model(),
        }
        if self._calibration_stats:
            metadata["calibration_stats"] = self._calibration_stats
        return metadata


def _build_entry(
    name: str,
    aligned: WeightStore,
    unaligned: WeightStore,
    keys: tuple[str, str],
    fingerprint: _Fingerprint,
    config: SubspaceConfig,
    *,
    activation_factor: Tensor | None,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
) -> SubspaceEntry:
    """One matrix's entry: the SVD of ``δ`` (or ``δ·X̂``), the rank by entropy, the weighted factors."""
    w_aligned = aligned.get(keys[0])
    w_unaligned = unaligned.get(keys[1])
    fingerprint.add(f"aligned:{name}", w_aligned)
    fingerprint.add(f"unaligned:{name}", w_unaligned)
    compute = torch.float64 if w_aligned.dtype == torch.float64 else torch.float32
    target_device = torch.device(device) if device is not None else w_aligned.device
    delta = w_aligned.to(target_device, compute) - w_unaligned.to(target_device, compute)
    del w_unaligned
    if not all_finite(delta):
        culprit = "aligned" if not all_finite(w_aligned) else "unaligned"
        raise ValueError(f"{name}: the {culprit} weights hold NaN or inf")
    conv1d = aligned.is_conv1d(keys[0])
    if conv1d:
        delta = delta.T
    signal = delta if activation_factor is None else delta @ activation_factor.to(delta)
    spectrum = safety_spectrum(signal, config.eta, method=config.svd_method, max_rank=config.max_rank)
    basis = spectrum.basis.to(delta.dtype)
    weighted = weighted_basis(basis, spectrum.singular_values.to(delta.dtype), config.alpha_1)
    left, right = fusion_factors(weighted, delta)
    out_dtype = dtype or (w_aligned.dtype if w_aligned.is_floating_point() else torch.float32)
    entry = SubspaceEntry(
        left=left.to("cpu", out_dtype),
        right=right.to("cpu", out_dtype),
        singular_values=spectrum.singular_values.to("cpu", torch.float32),
        entropy=float(spectrum.entropy),
        total_energy=float(spectrum.total_energy),
        conv1d=conv1d,
    )
    if not (all_finite(entry.left) and all_finite(entry.right)):  # e.g. an overflow in a narrow ``dtype``
        raise ValueError(f"{name}: the safety subspace factors are not finite (dtype {out_dtype})")
    return entry
