"""LSSFCallback; its state lives in :mod:`lssf_lightning.training`, refusal logging in
:class:`RefusalMonitor`, ``alpha="auto"`` in :class:`AutoAlpha`, strategy-specific code in
:mod:`lssf_lightning.lightning.strategy`."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lssf_lightning import forms, training
from lssf_lightning.adapters import write_model_adapter
from lssf_lightning.config import AutoAlphaConfig, SubspaceConfig
from lssf_lightning.io.export import write_model_directory
from lssf_lightning.io.names import is_adapter_key
from lssf_lightning.lightning import strategy
from lssf_lightning.lightning.auto_alpha import AutoAlpha
from lssf_lightning.lightning.hf import find_tokenizer, hf_model, hf_model_attribute
from lssf_lightning.lightning.monitor import RefusalMonitor
from lssf_lightning.monitoring import auto_methods, check_min_refusal_rate, needs_realignment
from lssf_lightning.stability import UpdateShare, lora_scalings, metric_names
from lssf_lightning.subspace import SafetySubspace
from lssf_lightning.training import CHECKPOINT_INFO_KEY, RAW_FIXUPS_KEY, FusionState
from lssf_lightning.validation import SettingError, check_choice

__all__ = ["CHECKPOINT_INFO_KEY", "RAW_FIXUPS_KEY", "RAW_WEIGHTS_KEY", "LSSFCallback"]

RAW_WEIGHTS_KEY = RAW_FIXUPS_KEY  # the former name


class LSSFCallback(Callback):
    r"""Realign a fine-tuning run with Low-Rank Safety Subspace Fusion (LSSF).

    At fit start (``setup``) it loads or computes the rank-``r`` safety subspace of
    ``δ = W_aligned − W_unaligned`` per targeted matrix, then fuses ``α·U'(U'ᵀδ)`` where ``apply_on`` says:
    ``"checkpoint"``: into every checkpoint's ``state_dict`` while the live weights stay raw (a resume
    restores them exactly, with the stored ``"lssf_raw_fixups"``, or refuses); ``"epochs"``: into the live
    weights at the end of the ``apply_epochs``, before ``ModelCheckpoint`` saves them; ``"train_end"``: only
    into ``export_dir``. Applications never stack: each adds only what is missing to reach :meth:`alpha_at`
    (``alpha`` by default).

    Example::

        lssf = LSSFCallback(unaligned="path/to/Llama-3.1-8B", subspace=SubspaceConfig(eta=0.9))
        trainer = Trainer(callbacks=[lssf])
        trainer.fit(model, datamodule)  # model holds Llama-3.1-8B-Instruct (the aligned model) at fit start

    Args:
        unaligned: the unaligned counterpart of the aligned model (HF directory or safetensors file(s)).
        aligned: the aligned model (same forms); ``None``: the LightningModule's weights when fit starts.
        subspace: the subspace settings (η, α₁, source, modules, ranks; see :class:`SubspaceConfig`).
        alpha: fusion strength ``α``, or ``"auto"``: :class:`AutoAlpha` chooses the form and its strength at
            each validation epoch end among ``auto_alpha.methods`` × ``auto_alpha.alphas`` (the sweep's rule,
            within ``max_perplexity_increase``; the first candidate at ``1.0`` until then); logged as
            ``lssf/alpha``, ``lssf/method/<name>`` and ``lssf/target_reached``, the method's name and
            "target not reached" in the checkpoint's callback state (``method``, ``auto_recommended``,
            ``auto_note``).
        apply_on: ``"checkpoint"``, ``"epochs"`` or ``"train_end"`` (see above).
        apply_epochs: for ``"epochs"``: 0-based epoch indices, or a share of ``max_epochs`` in ``(0, 1]``.
        export_dir: write a realigned HF model directory here at the end of fit (needed for ``"train_end"``).
        subspace_cache: a ``.safetensors`` file: loaded when its fingerprint matches the inputs, written after
            a build; the subspace it replaces is kept next to it (``<stem>.fp-<fingerprint>.safetensors``, at
            most ``training.CACHE_KEEP`` = 8 subspaces in all, the oldest removed first), so a checkpoint
            written with earlier settings still resumes exactly without a rebuild.
        keep_raw_fixups: store what makes a resume exact (entries where ``fused − correction`` rounds off the
            raw value, a few percent, and a checksum); ``False``: exact up to rounding.
        auto_alpha: ``alpha="auto"``'s settings, or an :class:`AutoAlpha` (e.g. with its own judge).
        monitor: a :class:`RefusalMonitor` (raw and realigned rates), ``True`` (the default one) or ``False``.
        model_attribute: the LightningModule attribute holding the HF model; default: found automatically.
        tokenizer: tokenizer path; default: the module's ``tokenizer`` attribute, else ``unaligned``'s.
        verbose: print what the callback does.
        export_adapter_dir: also write a peft LoRA adapter here at the end of fit (rank 0). A full fine-tune
            gets the correction alone, for the fine-tuned model; a LoRA (peft) run gets ONE adapter for the
            aligned base model holding the task LoRA and the correction together.
        overwrite: replace an existing ``export_dir`` / ``export_adapter_dir`` (only if it holds files
            lssf_lightning writes). Both are checked in ``setup``, before training: an output that is,
            contains or lies inside an input (the module's source directory, ``aligned``, ``unaligned``, the
            cache, the Trainer's checkpoint and log folders) is refused.
        min_refusal_rate: realign the live weights (the whole missing fusion) when the monitor's raw refusal
            rate falls below this; needs a monitor.
        method: the fusion form, as ``realign --method``: ``"lssf"`` (the paper's additive form),
            ``"lssf-reset"``, ``"lssf-erosion"``, ``"lssf-two-sided"`` or any registered low-rank planner; a
            form other than ``"lssf"`` (or ``apply_on="steps"``) tracks the correction the live weights carry
            as rank-``r`` factors per matrix (:mod:`lssf_lightning.forms`): on one device, under DDP (every
            rank the same edit) and under FSDP2 (shard-local; the forms that read the weight all-reduce one
            ``r × d_in`` matrix per weight). On a peft LoRA model a form reads each adapted matrix merged
            (``base + s·B·A``) and corrects the frozen base (:mod:`lssf_lightning.forms.lora`). ``None``:
            ``"lssf"`` with a numeric ``alpha``; with ``alpha="auto"`` the forms of ``auto_alpha.methods``
            (default the reset form and the paper's), while a named method narrows ``"auto"`` to that form.
        add, input_share: the method's other parameters (a parameter it does not take is an error).
        every_n_steps: for ``apply_on="steps"``: apply the form after every N-th optimizer step (the guard).
        log_update_share: log ``lssf/update_in_subspace`` (the share of the update since fit start inside the
            safety subspace, overall and per layer group, at each train epoch end; in steps mode also
            ``lssf/update_in_subspace_step``, the optimizer's update since the previous application, measured
            only for the applications on a logged step, ``log_every_n_steps``) and
            ``lssf/subspace_drift``; single device, DDP and FSDP2 (shard-local, one all-reduce per matrix);
            on a peft LoRA model from the adapters; keeps a CPU copy of the targeted weights (of the adapters
            on LoRA).
    """

    def __init__(
        self,
        unaligned: str,
        aligned: str | None = None,
        subspace: SubspaceConfig | None = None,
        alpha: float | Literal["auto"] = 1.0,
        apply_on: Literal["checkpoint", "epochs", "train_end", "steps"] = "checkpoint",
        apply_epochs: list[int] | float | None = None,
        export_dir: str | None = None,
        subspace_cache: str | None = None,
        keep_raw_fixups: bool = True,
        auto_alpha: AutoAlphaConfig | AutoAlpha | None = None,
        monitor: RefusalMonitor | bool = True,
        model_attribute: str | None = None,
        tokenizer: str | None = None,
        verbose: bool = True,
        export_adapter_dir: str | None = None,
        overwrite: bool = False,
        min_refusal_rate: float | None = None,
        method: str | None = None,
        add: float | None = None,
        input_share: float | None = None,
        every_n_steps: int | None = None,
        log_update_share: bool = True,
    ) -> None:
        super().__init__()
        try:
            self.subspace_config = SubspaceConfig.coerce(subspace)
            self.alpha = training.check_alpha(alpha, allow_auto=True)
            self.form_options = {"alpha": alpha, "add": add, "input_share": input_share}
            methods = None
            if alpha == "auto":
                config = auto_alpha.config if isinstance(auto_alpha, AutoAlpha) else auto_alpha
                methods = auto_methods(method, self.form_options, config or AutoAlphaConfig())
            self.method, self.every_n_steps, self._named_method = method or "lssf", every_n_steps, method
            if forms.uses_forms(self.method, apply_on):
                forms.check_form_settings(self.method, self.form_options, apply_on, every_n_steps)
            else:
                forms.check_method_options(self.method, self.form_options)
                if every_n_steps is not None:
                    raise SettingError(f"every_n_steps is only used with apply_on='steps', not {apply_on!r}")
            self.apply_on = check_choice("apply_on", apply_on, (*training.APPLY_ON, "steps"))
            training.check_apply_epochs(apply_on, apply_epochs)
        except SettingError as err:
            raise MisconfigurationException(f"LSSFCallback: {err}") from None
        if apply_on == "train_end" and not export_dir:
            raise MisconfigurationException("`apply_on='train_end'` needs `export_dir`: where to write the "
                                            "model")
        self.unaligned, self.aligned, self.apply_epochs = unaligned, aligned, apply_epochs
        self.export_dir, self.export_adapter_dir, self.overwrite = export_dir, export_adapter_dir, overwrite
        self._inputs: list[Any] = [aligned, unaligned, subspace_cache]
        self.subspace_cache, self.keep_raw_fixups = subspace_cache, keep_raw_fixups
        self.model_attribute, self.tokenizer, self.verbose = model_attribute, tokenizer, verbose
        self.monitor: RefusalMonitor | None = RefusalMonitor() if monitor is True else monitor or None
        self.auto: AutoAlpha | None = None if self.alpha != "auto" else auto_alpha if isinstance(
            auto_alpha, AutoAlpha) else AutoAlpha(auto_alpha, self.monitor, methods)
        if self.auto is not None and method is not None:  # a named method narrows an AutoAlpha's grid
            self.auto.tuner.methods = methods
        for owned in (self.monitor, self.auto.monitor if self.auto else None):
            if owned is not None:
                owned.owner = self
        try:
            self.min_refusal_rate = check_min_refusal_rate(min_refusal_rate, self.monitor is not None)
        except SettingError as err:
            raise MisconfigurationException(f"LSSFCallback: {err}") from None
        self.subspace: SafetySubspace | None = None
        self.fusion = FusionState(target=1.0 if self.alpha == "auto" else self.alpha)
        self.applied_epochs: set[int] = set()
        self._epochs: set[int] = set()
        self._resume_subspaces: list[SafetySubspace] = []
        self._tokenizer = None
        self.live_forms: forms.LiveForms | forms.LoraHoldOut | None = None
        self.log_update_share, self.update_share = log_update_share, None
        self._last_guard_step = -1
        self._restored: dict[str, Any] | None = None  # alpha='auto': the resumed form's applied corrections

    @property
    @override
    def state_key(self) -> str:
        """Tells instances apart in a checkpoint's ``callbacks`` (by ``unaligned`` and ``apply_on``)."""
        return self._generate_state_key(unaligned=self.unaligned, apply_on=self.apply_on)

    current_alpha = property(lambda self: self.fusion.target, doc="The realigned model's fusion strength.")
    applied_alpha = property(lambda self: self.fusion.applied, doc="The fusion the live weights carry.")
    alpha_curve = property(lambda self: self.auto.curve if self.auto else [], doc="alpha='auto''s last curve")

    # -- overridable predicates -------------------------------------------------------------------------
    def should_apply(self, epoch: int) -> bool:
        """Whether to realign the live weights at the end of ``epoch`` (``apply_on="epochs"``)."""
        return epoch in self._epochs

    def alpha_at(self, epoch: int) -> float:
        """The total fusion strength the live weights should carry after ``epoch``'s application."""
        return self.fusion.target

    # -- setup ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the strategy and checkpointing, then load or build the safety subspace (``fit`` only)."""
        if stage != "fit":
            return
        self.check_outputs(trainer, pl_module)  # before any work
        live = self.apply_on == "epochs" or self.min_refusal_rate is not None
        strategy.check_strategy(trainer, self.apply_on, edits_live_weights=live)
        if self.monitor is not None and not strategy.monitor_supported(trainer):
            rank_zero_warn("LSSFCallback: the refusal monitor is off under FSDP (generation needs full "
                           "weights).")
            self.monitor = None
        self._epochs = training.resolve_epochs(self.apply_on, self.apply_epochs, trainer.max_epochs)
        device = trainer.strategy.root_device
        cached = training.read_cache(self.subspace_cache)
        self.subspace = training.load_or_build_subspace(
            self.aligned if self.aligned is not None else self.hf_model(pl_module), self.unaligned,
            self.subspace_config, cache=self.subspace_cache, cached=cached,
            write_cache=trainer.is_global_zero, info=self._info,
            tokenizer=(self.resolve_tokenizer(pl_module) if self.subspace_config.source == "activations"
                       else None),
            device=device if device.type != "cpu" else None, progress=self.verbose and trainer.is_global_zero,
        )
        # a stale cache may be what a resumed checkpoint was fused with: kept until the restore is done
        self._resume_subspaces = [cached] if cached is not None and cached is not self.subspace else []
        trainer.strategy.barrier("lssf_subspace")  # the cache is written: several ranks read factors from it
        self.subspace = training.disk_backed(self.subspace, self.subspace_cache, trainer.world_size)
        if self.auto is not None:
            self.method = _auto_start(self, trainer, pl_module)
        if forms.uses_forms(self.method, self.apply_on) and not strategy.shards_in_configure_model(trainer):
            self.live_forms = _live_forms(self, trainer, pl_module)

    def check_outputs(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse ``export_dir``, ``export_adapter_dir`` and ``subspace_cache`` when they overlap an input
        (the module's source, ``aligned``, ``unaligned``, the Trainer's own folders, the cache), or an
        existing export folder without ``overwrite`` or holding other files (the same one-line errors as the
        CLI)."""
        models = [training.model_source(self.hf_model(pl_module)), self.aligned, self.unaligned]
        self._inputs = [*models, *_trainer_folders(trainer), self.subspace_cache]
        training.check_outputs([self.export_dir, self.export_adapter_dir], self._inputs,
                               overwrite=self.overwrite, cache=self.subspace_cache, cache_inputs=models)

    # -- checkpoint mode --------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """``apply_on="checkpoint"``: fuse the checkpoint's copy of the weights (the live ones stay raw)."""
        if self.apply_on != "checkpoint" or self.subspace is None:
            return
        if not (trainer.is_global_zero or strategy.sharded_checkpoints(trainer)):  # FSDP2: all ranks fuse
            return
        if self.live_forms is not None:
            self.live_forms.fuse_checkpoint(checkpoint, keep_fixups=self.keep_raw_fixups)
            checkpoint[CHECKPOINT_INFO_KEY] = self.live_forms.info(self.subspace_config)
            return
        fixups = training.fuse_checkpoint(checkpoint.get("state_dict") or {}, self.subspace,
                                          self.fusion.missing, keep_fixups=self.keep_raw_fixups)
        checkpoint[CHECKPOINT_INFO_KEY] = training.checkpoint_info(self.subspace, self.fusion,
                                                                   self.subspace_config)
        if fixups is not None:
            checkpoint[RAW_FIXUPS_KEY] = fixups

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resuming a fit: turn the fused weights just loaded back into the raw ones, exactly (or refuse)."""
        info = checkpoint.get(CHECKPOINT_INFO_KEY)
        if forms.CORRECTIONS_KEY in checkpoint and trainer.state.fn == "fit":  # a form: from its own factors
            forms.restore_raw(training.named_tensors(pl_module), checkpoint)
            return
        if not info or trainer.state.fn != "fit" or self.subspace is None or not info.get("alpha_added"):
            return
        subspace = training.checkpoint_subspace(info, self.subspace, where=trainer.ckpt_path, progress=False,
                                                known=self._resume_subspaces, cache=self.subspace_cache,
                                                aligned=self.aligned, unaligned=self.unaligned)
        with strategy.full_parameters(trainer, pl_module):
            training.restore_raw(training.named_tensors(pl_module), subspace, info["alpha_added"],
                                 checkpoint.get(RAW_FIXUPS_KEY))

    @override
    def state_dict(self) -> dict[str, Any]:
        """Fusion strengths, auto-α's target and curve, the applied epochs and the subspace fingerprint."""
        auto = self.auto.state_dict() if self.auto is not None else {"auto_target": None, "alpha_curve": []}
        applied = {"applied_corrections": self.live_forms.state_dict()} if self.live_forms is not None else {}
        return {"applied_alpha": self.fusion.applied, "current_alpha": self.fusion.target, **auto, **applied,
                "method": self.method,
                "applied_epochs": sorted(self.applied_epochs),
                "fingerprint": self.subspace.metadata.get("fingerprint") if self.subspace else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.fusion.applied = float(state_dict.get("applied_alpha", 0.0))
        self.fusion.target = float(state_dict.get("current_alpha", self.fusion.target))
        if self.auto is not None:
            self.auto.load_state_dict(state_dict)
        self.applied_epochs = set(state_dict.get("applied_epochs", []))
        if self.auto is not None and state_dict.get("method"):  # the chosen form: rebuilt at train start
            self.method = state_dict["method"]
            self._restored = dict(state_dict.get("applied_corrections") or {})
        elif state_dict.get("applied_corrections"):
            if self.live_forms is None:
                raise MisconfigurationException(
                    "LSSFCallback: the checkpoint's live weights carry a correction of another form "
                    f"(method={self.method!r} here); resume with the method it was written with"
                )
            try:
                self.live_forms.load_state_dict(state_dict["applied_corrections"])
            except (SettingError, ValueError) as err:
                raise MisconfigurationException(f"LSSFCallback: {err}") from None
        stored = state_dict.get("fingerprint")
        ours = self.subspace and self.subspace.metadata.get("fingerprint")
        if self.fusion.applied and stored and ours and stored != ours:  # epochs mode: live weights hold it
            rank_zero_warn("LSSFCallback: the checkpoint was written with a different safety subspace (other "
                           "weights or settings) than this run's; the fusion its live weights carry "
                           f"(alpha={self.fusion.applied:g}) stays, and any further fusion uses this run's "
                           "subspace.")

    # -- epochs mode, auto-α and the monitor ------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Warn when no validation loop will run the monitor; ``alpha="auto"``: measure the aligned model's
        own refusal rate (the target) on a fresh run. FSDP2: the form on the shards ``configure_model`` made
        (before a checkpoint is restored)."""
        if self.live_forms is None and self.subspace is not None and forms.uses_forms(self.method,
                                                                                      self.apply_on):
            self.live_forms = _live_forms(self, trainer, pl_module)
        if self.monitor is not None or self.auto is not None:
            reason = _no_validation_loop(trainer)
            if reason is not None:
                auto = " and alpha='auto' is chosen once, at train end" if self.auto is not None else ""
                rank_zero_warn(
                    f"LSSFCallback: the refusal monitor runs at validation epoch end, but this run has no "
                    f"validation loop ({reason}), so no lssf/* rate will be logged"
                    f"{auto}; "
                    "pass validation data (ChatDataModule(val_file=...), a val_dataloader) or monitor=False "
                    "(checkpoints and exports are realigned either way)"
                )
        if self.auto is not None and trainer.ckpt_path is None:
            self.auto.measure_target(trainer, pl_module, verbose=self.verbose)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Drop the subspaces kept for a resume (any checkpoint is restored by now); start watching where the
        update goes (``log_update_share``)."""
        self._resume_subspaces = []
        if self._restored is not None:  # alpha='auto' resumed: the form it had chosen, with what it applied
            self.live_forms = None
            self.live_forms = _live_forms(self, trainer, pl_module) if forms.uses_forms(
                self.method, self.apply_on) else None
            if self._restored:
                self.live_forms.load_state_dict(self._restored)
            self._restored = None
        if self.log_update_share and self.subspace is not None:
            # every DDP rank holds the same full weights; FSDP2: every rank its blocks (all-reduced sums);
            # LoRA: the adapters' update s·B·A in factored form
            parameters = training.named_tensors(pl_module)
            adapters = lora_scalings(pl_module)
            matched = training.matched_keys(self.subspace, parameters)
            if adapters:  # the frozen matrices outside the adapters do not move: no copy of them
                matched = {k: n for k, n in matched.items() if k in adapters or parameters[k].requires_grad}
            self.update_share = UpdateShare(self.subspace, parameters, matched, adapters)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """``apply_on="steps"``: apply the form after every ``every_n_steps``-th optimizer step."""
        step = trainer.global_step
        if self.apply_on != "steps" or step in (0, self._last_guard_step) or step % self.every_n_steps:
            return
        self._last_guard_step = step
        parameters = training.named_tensors(pl_module)
        share = self.update_share  # measured only over the windows that end on a logged step: a copy of the
        if share is not None and share.previous is not None:  # weights and a GEMM per matrix each time
            pl_module.log_dict(metric_names(share.since_mark(parameters), "lssf/update_in_subspace_step"),
                               on_step=True)
            share.previous = None
        self.live_forms.apply_(parameters)
        if share is not None and _logs_step(trainer, step + self.every_n_steps):
            share.mark(parameters)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Choose ``α`` (auto), fuse on an ``apply_epochs`` epoch's last validation, run the owned monitor."""
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self.auto is not None:
            self.choose_form(trainer, pl_module)
            pl_module.log_dict(self.auto.tuner.logs(self.method, self.fusion.target), on_epoch=True)
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._maybe_apply(trainer, pl_module)
        if self.monitor is not None and self.monitor not in trainer.callbacks:
            self.monitor.on_validation_epoch_end(trainer, pl_module)
        last = self.monitor.last if self.monitor is not None else {}
        if needs_realignment(last, self.min_refusal_rate, self.fusion):  # a fusion policy, on the monitor's
            self.realign_live(pl_module)
            rank_zero_info(f"LSSF: refusal rate {float(last['refusal_rate']):.2f} < {self.min_refusal_rate}: "
                           "realigned the live weights")

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``apply_on="epochs"``: fuse at the end of an ``apply_epochs`` epoch (unless validation did); log
        where the update went."""
        self._maybe_apply(trainer, pl_module)
        if self.update_share is not None:
            pl_module.log_dict(self.update_share.metrics(training.named_tensors(pl_module)), on_epoch=True)

    def _maybe_apply(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Runs from two hooks so the epoch's checkpoint holds the fusion either way: with validation at the
        # epoch's end, ModelCheckpoint saves in `on_validation_end`, before `on_train_epoch_end`; without it,
        # it saves in `on_train_epoch_end` after this callback. `applied_epochs` makes the second call a
        # no-op.
        epoch = trainer.current_epoch
        if self.apply_on != "epochs" or epoch in self.applied_epochs or not self.should_apply(epoch):
            return
        self.applied_epochs.add(epoch)
        self.realign_live(pl_module, self.alpha_at(epoch))
        self._info(f"LSSF: realigned the live weights at the end of epoch {epoch} "
                   f"(alpha={self.fusion.applied:g})")

    def choose_form(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``alpha="auto"``: measure the candidate forms and strengths on the live model and make the choice
        the run's form (:class:`AutoAlpha`; the live weights keep any form they carry)."""
        live = self.live_forms if isinstance(self.live_forms, forms.LiveForms) else None
        candidates = forms.Candidates(
            self.hf_model(pl_module), training.named_tensors(pl_module), self.subspace, live=live,
            applied_alpha=self.fusion.applied, options=self.form_options, aligned=self.aligned,
            unaligned=self.unaligned, owner=pl_module)
        choice = self.auto.choose(trainer, pl_module, candidates, verbose=self.verbose)
        self.fusion.target = choice.alpha
        if forms.uses_forms(choice.method, self.apply_on):
            if choice.method != self.method and not (live is not None and live.carries):
                self.live_forms = None
            self.method = choice.method
            self.live_forms = _live_forms(self, trainer, pl_module)
        else:
            self.method, self.live_forms = choice.method, None

    def realign_live(self, pl_module: LightningModule, target_alpha: float | None = None) -> None:
        """Bring the live weights to a fusion strength of ``target_alpha`` (default ``current_alpha``), adding
        only the difference to what earlier applications added."""
        if self.live_forms is not None:  # a form: applied to (live − the correction already in them)
            self.live_forms.apply_(training.named_tensors(pl_module))
            return
        target = self.fusion.target if target_alpha is None else float(target_alpha)
        training.realign_in_place(training.named_tensors(pl_module), self.subspace,
                                  target - self.fusion.applied)
        self.fusion.applied = target

    def realigned_weights(self, pl_module: LightningModule):
        """Context manager: the fully realigned weights (``current_alpha``) in ``pl_module`` for the block;
        the exact raw weights come back after."""
        if self.live_forms is not None:  # the chosen form on (live − what they carry)
            return self.live_forms.temporarily_applied(training.named_tensors(pl_module))
        return training.temporarily_fused(self.hf_model(pl_module), self.subspace, self.fusion.missing)

    # -- export -----------------------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Tune ``α`` once if no validation did (auto), then write ``export_dir``, ``export_adapter_dir``."""
        if self.subspace is None:
            return
        if self.auto is not None and not self.auto.curve:
            self.choose_form(trainer, pl_module)
        if self.export_dir:
            self.export(trainer, pl_module, self.export_dir)
        live = self.live_forms if isinstance(self.live_forms, forms.LiveForms) else None
        attribute = hf_model_attribute(pl_module, self.model_attribute)
        planner = None
        if self.export_adapter_dir and live is not None:  # the form's correction (FSDP2: every rank's blocks)
            planner = live.gathered_missing_planner(training.named_tensors(pl_module), attribute) if \
                live.sharded else live.missing_planner(attribute, self.hf_model(pl_module))
        if self.export_adapter_dir and trainer.is_global_zero and live is not None:
            report = write_model_adapter(self.hf_model(pl_module), planner, self.export_adapter_dir,
                                         overwrite=self.overwrite, inputs=self._inputs)
            self._info(f"LSSF: wrote the {report}")
        elif self.export_adapter_dir and trainer.is_global_zero:
            training.export_adapter(self.hf_model(pl_module), self.subspace, self.export_adapter_dir,
                                    self.fusion.missing, info=self._info, overwrite=self.overwrite,
                                    inputs=self._inputs)

    def export(self, trainer: Trainer, pl_module: LightningModule, directory: str | os.PathLike,
               alpha: float | None = None, overwrite: bool | None = None) -> Path | None:
        """Write the realigned model (live weights + the missing correction up to ``alpha``, default
        ``current_alpha``) as a HF model directory (``overwrite``: default the callback's; refused when it
        overlaps an input). Runs on every rank (FSDP gathers collectively); rank 0 writes."""
        total = self.fusion.target if alpha is None else training.check_alpha(alpha)
        model = self.hf_model(pl_module)
        path = None
        attribute = hf_model_attribute(pl_module, self.model_attribute)
        live = self.live_forms if isinstance(self.live_forms, forms.LiveForms) else None
        # FSDP2: every rank applies the form to its own shards for the block; rank 0 streams the result
        applied = live.temporarily_applied(training.named_tensors(pl_module)) if live is not None and \
            live.sharded else contextlib.nullcontext()
        with applied, strategy.export_store(trainer, model, attribute) as (store, prefix):
            if trainer.is_global_zero:
                support = training.hf_support_files(model, self.resolve_tokenizer(pl_module, required=False))
                overwrite = self.overwrite if overwrite is None else overwrite
                if live is not None:  # the form of (live − what they carry)
                    path = Path(directory)
                    edits = {} if live.sharded else live.edits(store.keys(), attribute)
                    write_model_directory(store, path, edits=edits,
                                          names=training.export_names(store.keys(), prefix),
                                          write_support_files=support, progress=self.verbose,
                                          inputs=self._inputs, overwrite=overwrite)
                else:
                    path = training.export_realigned(store, directory, self.subspace,
                                                     total - self.fusion.applied,
                                                     names=training.export_names(store.keys(), prefix),
                                                     write_support_files=support, progress=self.verbose,
                                                     inputs=self._inputs, overwrite=overwrite)
                self._info(f"LSSF: exported the realigned model to {path}")
        trainer.strategy.barrier("lssf_export")
        return path

    # -- helpers ----------------------------------------------------------------------------------------
    def hf_model(self, pl_module: LightningModule) -> nn.Module:
        """The HF causal LM inside ``pl_module`` (``model_attribute``, or the only candidate)."""
        return hf_model(pl_module, self.model_attribute)

    def resolve_tokenizer(self, pl_module: LightningModule, required: bool = True):
        """``tokenizer``, else the module's ``tokenizer`` attribute, else ``unaligned``'s (cached)."""
        self._tokenizer = self._tokenizer or find_tokenizer(pl_module, self.tokenizer, self.unaligned,
                                                            required=required)
        return self._tokenizer

    def _info(self, message: str) -> None:
        return rank_zero_info(message) if self.verbose else None


def _trainer_folders(trainer: Trainer) -> list[str]:
    """Where the Trainer writes its own files: each ``ModelCheckpoint``'s folder (as Lightning resolves it)
    and the logger's folder."""
    folders = []
    for checkpoint in trainer.checkpoint_callbacks:
        if checkpoint.dirpath is not None:
            folders.append(checkpoint.dirpath)
        elif not trainer.loggers:
            folders.append(os.path.join(trainer.default_root_dir, "checkpoints"))
    if trainer.loggers:
        folders.append(trainer.log_dir)
    return [os.fspath(f) for f in folders if f]


def _logs_step(trainer: Trainer, step: int) -> bool:
    """Whether the Trainer's loggers receive the ``on_step`` metrics of optimizer step ``step`` (every
    ``log_every_n_steps``-th)."""
    return bool(trainer.log_every_n_steps) and step % trainer.log_every_n_steps == 0


def _no_validation_loop(trainer: Trainer) -> str | None:
    """Why ``trainer.fit`` will run no validation loop, or ``None`` when it will (or cannot tell)."""
    if trainer.limit_val_batches == 0:
        return "limit_val_batches=0"
    source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
    if source is not None and not source.is_defined():
        return "no val_dataloader: the DataModule or LightningModule defines none"
    return None


def _live_forms(callback: LSSFCallback, trainer: Trainer, pl_module: LightningModule):
    """The callback's :class:`~lssf_lightning.forms.LiveForms` (single device, DDP, FSDP2 shards; see
    :func:`~lssf_lightning.lightning.strategy.forms_problem`; on a peft LoRA model reading the merged weights,
    or the adapter guard :class:`~lssf_lightning.forms.LoraHoldOut` in steps mode) with the reference weights
    the form reads (one-line errors otherwise)."""
    what = f"method={callback.method!r} with apply_on={callback.apply_on!r}"
    parameters = training.named_tensors(pl_module)
    problem = strategy.forms_problem(trainer, callback.apply_on,
                                     bool(callback.export_dir or callback.export_adapter_dir),
                                     any(is_adapter_key(k) for k in parameters))
    if problem is None and callback.apply_on == "steps" and any(is_adapter_key(k) for k in parameters):
        # the guard in adapter form where it is exact and nothing is exported; else the form on the merged
        # weights, its correction in the frozen base (forms.lora), as in every other mode
        options = forms.check_method_options(callback.method, callback.form_options)
        if (callback.method == "lssf-reset" and options.get("alpha") == 1 and not options.get("add")
                and callback.subspace_config.alpha_1 == 1
                and not (callback.export_dir or callback.export_adapter_dir)):
            try:
                return forms.LoraHoldOut(callback.hf_model(pl_module), callback.subspace)
            except SettingError as err:
                raise MisconfigurationException(f"LSSFCallback: {err}") from None
    if problem is None and callback.method == "lssf-two-sided" and callback.aligned is None:
        problem = "reads the aligned weights: pass aligned= (the aligned model's path)"
    if problem:
        raise MisconfigurationException(f"LSSFCallback: {what} {problem}")
    try:
        options = {**callback.form_options, "alpha": callback.fusion.target}  # alpha='auto': the chosen one
        carried = callback.live_forms if isinstance(callback.live_forms, forms.LiveForms) else None
        return forms.run_form(callback.method, options, callback.subspace, parameters, carried=carried,
                              aligned=callback.aligned, unaligned=callback.unaligned, module=pl_module)
    except SettingError as err:
        raise MisconfigurationException(f"LSSFCallback: {err}") from None


def _auto_start(callback: LSSFCallback, trainer: Trainer, pl_module: LightningModule) -> str:
    """``alpha="auto"``'s form until the first choice: the first candidate (at ``α = 1``). On a peft LoRA
    model where the forms do not run (:func:`~lssf_lightning.lightning.strategy.forms_problem`: FSDP2) the
    default grid falls back to the paper's form (warned); forms named there are refused."""
    methods = callback.auto.tuner.methods
    lora = any(is_adapter_key(k) for k in training.named_tensors(pl_module))
    exports = bool(callback.export_dir or callback.export_adapter_dir)
    problem = strategy.forms_problem(trainer, callback.apply_on, exports, lora) if lora else None
    if methods != ("lssf",) and problem is not None:
        if callback._named_method is not None or callback.auto.config.methods is not None:
            raise MisconfigurationException(f"LSSFCallback: alpha='auto' over {list(methods)} {problem}: use "
                                            "method='lssf'")
        rank_zero_warn(f"LSSFCallback: alpha='auto' chooses the strength of the paper's form only "
                       f"(method='lssf'): the other forms {problem}")
        callback.auto.tuner.methods = methods = ("lssf",)
    return methods[0]
