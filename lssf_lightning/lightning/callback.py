r"""
LSSF callback
^^^^^^^^^^^^^

Keeps a fine-tuning run safe: the run's checkpoints (or its live weights, or an exported model) carry the
Low-Rank Safety Subspace Fusion ``W ← W + α·U'(U'ᵀδ)`` of the aligned model's safety vector
``δ = W_aligned − W_unaligned``, and the run logs how often the model refuses harmful requests.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lssf_lightning.core.basis import add_correction, check_alpha_1
from lssf_lightning.core.entropy import check_eta
from lssf_lightning.io.export import write_model_directory
from lssf_lightning.io.names import canonical_key, is_adapter_key
from lssf_lightning.io.weights import MappingStore, ModuleStore
from lssf_lightning.subspace import SafetySubspace

__all__ = ["LSSFCallback"]

RAW_WEIGHTS_KEY = "lssf_raw_fixups"
CHECKPOINT_INFO_KEY = "lssf"
DEFAULT_AUTO_ALPHAS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
_MONITORED = ("refusal_rate", "refusal_rate_realigned", "harmless_refusal_rate", "harmless_refusal_rate_realigned")


class LSSFCallback(Callback):
    r"""Realign a fine-tuning run with Low-Rank Safety Subspace Fusion (LSSF) and monitor its refusals.

    At the start of fit (``setup``) the callback computes, per targeted weight matrix, the safety subspace of
    ``δ = W_aligned − W_unaligned`` and keeps only its rank-``r`` factors. It then fuses
    ``α·U'(U'ᵀδ)`` into the weights at the moment ``apply_on`` chooses:

    - ``"checkpoint"``: every checkpoint Lightning writes holds realigned weights in ``state_dict`` (so
      ``load_from_checkpoint`` and exports give the safe model) while the live weights stay raw. Resuming
      recomputes the correction, subtracts it, and restores the few entries where rounding differs from the
      raw value (stored under ``"lssf_raw_fixups"``), so training continues from the raw weights exactly.
    - ``"epochs"``: the live weights are realigned at the end of the epochs in ``apply_epochs``, before
      ``ModelCheckpoint`` saves that epoch (ModelPruning-style).
    - ``"train_end"``: nothing changes during training; at the end ``export_dir`` receives a realigned model.

    Repeated application never stacks: the callback tracks the fusion strength already in the live weights
    and each application adds only what is missing to reach :meth:`alpha_at` of that epoch (``alpha`` by
    default). Listing several epochs therefore fuses once, unless a subclass ramps :meth:`alpha_at`.

    With ``monitor_refusal`` it generates greedy answers to a few harmful and harmless prompts at every
    validation epoch end and logs ``lssf/refusal_rate`` (raw weights), ``lssf/refusal_rate_realigned``
    (the fusion swapped in, then the exact raw weights swapped back), ``lssf/harmless_refusal_rate`` and
    ``lssf/harmless_refusal_rate_realigned`` (over-refusal). Under DDP the prompts are split over ranks and
    the counts summed.

    Example::

        from lightning.pytorch import Trainer
        from lssf_lightning import LSSFCallback

        trainer = Trainer(callbacks=[LSSFCallback(unaligned="path/to/Llama-3.1-8B", alpha=1.0)])
        trainer.fit(model, datamodule)  # model holds Llama-3.1-8B-Instruct (the aligned model) at fit start

    Args:
        unaligned: the unaligned counterpart of the aligned model: a HF model directory or safetensors file(s)
            (the pre-trained base, or a harmful fine-tune of the aligned model).
        aligned: the aligned model (same forms). ``None``: the LightningModule's own weights when fit starts
            (read in ``setup``, before any checkpoint is restored) — the usual case of fine-tuning the aligned
            model itself.
        eta: share of the safety singular value entropy kept by each rank, in ``(0, 1]``.
        alpha: fusion strength ``α``, or ``"auto"``: at each validation epoch end (or once at the end of training
            without validation) the smallest of ``auto_alphas`` whose realigned model refuses at least the target
            share of ``auto_prompts`` (see :meth:`choose_alpha`); ``1.0`` until then. Logged as ``lssf/alpha``.
        alpha_1: weight of the strongest direction in the weighted projector (``1`` = plain projector).
        source: ``"weights"`` (SVD of ``δ``, data-free) or ``"activations"`` (SVD of ``δ·X̂`` on the inputs of
            ``calibration``).
        calibration: calibration prompts or (prompt, response) pairs for ``source="activations"``: a
            ``.txt``/``.jsonl``/``.csv`` path; ``None`` uses the bundled harmful calibration prompts.
        target_modules: peft-style module selection: a list of module-name suffixes, a full-match regex, or
            ``"all-linear"``. ``None``: every linear layer of the transformer blocks.
        exclude_modules: peft-style exclusion, applied after ``target_modules``.
        max_rank: optional cap on every rank.
        apply_on: ``"checkpoint"``, ``"epochs"`` or ``"train_end"`` (see above).
        apply_epochs: for ``"epochs"``: the 0-based epochs at whose end to fuse, or a float in ``(0, 1]``: the
            share of ``max_epochs`` after which to fuse once.
        export_dir: at the end of fit, write a realigned HF model directory (safetensors, config, tokenizer)
            here. Required for ``"train_end"``, optional otherwise.
        subspace_cache: a ``.safetensors`` file for the subspace: loaded when its content hash matches the
            inputs, written after a build.
        keep_raw_weights: in ``"checkpoint"`` mode, store what makes resuming exact: the entries where
            ``fused − correction`` does not round back to the raw value (typically a few percent, as index and
            value) and a checksum. ``False``: a resume recovers the raw weights as ``fused − correction``,
            equal up to float rounding.
        monitor_refusal: log refusal rates at every validation epoch end.
        refusal_prompts: harmful prompts for the monitor (a .txt/.jsonl/.csv path); default: the bundled set.
        harmless_prompts: harmless prompts for the over-refusal rate; default: the bundled set.
        num_monitor_prompts: how many prompts of each set the monitor uses.
        monitor_max_new_tokens: tokens generated per answer. The judge reads only the start: on the demo's
            1,920 answers, cutting 16 tokens to 8 changed one verdict.
        judge: ``None``/``"phrases"`` (refusal-phrase matching), a local HF classifier directory, or a callable
            ``list[str] -> list[bool]`` (in YAML: its dotted import path).
        min_refusal_rate: if set, realign the live weights when the monitored raw refusal rate falls below it.
        model_attribute: the LightningModule attribute holding the HF model; default: found automatically.
        tokenizer: tokenizer path for the monitor; default: the module's ``tokenizer`` attribute, else the one
            in ``unaligned``.
        svd_method: ``"auto"`` (fast, certified), ``"exact"``, ``"randomized"`` or ``"gram"``.
        auto_alphas: the grid for ``alpha="auto"`` (default ``0.25 … 3``).
        auto_target: the refusal rate ``alpha="auto"`` aims at; default: the aligned model's own rate on
            ``auto_prompts``, measured at fit start, minus ``auto_tolerance``.
        auto_tolerance: see ``auto_target``.
        auto_prompts: harmful prompts for tuning ``α`` (a path); default: the bundled calibration set, which is
            disjoint from the monitor's evaluation prompts.
        verbose: print what the callback does.

    Raises:
        MisconfigurationException: on invalid arguments, or at setup on an unsupported strategy
            (DeepSpeed, sharded checkpoints) or ``ModelCheckpoint(save_weights_only=True)`` in checkpoint mode.
    """

    def __init__(
        self,
        unaligned: str,
        aligned: str | None = None,
        eta: float = 0.9,
        alpha: float | Literal["auto"] = 1.0,
        alpha_1: float = 1.0,
        source: Literal["weights", "activations"] = "weights",
        calibration: str | None = None,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        max_rank: int | None = None,
        apply_on: Literal["checkpoint", "epochs", "train_end"] = "checkpoint",
        apply_epochs: list[int] | float | None = None,
        export_dir: str | None = None,
        subspace_cache: str | None = None,
        keep_raw_weights: bool = True,
        monitor_refusal: bool = True,
        refusal_prompts: str | None = None,
        harmless_prompts: str | None = None,
        num_monitor_prompts: int = 16,
        monitor_max_new_tokens: int = 8,
        judge: str | Callable[[list[str]], list[bool]] | None = None,
        min_refusal_rate: float | None = None,
        model_attribute: str | None = None,
        tokenizer: str | None = None,
        svd_method: Literal["auto", "exact", "randomized", "gram"] = "auto",
        auto_alphas: list[float] | None = None,
        auto_target: float | None = None,
        auto_tolerance: float = 0.05,
        auto_prompts: str | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        try:
            check_eta(eta)
            check_alpha_1(alpha_1)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        if alpha != "auto" and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)):
            raise MisconfigurationException(f"`alpha` must be a finite number or 'auto', got {alpha!r}")
        auto_alphas = list(auto_alphas) if auto_alphas is not None else list(DEFAULT_AUTO_ALPHAS)
        if not auto_alphas or not all(isinstance(a, (int, float)) and math.isfinite(a) and a > 0 for a in auto_alphas):
            raise MisconfigurationException(f"`auto_alphas` must be a non-empty list of numbers > 0, got {auto_alphas!r}")
        if auto_target is not None and not 0.0 <= auto_target <= 1.0:
            raise MisconfigurationException(f"`auto_target` must be in [0, 1], got {auto_target!r}")
        if source not in ("weights", "activations"):
            raise MisconfigurationException(f"`source` must be 'weights' or 'activations', got {source!r}")
        if apply_on not in ("checkpoint", "epochs", "train_end"):
            raise MisconfigurationException(
                f"`apply_on` must be one of ('checkpoint', 'epochs', 'train_end'), got {apply_on!r}"
            )
        _check_apply_epochs(apply_on, apply_epochs)
        if apply_on == "train_end" and not export_dir:
            raise MisconfigurationException("`apply_on='train_end'` needs `export_dir`: where to write the model")
        if min_refusal_rate is not None and not (0.0 <= min_refusal_rate <= 1.0 and monitor_refusal):
            raise MisconfigurationException(
                f"`min_refusal_rate` must be in [0, 1] and needs `monitor_refusal=True`, got {min_refusal_rate!r}"
            )
        for name, value in (("num_monitor_prompts", num_monitor_prompts), ("monitor_max_new_tokens", monitor_max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MisconfigurationException(f"`{name}` must be a positive integer, got {value!r}")
        self.unaligned = unaligned
        self.aligned = aligned
        self.eta = eta
        self.alpha = alpha if alpha == "auto" else float(alpha)
        self.alpha_1 = alpha_1
        self.source = source
        self.calibration = calibration
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.max_rank = max_rank
        self.apply_on = apply_on
        self.apply_epochs = apply_epochs
        self.export_dir = export_dir
        self.subspace_cache = subspace_cache
        self.keep_raw_weights = keep_raw_weights
        self.monitor_refusal = monitor_refusal
        self.refusal_prompts = refusal_prompts
        self.harmless_prompts = harmless_prompts
        self.num_monitor_prompts = num_monitor_prompts
        self.monitor_max_new_tokens = monitor_max_new_tokens
        self.judge = judge
        self.min_refusal_rate = min_refusal_rate
        self.model_attribute = model_attribute
        self.tokenizer = tokenizer
        self.svd_method = svd_method
        self.auto_alphas = sorted(float(a) for a in auto_alphas)
        self.auto_target = auto_target
        self.auto_tolerance = float(auto_tolerance)
        self.auto_prompts = auto_prompts
        self.verbose = verbose

        self.subspace: SafetySubspace | None = None
        self.current_alpha = 1.0 if alpha == "auto" else float(alpha)
        self.alpha_curve: list = []
        self._target_value: float | None = auto_target
        self.applied_alpha = 0.0
        self._applied_epochs: set[int] = set()
        self._resolved_epochs: set[int] = set()
        self._metrics: dict[str, Any] = {}
        self._prompts: dict[str, list[str]] = {}
        self._tokenizer = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(unaligned=self.unaligned, apply_on=self.apply_on)

    # -- overridable predicates -------------------------------------------------------------------------
    def should_apply(self, epoch: int) -> bool:
        """Whether to realign the live weights at the end of ``epoch`` (``apply_on="epochs"``)."""
        return epoch in self._resolved_epochs

    def alpha_at(self, epoch: int) -> float:
        """The total fusion strength the live weights should carry after ``epoch``'s application."""
        return self.current_alpha

    # -- setup ------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer)
        self._check_checkpoint_callbacks(trainer)
        self._resolved_epochs = _resolve_epochs(self.apply_on, self.apply_epochs, trainer.max_epochs)
        self.subspace = self._load_or_build(trainer, pl_module)

    def _check_strategy(self, trainer: Trainer) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            raise MisconfigurationException(
                "LSSFCallback does not support DeepSpeed: DeepSpeed drops `state_dict` from Lightning's checkpoint "
                "and saves its own shards, so realigned weights would be lost silently. Train with DDP or FSDP, "
                "or realign the saved model afterwards with `lssf-lightning realign`."
            )
        if isinstance(strategy, ModelParallelStrategy):
            raise MisconfigurationException(
                "LSSFCallback does not support ModelParallelStrategy (sharded DTensor weights). Use FSDPStrategy "
                "with state_dict_type='full', or realign the saved model with `lssf-lightning realign`."
            )
        if isinstance(strategy, FSDPStrategy):
            if getattr(strategy, "_state_dict_type", "full") != "full":
                raise MisconfigurationException(
                    "LSSFCallback needs full state dicts under FSDP: set FSDPStrategy(state_dict_type='full'); "
                    "sharded checkpoints cannot be realigned without gathering each matrix."
                )
            if self.apply_on == "epochs" or self.min_refusal_rate is not None:
                raise MisconfigurationException(
                    "LSSFCallback cannot edit sharded live weights under FSDP: use apply_on='checkpoint' or "
                    "'train_end', and no `min_refusal_rate`."
                )
            if self.monitor_refusal:
                rank_zero_warn("LSSFCallback: the refusal monitor is off under FSDP (generation needs full weights).")
                self.monitor_refusal = False

    def _check_checkpoint_callbacks(self, trainer: Trainer) -> None:
        if self.apply_on != "checkpoint":
            return
        weights_only = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_weights_only]
        if weights_only:
            raise MisconfigurationException(
                "ModelCheckpoint(save_weights_only=True) skips callbacks' `on_save_checkpoint`, so its checkpoints "
                "would not be realigned. Set save_weights_only=False, or use LSSFCallback(apply_on='train_end', "
                "export_dir=...) to export a realigned model at the end."
            )

    def _load_or_build(self, trainer: Trainer, pl_module: LightningModule) -> SafetySubspace:
        aligned = self.aligned if self.aligned is not None else self._hf_model(pl_module)
        settings = {
            "eta": self.eta, "alpha_1": self.alpha_1, "source": self.source, "max_rank": self.max_rank,
            "calibration": self.calibration, "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
        }
        cache = Path(self.subspace_cache).expanduser() if self.subspace_cache else None
        if cache is not None and cache.is_file():
            cached = SafetySubspace.load(cache)
            if cached.metadata.get("fingerprint") == SafetySubspace.fingerprint(aligned, self.unaligned, **settings):
                self._info(f"LSSF: loaded the safety subspace from {cache} ({cached})")
                return cached
            rank_zero_warn(f"LSSFCallback: {cache} was built from other weights or settings; rebuilding it.")
        device = trainer.strategy.root_device
        subspace = SafetySubspace.from_weights(
            aligned, self.unaligned, svd_method=self.svd_method, tokenizer=self._resolve_tokenizer(pl_module)
            if self.source == "activations" else None, device=device if device.type != "cpu" else None,
            progress=self.verbose and trainer.is_global_zero, **settings,
        )
        self._info(f"LSSF: built {subspace}")
        if cache is not None and trainer.is_global_zero:
            subspace.save(cache)
        trainer.strategy.barrier("lssf_subspace")
        return subspace

    # -- checkpoint mode --------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.apply_on != "checkpoint" or self.subspace is None or not trainer.is_global_zero:
            return
        extra = self.current_alpha - self.applied_alpha
        state = checkpoint.get("state_dict") or {}
        fixups = {}
        for key, name in self._matched(state.keys()).items():
            raw = state[key]
            product = self.subspace.product(name, raw)
            state[key] = add_correction(raw, product, extra)  # a new tensor: the live weights stay raw
            if self.keep_raw_weights:
                fixups[key] = _fixup(raw, add_correction(state[key], product, -extra))
        checkpoint[CHECKPOINT_INFO_KEY] = {"alpha_added": extra, "applied_alpha": self.applied_alpha,
                                           "fingerprint": self.subspace.metadata.get("fingerprint")}
        if self.keep_raw_weights:
            checkpoint[RAW_WEIGHTS_KEY] = fixups

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get(CHECKPOINT_INFO_KEY)
        if not info or trainer.state.fn != "fit" or self.subspace is None or not info.get("alpha_added"):
            return
        fixups = checkpoint.get(RAW_WEIGHTS_KEY)
        if fixups is None:
            rank_zero_warn("LSSFCallback: the checkpoint holds no raw-weight fix-ups (keep_raw_weights=False); "
                           "resuming from realigned weights minus the correction, equal to the raw ones up to rounding.")
        inexact = []
        with torch.no_grad(), _full_parameters(trainer, pl_module):
            parameters = _named_tensors(pl_module)
            for key, name in self._matched(parameters.keys()).items():
                fused = parameters[key]
                raw = add_correction(fused, self.subspace.product(name, fused), -info["alpha_added"])
                if fixups is not None and key in fixups:
                    if not _apply_fixup(raw, fixups[key]):
                        inexact.append(key)
                fused.copy_(raw)
        if inexact:
            rank_zero_warn(f"LSSFCallback: {len(inexact)} weights (e.g. {inexact[0]}) came back close to, not exactly, "
                           "their raw values: the correction was recomputed differently (other hardware or threads?).")

    def state_dict(self) -> dict[str, Any]:
        return {
            "applied_alpha": self.applied_alpha,
            "current_alpha": self.current_alpha,
            "auto_target": self._target_value,
            "alpha_curve": self.alpha_curve,
            "applied_epochs": sorted(self._applied_epochs),
            "fingerprint": self.subspace.metadata.get("fingerprint") if self.subspace else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied_alpha = float(state_dict.get("applied_alpha", 0.0))
        self.current_alpha = float(state_dict.get("current_alpha", self.current_alpha))
        self._target_value = state_dict.get("auto_target", self._target_value)
        self.alpha_curve = list(state_dict.get("alpha_curve", []))
        self._applied_epochs = set(state_dict.get("applied_epochs", []))
        fingerprint = state_dict.get("fingerprint")
        if fingerprint and self.subspace is not None and fingerprint != self.subspace.metadata.get("fingerprint"):
            rank_zero_warn("LSSFCallback: the checkpoint was written with a different safety subspace "
                           "(other weights or settings) than the one built for this run.")

    # -- epochs mode and live fusion ----------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.alpha == "auto" and self._target_value is None and trainer.ckpt_path is None:
            aligned_rate = self._refusal_rate(trainer, pl_module, self._auto_prompts(trainer))
            self._target_value = max(aligned_rate - self.auto_tolerance, 0.0)
            self._info(f"LSSF: the aligned model refuses {aligned_rate:.0%} of the alpha-tuning prompts; "
                       f"alpha='auto' aims at {self._target_value:.0%}")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self.alpha == "auto":
            self.choose_alpha(trainer, pl_module)
            pl_module.log("lssf/alpha", self.current_alpha, on_epoch=True)
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._maybe_apply(trainer, pl_module)
        if self.monitor_refusal:
            self._monitor(trainer, pl_module)

    def choose_alpha(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """``alpha="auto"``: set ``current_alpha`` to the smallest of ``auto_alphas`` whose realigned model refuses
        at least the target share of the tuning prompts (``auto_target``, or the aligned model's own rate measured
        at fit start minus ``auto_tolerance``); the highest-refusal ``α`` when none reaches it."""
        from lssf_lightning.tuning import refusal_curve, smallest_alpha_reaching

        target = self._target_value if self._target_value is not None else 1.0 - self.auto_tolerance
        offset = self.applied_alpha  # the live weights already carry this much
        curve = refusal_curve(
            self._hf_model(pl_module), self._resolve_tokenizer(pl_module), self.subspace,
            [a - offset for a in self.auto_alphas], self._auto_prompts(trainer), target=target,
            max_new_tokens=self.monitor_max_new_tokens, rate=lambda answers: self._synced_rate(pl_module, answers),
        )
        self.alpha_curve = [{"alpha": p.alpha + offset, "refusal": p.harmful_refusal} for p in curve]
        alpha, reached = smallest_alpha_reaching(curve, target)
        self.current_alpha = alpha + offset
        if not reached:
            rank_zero_warn(f"LSSFCallback: no alpha in {self.auto_alphas} restores {target:.0%} refusal on the tuning "
                           f"prompts; using alpha={self.current_alpha:g} (the highest refusal, {curve[-1]})")
        self._info(f"LSSF: alpha='auto' chose alpha={self.current_alpha:g} (curve {self.alpha_curve})")
        return self.current_alpha

    def _auto_prompts(self, trainer: Trainer) -> list[str]:
        from lssf_lightning.metrics import load_prompts

        prompts = load_prompts(self.auto_prompts or "harmful_calibration")
        return prompts[trainer.global_rank :: trainer.world_size]

    def _refusal_rate(self, trainer: Trainer, pl_module: LightningModule, prompts: list[str]) -> float:
        from lssf_lightning.metrics import generate_responses

        answers = generate_responses(self._hf_model(pl_module), self._resolve_tokenizer(pl_module), prompts,
                                     max_new_tokens=self.monitor_max_new_tokens)
        return self._synced_rate(pl_module, answers)

    def _synced_rate(self, pl_module: LightningModule, answers: list[str]) -> float:
        """The refusal rate of ``answers`` summed over all ranks (a collective: every rank calls it)."""
        from lssf_lightning.metrics import HarmfulRefusalRate

        metric = HarmfulRefusalRate(judge=self.judge).to(pl_module.device)
        metric.update(answers)
        return float(metric.compute())

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_apply(trainer, pl_module)

    def _maybe_apply(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.apply_on != "epochs" or epoch in self._applied_epochs or not self.should_apply(epoch):
            return
        self._applied_epochs.add(epoch)
        self.realign_live(pl_module, self.alpha_at(epoch))
        self._info(f"LSSF: realigned the live weights at the end of epoch {epoch} (alpha={self.applied_alpha:g})")

    def realign_live(self, pl_module: LightningModule, target_alpha: float | None = None) -> None:
        """Bring the live weights to a fusion strength of ``target_alpha`` (default ``alpha``), adding only the
        difference to what earlier applications added."""
        target_alpha = self.current_alpha if target_alpha is None else float(target_alpha)
        extra = target_alpha - self.applied_alpha
        if extra != 0:
            parameters = _named_tensors(pl_module)
            with torch.no_grad():
                for key, name in self._matched(parameters.keys()).items():
                    parameters[key].copy_(self.subspace.fuse_tensor(name, parameters[key], extra))
        self.applied_alpha = target_alpha

    def realigned_weights(self, pl_module: LightningModule):
        """Context manager: the fully realigned weights (``current_alpha``) in ``pl_module`` for the block; the
        exact raw weights come back after."""
        return self.subspace.temporarily_fused(self._hf_model(pl_module), self.current_alpha - self.applied_alpha)

    # -- monitor ----------------------------------------------------------------------------------------
    def _monitor(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lssf_lightning.metrics import HarmfulRefusalRate, generate_responses, load_prompts

        if not self._metrics:
            self._prompts = {
                "harmful": load_prompts(self.refusal_prompts or "harmful")[: self.num_monitor_prompts],
                "harmless": load_prompts(self.harmless_prompts or "harmless")[: self.num_monitor_prompts],
            }
            self._metrics = {name: HarmfulRefusalRate(judge=self.judge) for name in _MONITORED}
        model, tokenizer = self._hf_model(pl_module), self._resolve_tokenizer(pl_module)
        rank, world = trainer.global_rank, trainer.world_size
        shard = {kind: prompts[rank::world] for kind, prompts in self._prompts.items()}

        def answers(kind: str) -> list[str]:
            return generate_responses(model, tokenizer, shard[kind], max_new_tokens=self.monitor_max_new_tokens)

        raw = {kind: answers(kind) for kind in shard}
        if self.current_alpha != self.applied_alpha:
            with self.realigned_weights(pl_module):
                realigned = {kind: answers(kind) for kind in shard}
        else:
            realigned = raw
        updates = {"refusal_rate": raw["harmful"], "refusal_rate_realigned": realigned["harmful"],
                   "harmless_refusal_rate": raw["harmless"], "harmless_refusal_rate_realigned": realigned["harmless"]}
        values = {}
        for name, responses in updates.items():
            metric = self._metrics[name].to(pl_module.device)
            metric.update(responses)
            values[name] = metric.compute()
            metric.reset()
        for name, value in values.items():
            pl_module.log(f"lssf/{name}", value, on_epoch=True, prog_bar=name == "refusal_rate", sync_dist=False)
        if self.min_refusal_rate is not None and float(values["refusal_rate"]) < self.min_refusal_rate:
            if self.applied_alpha != self.current_alpha:
                self.realign_live(pl_module)
                self._info(f"LSSF: refusal rate {float(values['refusal_rate']):.2f} < {self.min_refusal_rate}: "
                           "realigned the live weights")

    # -- export -----------------------------------------------------------------------------------------
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.subspace is None:
            return
        if self.alpha == "auto" and not self.alpha_curve:
            self.choose_alpha(trainer, pl_module)  # no validation ran: tune once, before the export
        if self.export_dir:
            self.export(trainer, pl_module, self.export_dir)

    def export(self, trainer: Trainer, pl_module: LightningModule, directory: str | os.PathLike) -> Path | None:
        """Write the realigned model (live weights + the missing correction) as a HF model directory.

        Runs on every rank (FSDP gathers the full state dict collectively); rank 0 writes.
        """
        hf_model = self._hf_model(pl_module)
        base_model = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
        if isinstance(trainer.strategy, FSDPStrategy):
            state = trainer.strategy.lightning_module_state_dict()
            store, prefix = MappingStore(state, location="FSDP full state dict"), self._attribute(pl_module) + "."
        else:
            store, prefix = ModuleStore(hf_model), ""
        path = None
        if trainer.is_global_zero:
            extra = self.current_alpha - self.applied_alpha
            edits = {key: (lambda w, n=name: self.subspace.fuse_tensor(n, w, extra)) for key, name in
                     self._matched(store.keys()).items()}
            names = {k: None if is_adapter_key(k) else canonical_key(k.removeprefix(prefix)) for k in store.keys()}
            tokenizer = self._resolve_tokenizer(pl_module, required=False)

            def support(staging: Path) -> None:
                base_model.config.save_pretrained(staging)
                if getattr(base_model, "generation_config", None) is not None:
                    base_model.generation_config.save_pretrained(staging)
                if tokenizer is not None:
                    tokenizer.save_pretrained(staging)

            write_model_directory(store, directory, edits=edits, names=names, write_support_files=support,
                                  overwrite=True, progress=self.verbose)
            path = Path(directory)
            self._info(f"LSSF: exported the realigned model to {path}")
        trainer.strategy.barrier("lssf_export")
        return path

    # -- helpers ----------------------------------------------------------------------------------------
    def _matched(self, keys) -> dict[str, str]:
        return self.subspace.match([k for k in keys if not is_adapter_key(k)])

    def _attribute(self, pl_module: LightningModule) -> str:
        if self.model_attribute:
            if not isinstance(getattr(pl_module, self.model_attribute, None), nn.Module):
                raise MisconfigurationException(
                    f"`model_attribute={self.model_attribute!r}`: {type(pl_module).__name__} has no such module"
                )
            return self.model_attribute
        candidates = [name for name, child in pl_module.named_children() if _is_causal_lm(child)]
        if len(candidates) != 1:
            found = "none" if not candidates else ", ".join(candidates)
            raise MisconfigurationException(
                f"LSSFCallback could not tell which attribute of {type(pl_module).__name__} holds the HF model "
                f"(candidates: {found}); pass `model_attribute=`."
            )
        return candidates[0]

    def _hf_model(self, pl_module: LightningModule) -> nn.Module:
        return getattr(pl_module, self._attribute(pl_module))

    def _resolve_tokenizer(self, pl_module: LightningModule, required: bool = True):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if self.tokenizer is not None:
                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer)
            elif getattr(pl_module, "tokenizer", None) is not None:
                self._tokenizer = pl_module.tokenizer
            elif Path(self.unaligned).is_dir() and any(Path(self.unaligned).glob("tokenizer*")):
                self._tokenizer = AutoTokenizer.from_pretrained(self.unaligned)
            elif required:
                raise MisconfigurationException(
                    "LSSFCallback needs a tokenizer for the refusal monitor / calibration: pass `tokenizer=` or "
                    "give the LightningModule a `tokenizer` attribute."
                )
        return self._tokenizer

    def _info(self, message: str) -> None:
        if self.verbose:
            rank_zero_info(message)


def _fixup(raw: Tensor, recovered: Tensor) -> dict[str, Any]:
    """What a resume needs to turn ``recovered`` (``fused − correction``) back into ``raw`` exactly: the few
    entries where rounding differs, and a checksum of the raw tensor."""
    flat_raw, flat_recovered = raw.reshape(-1), recovered.reshape(-1)
    index = torch.nonzero(flat_recovered != flat_raw).squeeze(1)
    return {"index": index.cpu(), "value": flat_raw[index].cpu(), "checksum": _checksum(raw)}


def _apply_fixup(recovered: Tensor, fixup: dict[str, Any]) -> bool:
    """Write the stored raw entries into ``recovered``; True when the result matches the raw checksum."""
    flat = recovered.view(-1)
    flat[fixup["index"].to(flat.device)] = fixup["value"].to(device=flat.device, dtype=flat.dtype)
    return _checksum(recovered) == fixup["checksum"]


def _checksum(tensor: Tensor) -> tuple[float, float]:
    values = tensor.detach().double()
    return float(values.sum()), float(values.square().sum())


def _is_causal_lm(module: nn.Module) -> bool:
    return hasattr(module, "generate") and hasattr(module, "config")


def _named_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by their state-dict names (what checkpoint keys refer to)."""
    return {**dict(module.named_buffers()), **dict(module.named_parameters())}


@contextlib.contextmanager
def _full_parameters(trainer: Trainer, pl_module: LightningModule) -> Iterator[None]:
    """Under FSDP, expose full parameters for writing (collective); elsewhere a no-op."""
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(pl_module, writeback=True):
            yield
    else:
        yield


def _check_apply_epochs(apply_on: str, apply_epochs) -> None:
    if apply_on != "epochs":
        if apply_epochs is not None:
            raise MisconfigurationException(f"`apply_epochs` is only used with apply_on='epochs', not {apply_on!r}")
        return
    if isinstance(apply_epochs, float) and not isinstance(apply_epochs, bool):
        if not 0.0 < apply_epochs <= 1.0:
            raise MisconfigurationException(f"`apply_epochs` as a float must be in (0, 1], got {apply_epochs!r}")
        return
    if (
        isinstance(apply_epochs, Sequence)
        and not isinstance(apply_epochs, str)
        and apply_epochs
        and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in apply_epochs)
    ):
        return
    raise MisconfigurationException(
        "apply_on='epochs' needs `apply_epochs`: a non-empty list of epoch indices >= 0 or a float in (0, 1], "
        f"got {apply_epochs!r}"
    )


def _resolve_epochs(apply_on: str, apply_epochs, max_epochs: int | None) -> set[int]:
    if apply_on != "epochs":
        return set()
    if isinstance(apply_epochs, float):
        if max_epochs is None or max_epochs < 1:
            raise MisconfigurationException("`apply_epochs` as a fraction needs a finite `Trainer(max_epochs=...)`")
        return {max(math.ceil(apply_epochs * max_epochs) - 1, 0)}
    return set(apply_epochs)
