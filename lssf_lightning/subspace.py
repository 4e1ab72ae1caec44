"""``SafetySubspace``: the per-matrix safety subspaces of an aligned model, as rank-``r`` factors.

Built once from an aligned model and its unaligned counterpart, it holds, for every targeted weight matrix,
``U'`` (``d_out × r``) and ``U'ᵀδ`` (``r × d_in``) — never ``δ`` itself or a second model — and fuses
``W ← W + α·U'(U'ᵀδ)`` into any fine-tuned copy.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lssf_lightning.core.basis import (
    add_correction,
    check_alpha_1,
    fusion_factors,
    low_rank_product,
    weighted_basis,
)
from lssf_lightning.core.checks import all_finite
from lssf_lightning.core.entropy import check_eta
from lssf_lightning.core.svd import safety_spectrum
from lssf_lightning.io.calibration import calibration_factors, calibration_identity
from lssf_lightning.io.names import (
    KeyMatcher,
    canonical_key,
    in_transformer_block,
    is_adapter_key,
    matches_modules,
    module_name,
)
from lssf_lightning.io.shards import SafetensorsReader, read_header, write_safetensors
from lssf_lightning.io.weights import ModuleStore, WeightsLike, WeightStore, open_weights

__all__ = ["SafetySubspace", "SubspaceBuilder", "SubspaceEntry", "fuse_entry", "select_target_pairs"]

FORMAT = "lssf_lightning.safety_subspace"
FORMAT_VERSION = 1
Source = Literal["weights", "activations"]
SVDMethod = Literal["auto", "exact", "randomized", "gram"]


@dataclass
class SubspaceEntry:
    """The safety subspace of one weight matrix, in output-major layout ``(d_out, d_in)``.

    Attributes:
        left: ``U' = U_r·diag(α_i)``, shape ``(d_out, r)``.
        right: ``U'ᵀδ``, shape ``(r, d_in)``.
        singular_values: the kept singular values ``σ_1…σ_r`` of the safety signal.
        entropy: ``H(n)`` of the whole spectrum.
        total_energy: ``Σ σ_i²`` over the whole spectrum.
        conv1d: the checkpoint stores this weight transposed (GPT-2 ``Conv1D``).
    """

    left: Tensor
    right: Tensor
    singular_values: Tensor
    entropy: float
    total_energy: float
    conv1d: bool = False

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's shape as stored in the checkpoint."""
        d_out, d_in = self.left.shape[0], self.right.shape[1]
        return (d_in, d_out) if self.conv1d else (d_out, d_in)

    @property
    def energy_kept(self) -> float:
        """Share of the safety signal's energy in the kept directions (``Σ_{i≤r} σ_i² / Σ σ_i²``)."""
        if self.total_energy <= 0:
            return 0.0
        return float(self.singular_values.double().square().sum()) / self.total_energy

    def correction(self, alpha: float = 1.0) -> Tensor:
        """The dense term ``α·U'U'ᵀδ`` in the checkpoint's layout (for inspection and tests)."""
        dense = alpha * (self.left.to(torch.float64) @ self.right.to(torch.float64))
        return dense.T if self.conv1d else dense


def select_target_pairs(
    aligned: WeightStore,
    unaligned: WeightStore,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
) -> dict[str, tuple[str, str]]:
    """``{subspace key: (aligned key, unaligned key)}`` for every targeted 2-D weight, checked for shape.

    Default targets are the linear (and ``Conv1D``) weights inside the transformer blocks; embeddings,
    ``lm_head``, norms and biases are left out. ``target_modules`` / ``exclude_modules`` follow peft: a list
    matches module names equal to or ending in ``.item``, a string is a full-match regular expression, and
    ``"all-linear"`` is the default.

    Raises:
        ValueError: nothing matches, a pattern matches nothing, weights are missing on one side, or shapes differ.
    """
    matcher = KeyMatcher(unaligned.keys())
    candidates = [
        k for k in aligned.keys() if len(aligned.shape(k)) == 2 and k.endswith(".weight") and not is_adapter_key(k)
    ]
    default = target_modules is None or target_modules == "all-linear"

    def is_target(key: str) -> bool:
        name = canonical_key(module_name(key))
        if default:
            linear = aligned.is_linear(key)
            selected = in_transformer_block(canonical_key(key)) and linear is not False
        else:
            selected = matches_modules(name, target_modules)
        return selected and not matches_modules(name, exclude_modules)

    targets = [k for k in candidates if is_target(k)]
    if not default and isinstance(target_modules, (list, tuple)):
        names = [canonical_key(module_name(k)) for k in targets]
        unused = [p for p in target_modules if not any(n == p or n.endswith("." + p) for n in names)]
        if unused:
            raise ValueError(f"target_modules {unused} match no 2-D weight of {aligned.location}")
    if not targets:
        raise ValueError(f"no target weight found in {aligned.location} (target_modules={target_modules!r}, "
                         f"exclude_modules={exclude_modules!r}); first keys: {aligned.keys()[:5]}")
    pairs, missing, mismatched = {}, [], []
    for key in targets:
        other = matcher.match(key)
        if other is None:
            missing.append(key)
            continue
        if tuple(unaligned.shape(other)) != tuple(aligned.shape(key)):
            mismatched.append(f"{key}: {tuple(aligned.shape(key))} vs {tuple(unaligned.shape(other))}")
            continue
        name = min((canonical_key(key), canonical_key(other)), key=lambda k: (k.count("."), k))
        pairs[name] = (key, other)
    if mismatched:
        raise ValueError(
            f"shapes differ between {aligned.location} and {unaligned.location} for {len(mismatched)} weights "
            f"(mismatched architectures?), e.g. {mismatched[:3]}"
        )
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(targets)} target weights of {aligned.location} have no counterpart in "
            f"{unaligned.location} (mismatched architectures?), e.g. {missing[:3]}; "
            f"its keys look like {unaligned.keys()[:3]}"
        )
    return pairs


def _settings(eta, alpha_1, source, max_rank, target_modules, exclude_modules, calibration) -> dict[str, Any]:
    """The validated settings of a build; recorded in the metadata and hashed into the fingerprint."""
    if source not in ("weights", "activations"):
        raise ValueError(f"source must be 'weights' or 'activations', got {source!r}")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank must be a positive integer or None, got {max_rank!r}")

    def as_json(patterns):
        return patterns if isinstance(patterns, (str, type(None))) else list(patterns)

    settings = {
        "eta": check_eta(eta),
        "alpha_1": check_alpha_1(alpha_1),
        "source": source,
        "max_rank": max_rank,
        "target_modules": as_json(target_modules),
        "exclude_modules": as_json(exclude_modules),
    }
    if source == "activations":
        settings["calibration"] = calibration_identity(calibration)
    return settings


class _Fingerprint:
    """A content hash of the inputs: the settings, and each tensor's name, shape, dtype and a CRC-32 of its bytes.

    Independent of the order tensors arrive in, so a module and its saved checkpoint hash alike.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = json.dumps(settings, sort_keys=True)
        self._digests: dict[str, str] = {}

    def add(self, key: str, tensor: Tensor) -> None:
        data = tensor.detach().reshape(-1).contiguous().cpu()
        crc = zlib.crc32(memoryview(data.view(torch.uint8).numpy()))
        self._digests[key] = f"{tuple(tensor.shape)}|{tensor.dtype}|{crc:08x}"

    def hexdigest(self) -> str:
        return hashlib.blake2b(
            json.dumps([self._settings, sorted(self._digests.items())]).encode(), digest_size=16
        ).hexdigest()


class SafetySubspace:
    """The low-rank safety subspace of every targeted weight matrix, and the fusion that uses it.

    Build it with :meth:`from_weights`, keep it with :meth:`save` / :meth:`load`, and apply it with
    :meth:`fuse`. Keys are the weights' state-dict keys as the HF model names them
    (``model.layers.0.self_attn.q_proj.weight``); fusion matches them through wrapper prefixes.

    Example::

        subspace = SafetySubspace.from_weights("Llama-3.1-8B-Instruct", "Llama-3.1-8B", eta=0.9)
        subspace.save("safety.safetensors")
        model = subspace.fuse(finetuned_model, alpha=1.0, inplace=True)
    """

    def __init__(self, entries: dict[str, SubspaceEntry], metadata: dict[str, Any] | None = None) -> None:
        self.entries = dict(entries)
        self.metadata = dict(metadata or {})

    # -- building ---------------------------------------------------------------------------------------
    @classmethod
    def from_weights(
        cls,
        aligned: WeightsLike,
        unaligned: WeightsLike,
        *,
        eta: float = 0.9,
        alpha_1: float = 1.0,
        source: Source = "weights",
        calibration: str | Sequence[str] | Sequence[tuple[str, str]] | None = None,
        tokenizer: Any = None,
        target_modules: str | Sequence[str] | None = None,
        exclude_modules: str | Sequence[str] | None = None,
        max_rank: int | None = None,
        svd_method: SVDMethod = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_calibration_tokens: int | None = None,
        progress: bool = True,
    ) -> SafetySubspace:
        """Compute the safety subspace of ``δ = aligned − unaligned`` for every targeted weight.

        Args:
            aligned: the safety-aligned model: an ``nn.Module``, a ``{name: tensor}`` mapping, or a path to a
                HF model directory / safetensors file(s). Read one tensor at a time.
            unaligned: its unaligned counterpart (the pre-trained base, or a harmful fine-tune), same forms.
            eta: share of the safety singular value entropy to keep, in ``(0, 1]``; sets each rank.
            alpha_1: weight of the strongest direction in the weighted projector (Eq. 10); ``1`` = plain
                projector.
            source: ``"weights"`` — SVD of ``δ`` (data-free); ``"activations"`` — SVD of ``δ·X̂`` with
                ``X̂`` the normalised layer inputs at response tokens of ``calibration`` (the paper's form,
                see :mod:`lssf_lightning.io.calibration`).
            calibration: for ``source="activations"``: a path (.txt/.jsonl/.csv/.json), a list of prompts
                (the aligned model writes its own responses) or a list of ``(prompt, response)`` pairs.
                Default: the project's bundled harmful calibration prompts.
            tokenizer: tokenizer (or its path) for the calibration texts; default: from ``aligned``'s directory.
            target_modules: peft-style selection (list of module-name suffixes, a regex, or ``"all-linear"``).
            exclude_modules: peft-style exclusion, applied after ``target_modules``.
            max_rank: optional cap on every rank (after the entropy rule).
            svd_method: ``"auto"`` (fast, certified), ``"exact"`` (full SVD), ``"randomized"``, ``"gram"``.
            device: where to run the SVDs (default: where each tensor is).
            dtype: dtype of the stored factors (default: the aligned weights' dtype, at least float32 when
                those are integer).
            max_calibration_tokens: stop collecting after this many response tokens.
            progress: show a progress bar.
        """
        builder = SubspaceBuilder(
            aligned, unaligned, eta=eta, alpha_1=alpha_1, source=source, calibration=calibration,
            tokenizer=tokenizer, target_modules=target_modules, exclude_modules=exclude_modules, max_rank=max_rank,
            svd_method=svd_method, device=device, dtype=dtype, max_calibration_tokens=max_calibration_tokens,
            progress=progress,
        )
        entries = {
            name: builder.build(name)
            for name in tqdm(builder.names, desc="safety subspace", disable=not progress, unit="matrix")
        }
        return cls(entries, builder.metadata())

    @staticmethod
    def fingerprint(
        aligned: WeightsLike,
        unaligned: WeightsLike,
        *,
        eta: float = 0.9,
        alpha_1: float = 1.0,
        source: Source = "weights",
        max_rank: int | None = None,
        calibration: str | Sequence[str] | Sequence[tuple[str, str]] | None = None,
        target_modules: str | Sequence[str] | None = None,
        exclude_modules: str | Sequence[str] | None = None,
    ) -> str:
        """The content hash :meth:`from_weights` would record for these inputs, without any SVD.

        Used to decide whether a cached subspace still fits (it reads every target tensor once).
        """
        settings = _settings(eta, alpha_1, source, max_rank, target_modules, exclude_modules, calibration)
        aligned_store = open_weights(aligned, name="aligned")
        unaligned_store = open_weights(unaligned, name="unaligned")
        pairs = select_target_pairs(aligned_store, unaligned_store, target_modules, exclude_modules)
        fingerprint = _Fingerprint(settings)
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

    def __getitem__(self, key: str) -> SubspaceEntry:
        return self.entries[key]

    def __repr__(self) -> str:
        ranks = list(self.ranks.values())
        mean = sum(ranks) / len(ranks) if ranks else 0.0
        return (
            f"SafetySubspace({len(self)} matrices, mean rank {mean:.1f}, eta={self.metadata.get('eta')}, "
            f"alpha_1={self.metadata.get('alpha_1')}, source={self.metadata.get('source')!r})"
        )

    def factor_bytes(self) -> int:
        """Bytes held by the factors (compare with the dense weights they stand for)."""
        return sum(e.left.nbytes + e.right.nbytes + e.singular_values.nbytes for e in self.entries.values())

    def summary(self, max_rows: int | None = None) -> str:
        """A per-matrix table: shape, rank, entropy ``H(n)``, energy kept; then totals."""
        header = f"{'matrix':<52} {'shape':>13} {'rank':>5} {'H(n)':>7} {'energy kept':>11}"
        lines = [header, "-" * len(header)]
        items = list(self.entries.items())
        for key, entry in items[:max_rows] if max_rows else items:
            shape = "x".join(map(str, entry.shape))
            lines.append(
                f"{key[-52:]:<52} {shape:>13} {entry.rank:>5} {entry.entropy:>7.3f} {entry.energy_kept:>10.1%}"
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
    def fuse(self, target: nn.Module | Mapping[str, Tensor], alpha: float = 1.0, inplace: bool = False):
        """Add ``α·U'(U'ᵀδ)`` to every matching weight of ``target``; other weights are left untouched.

        Args:
            target: the fine-tuned model (an ``nn.Module``, e.g. a HF model, a LightningModule or a peft model)
                or a ``{name: tensor}`` state dict. Keys are matched through wrapper prefixes/suffixes.
                For a peft LoRA model the correction goes into each layer's frozen ``base_layer.weight``; the
                adapters are left as they are, so the effective weight ``W + B·A`` gains exactly the
                correction (save the whole model, or ``merge_and_unload()``, to keep it: an adapter-only
                save does not contain the base weights).
            alpha: fusion strength ``α`` (``0`` = no change).
            inplace: write into ``target``'s own tensors. Otherwise a module is deep-copied and a mapping is
                shallow-copied (untouched tensors are shared, fused ones are new).

        Returns:
            The fused module or mapping.

        Raises:
            ValueError: no weight of ``target`` matches the subspace, or a matched weight has another shape.
        """
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if isinstance(target, nn.Module):
            module = target if inplace else copy.deepcopy(target)
            store = ModuleStore(module)
            with torch.no_grad():
                for key, name in self._match_target(store).items():
                    parameter = store.parameter(key)
                    parameter.copy_(self._fused(name, parameter, alpha))
            return module
        if isinstance(target, Mapping):
            out = target if inplace else dict(target)
            store = open_weights(target, name="target")
            for key, name in self._match_target(store).items():
                fused = self._fused(name, out[key], alpha)
                if inplace:
                    out[key].copy_(fused)
                else:
                    out[key] = fused
            return out
        raise TypeError(f"target must be an nn.Module or a name→tensor mapping, got {type(target).__name__}")

    @contextlib.contextmanager
    def temporarily_fused(self, module: nn.Module, alpha: float = 1.0) -> Iterator[nn.Module]:
        """Fuse into ``module``'s own weights for the ``with`` block; the exact raw weights come back after.

        The raw values of the matched weights wait on the CPU meanwhile (one copy of those weights).
        """
        store = ModuleStore(module)
        saved: dict[str, Tensor] = {}
        try:
            with torch.no_grad():
                if alpha != 0:
                    for key, name in self._match_target(store).items():
                        parameter = store.parameter(key)
                        saved[key] = parameter.detach().to("cpu", copy=True)
                        self._fuse_parameter(name, parameter, alpha)
            yield module
        finally:
            with torch.no_grad():
                for key, raw in saved.items():
                    store.parameter(key).copy_(raw)

    def _fuse_parameter(self, name: str, parameter: Tensor, alpha: float) -> None:
        """``parameter ← parameter + α·U'U'ᵀδ`` in place, rounding exactly as :func:`fuse_entry` does."""
        entry = self.entries[name]
        if entry.rank == 0 or alpha == 0:
            return
        product = self.product(name, parameter)
        if product.dtype == parameter.dtype and tuple(product.shape) == tuple(parameter.shape):
            parameter.add_(product, alpha=float(alpha))  # the same single rounding, without a new tensor
        else:
            parameter.copy_(fuse_entry(name, entry, parameter, alpha))

    def fuse_tensor(self, key: str, weight: Tensor, alpha: float = 1.0) -> Tensor:
        """``weight + α·U'U'ᵀδ`` for the subspace entry ``key`` (a new tensor, in ``weight``'s dtype)."""
        return self._fused(key, weight, alpha)

    def product(self, key: str, like: Tensor) -> Tensor:
        """The dense ``U'U'ᵀδ`` of entry ``key`` in the checkpoint's layout, in at least float32, on ``like``'s
        device. Memory: one matrix."""
        return _entry_product(self.entries[key], like)

    def match(self, keys: Sequence[str]) -> dict[str, str]:
        """``{target key: subspace key}`` for the keys that name a weight of this subspace."""
        return KeyMatcher(self.entries).match_all(keys)

    def _match_target(self, store: WeightStore) -> dict[str, str]:
        matched = {k: v for k, v in self.match(store.keys()).items() if len(store.shape(k)) == 2}
        if self.entries and not matched:
            raise ValueError(
                f"no weight of {store.location} matches the safety subspace (e.g. subspace key "
                f"{next(iter(self.entries))!r}, target keys {store.keys()[:3]})"
            )
        missing = set(self.entries) - set(matched.values())
        if missing:
            warnings.warn(
                f"{len(missing)} of {len(self.entries)} subspace matrices have no weight in {store.location}, "
                f"e.g. {sorted(missing)[:3]}; they are not fused",
                stacklevel=3,
            )
        bad = [f"{k}: {tuple(store.shape(k))} vs {self.entries[n].shape}" for k, n in matched.items()
               if tuple(store.shape(k)) != self.entries[n].shape]
        if bad:
            raise ValueError(f"weights of {store.location} do not have the subspace's shapes, e.g. {bad[:3]}")
        return matched

    def _fused(self, name: str, weight: Tensor, alpha: float) -> Tensor:
        return fuse_entry(name, self.entries[name], weight, alpha)

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file: three tensors per matrix and the metadata as JSON (atomic)."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, layout = {}, {}
        for key, entry in self.entries.items():
            tensors[f"{key}:left"] = entry.left.contiguous()
            tensors[f"{key}:right"] = entry.right.contiguous()
            tensors[f"{key}:sigma"] = entry.singular_values.contiguous()
            layout[key] = {"entropy": entry.entropy, "total_energy": entry.total_energy, "conv1d": entry.conv1d}
        header = {"format": FORMAT, "version": FORMAT_VERSION, "metadata": self.metadata, "entries": layout}
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(handle)
        try:
            write_safetensors(tmp, tensors, {"lssf": json.dumps(header)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SafetySubspace:
        """Read a file written by :meth:`save` (plain safetensors + JSON; nothing is unpickled)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such safety subspace file: {path}")
        _, raw_metadata = read_header(path)
        try:
            header = json.loads(raw_metadata["lssf"])
            if header["format"] != FORMAT:
                raise KeyError("format")
        except (KeyError, json.JSONDecodeError):
            raise ValueError(f"{path} is not a safety subspace written by lssf_lightning") from None
        if header["version"] > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {header['version']}; this lssf_lightning reads "
                             f"up to {FORMAT_VERSION}: upgrade the package")
        reader = SafetensorsReader([path])
        entries = {}
        for key, info in header["entries"].items():
            entries[key] = SubspaceEntry(
                left=reader.get(f"{key}:left").to(map_location),
                right=reader.get(f"{key}:right").to(map_location),
                singular_values=reader.get(f"{key}:sigma").to(map_location),
                entropy=info["entropy"],
                total_energy=info["total_energy"],
                conv1d=info["conv1d"],
            )
        return cls(entries, header["metadata"])


def _entry_product(entry: SubspaceEntry, like: Tensor) -> Tensor:
    product = low_rank_product(entry.left, entry.right, like)
    return product.T if entry.conv1d else product


def fuse_entry(name: str, entry: SubspaceEntry, weight: Tensor, alpha: float) -> Tensor:
    """``weight + α·U'U'ᵀδ`` for one subspace entry (a new tensor, in ``weight``'s dtype)."""
    if tuple(weight.shape) != entry.shape:
        raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} does not match the subspace's {entry.shape}")
    if entry.rank == 0 or alpha == 0:
        return weight.detach().clone()
    return add_correction(weight.detach(), _entry_product(entry, weight), alpha)


class SubspaceBuilder:
    """Builds the entries of a safety subspace one matrix at a time, in any order.

    :meth:`SafetySubspace.from_weights` builds every entry with it; :func:`lssf_lightning.realign_checkpoint`
    builds each entry just when the fine-tuned weight it edits streams past and drops it after, so a post-hoc
    run never holds the factors of the whole model. Arguments as in :meth:`SafetySubspace.from_weights`.
    """

    def __init__(
        self,
        aligned: WeightsLike,
        unaligned: WeightsLike,
        *,
        eta: float = 0.9,
        alpha_1: float = 1.0,
        source: Source = "weights",
        calibration: str | Sequence[str] | Sequence[tuple[str, str]] | None = None,
        tokenizer: Any = None,
        target_modules: str | Sequence[str] | None = None,
        exclude_modules: str | Sequence[str] | None = None,
        max_rank: int | None = None,
        svd_method: SVDMethod = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_calibration_tokens: int | None = None,
        progress: bool = True,
    ) -> None:
        self.settings = _settings(eta, alpha_1, source, max_rank, target_modules, exclude_modules, calibration)
        self.aligned = open_weights(aligned, name="aligned")
        self.unaligned = open_weights(unaligned, name="unaligned")
        self.pairs = select_target_pairs(self.aligned, self.unaligned, target_modules, exclude_modules)
        self._right_factors: dict[str, Tensor] = {}
        self._calibration_stats = None
        if source == "activations":
            self._right_factors, self._calibration_stats = calibration_factors(
                self.aligned, aligned, self.pairs, calibration, tokenizer, max_calibration_tokens, progress
            )
        self._fingerprint = _Fingerprint(self.settings)
        self._options = {"eta": eta, "alpha_1": alpha_1, "max_rank": max_rank, "svd_method": svd_method,
                         "device": device, "dtype": dtype}
        self.ranks: dict[str, int] = {}

    @property
    def names(self) -> list[str]:
        """The state-dict keys of the targeted matrices."""
        return list(self.pairs)

    def build(self, name: str) -> SubspaceEntry:
        """The entry of matrix ``name`` (reads its aligned and unaligned weights)."""
        aligned_key, unaligned_key = self.pairs[name]
        entry = _build_entry(
            name, self.aligned, self.unaligned, aligned_key, unaligned_key, self._fingerprint,
            activation_factor=self._right_factors.get(name), **self._options,
        )
        self.ranks[name] = entry.rank
        return entry

    def metadata(self) -> dict[str, Any]:
        """The subspace's metadata; the fingerprint covers the entries built so far."""
        metadata = {
            **self.settings,
            "svd_method": self._options["svd_method"],
            "fingerprint": self._fingerprint.hexdigest(),
            "aligned": self.aligned.location,
            "unaligned": self.unaligned.location,
        }
        if self._calibration_stats:
            metadata["calibration_stats"] = self._calibration_stats
        return metadata


def _build_entry(
    name: str,
    aligned: WeightStore,
    unaligned: WeightStore,
    aligned_key: str,
    unaligned_key: str,
    fingerprint: _Fingerprint,
    *,
    eta: float,
    alpha_1: float,
    max_rank: int | None,
    svd_method: str,
    device,
    dtype,
    activation_factor: Tensor | None,
) -> SubspaceEntry:
    w_aligned = aligned.get(aligned_key)
    w_unaligned = unaligned.get(unaligned_key)
    fingerprint.add(f"aligned:{name}", w_aligned)
    fingerprint.add(f"unaligned:{name}", w_unaligned)
    compute = torch.float64 if w_aligned.dtype == torch.float64 else torch.float32
    target_device = torch.device(device) if device is not None else w_aligned.device
    delta = w_aligned.to(target_device, compute) - w_unaligned.to(target_device, compute)
    del w_unaligned
    if not all_finite(delta):
        culprit = "aligned" if not all_finite(w_aligned) else "unaligned"
        raise ValueError(f"{name}: the {culprit} weights hold NaN or inf")
    conv1d = aligned.is_conv1d(aligned_key)
    if conv1d:
        delta = delta.T
    signal = delta if activation_factor is None else delta @ activation_factor.to(delta)
    spectrum = safety_spectrum(signal, eta, method=svd_method, max_rank=max_rank)
    basis = spectrum.basis.to(delta.dtype)
    left, right = fusion_factors(weighted_basis(basis, spectrum.singular_values.to(delta.dtype), alpha_1), delta)
    out_dtype = dtype or (w_aligned.dtype if w_aligned.is_floating_point() else torch.float32)
    return SubspaceEntry(
        left=left.to("cpu", out_dtype),
        right=right.to("cpu", out_dtype),
        singular_values=spectrum.singular_values.to("cpu", torch.float32),
        entropy=float(spectrum.entropy),
        total_energy=float(spectrum.total_energy),
        conv1d=conv1d,
    )
