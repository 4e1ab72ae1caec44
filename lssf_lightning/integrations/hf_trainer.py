"""``LSSFTrainerCallback``: LSSF in a ``transformers.Trainer`` or TRL ``SFTTrainer`` run (full or LoRA).

The same core and settings as :class:`~lssf_lightning.LSSFCallback`, composed from
:mod:`lssf_lightning.training`: the subspace is built (or loaded from ``subspace_cache``) when the Trainer is
created, from the model's own weights (``aligned=None``) and ``unaligned``; the live weights are never
changed, so resuming the Trainer from a ``checkpoint-N`` continues from the raw weights exactly; every
``checkpoint-N`` also gets a realigned, loadable HF model in ``checkpoint-N/realigned/``; each evaluation logs
the refusal rates of the raw and the realigned model; at the end ``export_dir`` gets the realigned model and
``export_adapter_dir`` the correction as a peft LoRA adapter (for a LoRA run: ONE adapter holding the task
LoRA and the correction).
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import TrainerCallback

from lssf_lightning import forms, training
from lssf_lightning.adapters import write_model_adapter
from lssf_lightning.config import AutoAlphaConfig, SubspaceConfig
from lssf_lightning.io.export import write_model_directory
from lssf_lightning.io.guard import write_json
from lssf_lightning.io.hub import resolve_model
from lssf_lightning.io.schema import FormatError, field, load_json
from lssf_lightning.io.weights import ModuleStore
from lssf_lightning.metrics.refusal import RefusalRate
from lssf_lightning.monitoring import (
    AlphaTuner,
    SafetyProbe,
    auto_methods,
    check_min_refusal_rate,
    fused_call,
    needs_realignment,
)
from lssf_lightning.validation import SettingError, check_finite, check_int

__all__ = ["AUTO_STATE_FILE", "LSSFTrainerCallback"]

AUTO_STATE_FILE = "lssf_state.json"
"""The callback's state (chosen α, the fusion the live weights carry, auto's target and curve) written into
each ``checkpoint-N``, read on resume."""

_MONITOR_OPTIONS = ("harmful_prompts", "harmless_prompts", "num_prompts", "max_new_tokens", "judge",
                    "utility_texts", "num_utility_texts")


class LSSFTrainerCallback(TrainerCallback):
    """Keep a ``transformers``/TRL fine-tune safe with LSSF: realigned checkpoints, refusal logs, exports.

    Example::

        safety = LSSFTrainerCallback(unaligned="org/base-model", alpha=1.0, export_dir="realigned")
        config = SFTConfig(output_dir="out", eval_strategy="steps")
        trainer = SFTTrainer(model="org/aligned-model", args=config, train_dataset=train, eval_dataset=val,
                             callbacks=[safety])
        trainer.train()  # out/checkpoint-N/realigned/ is the safe model; lssf/* rates reach report_to

    Args:
        unaligned: the unaligned counterpart of the aligned model (a path or hub ID).
        aligned: the aligned model; ``None``: the model's own weights when the Trainer is created (before any
            checkpoint is loaded; pass the callback in ``Trainer(callbacks=[...])``).
        subspace: the subspace settings (``SubspaceConfig`` or a mapping of its fields).
        alpha: fusion strength ``α``, or ``"auto"``: at each evaluation, the form and strength among
            ``auto_alpha.methods`` × ``auto_alpha.alphas`` whose realigned model refuses the tuning prompts
            about as often as the aligned model did, with the lowest perplexity within
            ``auto_alpha.max_perplexity_increase`` (the sweep's rule); logged as ``lssf/alpha``,
            ``lssf/method/<name>`` and ``lssf/target_reached``; ``lssf_state.json`` records ``method``,
            ``auto_recommended`` and ``auto_note`` ("target not reached ..." when nothing reached it).
        export_dir: a realigned HF model directory written at the end of training.
        export_adapter_dir: the correction as a peft LoRA adapter, written at the end of training (a LoRA run
            gets the combined task + correction adapter, to load on the aligned model).
        adapter_max_rank: cap the adapter's per-module rank (servers with a maximum LoRA rank).
        subspace_cache: a subspace file reused when its fingerprint matches (written otherwise; the subspace
            it replaces is kept next to it, at most ``training.CACHE_KEEP`` = 8 subspaces in all, the oldest
            removed first).
        checkpoint_subdir: the realigned model's folder inside each ``checkpoint-N``; ``None``: none written.
        monitor: ``True``/``False``, or the refusal monitor's settings (``harmful_prompts``,
            ``harmless_prompts``, ``num_prompts``, ``max_new_tokens``, ``judge``, ``utility_texts``,
            ``num_utility_texts``, as in ``RefusalMonitor``: :class:`lssf_lightning.monitoring.SafetyProbe`).
            Each evaluation logs the refusal rates and the perplexity on the utility texts, raw and realigned.
        auto_alpha: the ``alpha="auto"`` grid, target, tolerance, prompts and utility budget
            (``max_perplexity_increase``).
        min_refusal_rate: realign the live weights (the whole missing fusion) when the monitor's raw refusal
            rate falls below this at an evaluation; checkpoints written after hold the realigned weights, and
            the fusion they carry is recorded in ``lssf_state.json`` so a resume does not add it twice.
        tokenizer: a tokenizer path or ID; default: the Trainer's ``processing_class``, else ``unaligned``'s.
        verbose: print what happens.
        overwrite: replace an existing ``export_dir`` / ``export_adapter_dir`` (only if it holds files
            lssf_lightning writes). Both are checked when the Trainer is created and again when training
            begins: an output that is, contains or lies inside an input (the model's source, ``aligned``,
            ``unaligned``, the Trainer's ``output_dir``, the cache) is refused.
        method: the fusion form, as ``realign --method`` and ``LSSFCallback``: ``"lssf"`` (the paper's
            additive form, the default with a numeric ``alpha``), ``"lssf-reset"``, ``"lssf-erosion"``,
            ``"lssf-two-sided"`` (needs ``aligned=``) or any registered low-rank planner. Every output carries
            it: each ``checkpoint-N/realigned/`` holds the form applied to the raw weights (the Trainer's own
            files stay raw, so a resume is exact), ``export_dir``, ``export_adapter_dir`` (the form's
            correction as a LoRA adapter), the monitor's ``*_realigned`` pass and ``min_refusal_rate`` (the
            live weights get the form of (live − the correction they carry): applications never stack).
            With ``alpha="auto"``: the one form to tune; ``None``: ``auto_alpha.methods`` (default the reset
            form and the paper's). On a peft LoRA model a form reads the merged weights (``base + s·B·A``)
            and the adapter holds the task LoRA and the form's correction, for the aligned model.
        add, input_share: the method's other parameters (a parameter it does not take is an error).
    """

    def __init__(
        self,
        unaligned: str | os.PathLike,
        aligned: str | os.PathLike | None = None,
        subspace: SubspaceConfig | Mapping[str, Any] | None = None,
        alpha: float | Literal["auto"] = 1.0,
        export_dir: str | os.PathLike | None = None,
        export_adapter_dir: str | os.PathLike | None = None,
        adapter_max_rank: int | None = None,
        subspace_cache: str | os.PathLike | None = None,
        checkpoint_subdir: str | None = "realigned",
        monitor: bool | Mapping[str, Any] = True,
        auto_alpha: AutoAlphaConfig | None = None,
        tokenizer: str | os.PathLike | None = None,
        verbose: bool = True,
        overwrite: bool = False,
        min_refusal_rate: float | None = None,
        method: str | None = None,
        add: float | None = None,
        input_share: float | None = None,
    ) -> None:
        self.subspace_config = SubspaceConfig.coerce(subspace)
        self.alpha = alpha if alpha == "auto" else check_finite("alpha", alpha)
        self.form_options = {"alpha": alpha, "add": add, "input_share": input_share}
        if alpha == "auto":
            methods = auto_methods(method, self.form_options, auto_alpha or AutoAlphaConfig())
        else:
            forms.check_form_settings(method or "lssf", self.form_options, "checkpoint", None)
        self.method = method or "lssf"  # with alpha="auto": the chosen form once chosen
        self._named_method, self._resumed = method, None
        if adapter_max_rank is not None:
            check_int("adapter_max_rank", adapter_max_rank)
        if checkpoint_subdir is not None and (
            not checkpoint_subdir or Path(checkpoint_subdir).name != checkpoint_subdir
        ):
            raise SettingError(f"checkpoint_subdir must be a plain folder name, got {checkpoint_subdir!r}")
        options = dict(monitor) if isinstance(monitor, Mapping) else {}
        unknown = sorted(set(options) - set(_MONITOR_OPTIONS))
        if unknown:
            raise SettingError(f"monitor settings {unknown} are not known; use {list(_MONITOR_OPTIONS)}")
        self.monitor = bool(monitor)
        self.probe = SafetyProbe(**options)
        self.min_refusal_rate = check_min_refusal_rate(min_refusal_rate, self.monitor)
        self.tuner = (AlphaTuner(auto_alpha or AutoAlphaConfig(), self.probe, methods) if alpha == "auto"
                      else None)
        self.auto = self.tuner.config if self.tuner is not None else None
        self.unaligned, self.aligned = unaligned, aligned
        self.export_dir, self.export_adapter_dir, self.adapter_max_rank = (
            export_dir,
            export_adapter_dir,
            adapter_max_rank,
        )
        self.subspace_cache, self.checkpoint_subdir = subspace_cache, checkpoint_subdir
        self.tokenizer, self.verbose, self.overwrite = tokenizer, verbose, overwrite
        self._models: list[Any] = [aligned, unaligned]  # with the model's source once the Trainer is known
        self._inputs: list[Any] = [*self._models, subspace_cache]
        self.fusion = training.FusionState(target=1.0 if alpha == "auto" else self.alpha)  # applied stays 0
        self.subspace = None
        self.live_forms: forms.LiveForms | None = None  # the form on the live weights (None: "lssf")
        self._metric = RefusalRate(judge=self.probe.judge)
        self._tokenizer = None
        self._trainer: weakref.ref | None = None
        self._device = torch.device("cpu")

    # -- hooks ------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Find the Trainer (for logging) and, with ``aligned=None``, build the subspace from the model as
        given."""
        self._trainer = _calling_trainer()
        _check_supported(args)
        self.check_outputs(args, model)  # before any work
        if self.aligned is None:
            self._build(args, state, model, processing_class)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Build the subspace if ``on_init_end`` did not (``aligned`` given, or the callback added later)."""
        _check_supported(args)
        self.check_outputs(args, model)
        if state.global_step > 0:
            self._load_state(Path(args.output_dir) / f"checkpoint-{state.global_step}" / AUTO_STATE_FILE)
        if self.subspace is not None:
            if self._resumed is not None:  # the form the resumed checkpoint's outputs were written with
                self._start_form(model)
            return
        if self.aligned is None and state.global_step > 0:
            raise training.ResumeError(
                "LSSFTrainerCallback(aligned=None) reads the aligned weights when the Trainer is created, "
                "but it was added after (add_callback) and this run resumes from a checkpoint: pass "
                "`aligned=` the aligned model, or give the callback to `Trainer(callbacks=[...])`."
            )
        self._build(args, state, model, processing_class)

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Write the realigned model into the ``checkpoint-N`` the Trainer just saved (its raw weights
        untouched), and ``alpha="auto"``'s state beside it (a resume picks it up)."""
        if self.subspace is None or not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            warnings.warn(
                f"LSSFTrainerCallback: no {checkpoint} to write the realigned model into", stacklevel=2
            )
            return
        if self.tuner is not None or self.fusion.applied or self.live_forms is not None:
            self._save_state(checkpoint / AUTO_STATE_FILE)
        if self.checkpoint_subdir is not None:  # its own folder inside the checkpoint: replaced on a re-save
            self.export(model, checkpoint / self.checkpoint_subdir, processing_class=processing_class,
                        overwrite=True, inputs=[*self._models, self.subspace_cache])

    def on_evaluate(self, args, state, control, model=None, metrics=None, processing_class=None, **kwargs):
        """Choose ``α`` (auto) and log the refusal rates, raw and realigned, into the Trainer's logs."""
        if self.subspace is None:
            return
        tokenizer = self.resolve_tokenizer(processing_class)
        logs = {}
        if self.tuner is not None:
            self.fusion.target = self.choose_alpha(model, tokenizer)
            logs.update(self.tuner.logs(self.method, self.fusion.target))
        if self.monitor:
            values = self.measure(model, tokenizer)
            logs.update({f"lssf/{k}": float(v) for k, v in values.items()})
            if needs_realignment(values, self.min_refusal_rate, self.fusion):
                self.realign_live(model)
                self._info(f"LSSF: refusal rate {values['refusal_rate']:.2f} < {self.min_refusal_rate}: "
                           "realigned the live weights")
        if not logs:
            return
        if metrics is not None:
            metrics.update(logs)
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:
            trainer.log(dict(logs))  # reaches report_to's loggers and state.log_history
        else:
            state.log_history.append({**logs, "step": state.global_step})

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Write ``export_dir`` (realigned model) and ``export_adapter_dir`` (the correction as a LoRA
        adapter)."""
        if self.subspace is None:
            return
        if self.tuner is not None and not self.tuner.curve:  # every process: counts are summed (a collective)
            self.fusion.target = self.choose_alpha(model, self.resolve_tokenizer(processing_class))
        if not state.is_world_process_zero:
            return
        if self.export_dir:
            self.export(model, self.export_dir, processing_class=processing_class)
        if self.export_adapter_dir:
            self.export_adapter(model, self.export_adapter_dir)

    # -- public pieces ----------------------------------------------------------------------------------
    def check_outputs(self, args, model: nn.Module | None) -> None:
        """Refuse ``export_dir``, ``export_adapter_dir`` and ``subspace_cache`` when they overlap an input
        (the model's source, ``aligned``, ``unaligned``, ``args.output_dir``, the cache), or an existing
        export folder without ``overwrite`` or holding other files (the same one-line errors as the CLI)."""
        source = training.model_source(model) if model is not None else None
        self._models = [source, self.aligned, self.unaligned]
        self._inputs = [*self._models, getattr(args, "output_dir", None), self.subspace_cache]
        training.check_outputs([self.export_dir, self.export_adapter_dir], self._inputs,
                               overwrite=self.overwrite, cache=self.subspace_cache, cache_inputs=self._models)

    def export(
        self,
        model: nn.Module,
        directory: str | os.PathLike,
        alpha: float | None = None,
        processing_class=None,
        *,
        overwrite: bool | None = None,
        inputs: Any = None,
    ) -> Path:
        """Write ``model``'s live weights + ``α·U'U'ᵀδ`` (default ``α``: the current one), or with a
        ``method`` other than ``"lssf"`` that form applied to them, as a HF directory; a peft model is written
        merged. ``overwrite`` (default the callback's) and ``inputs`` (default the run's inputs) go to the
        output guard."""
        store = ModuleStore(model)
        support = training.hf_support_files(model, self.resolve_tokenizer(processing_class, required=False))
        if self.live_forms is not None:  # the form of (live − the correction they carry)
            live = self.live_forms if alpha is None else self._form(model, self.method, alpha)
            write_model_directory(store, directory, edits=live.edits(store.keys()),
                                  names=training.export_names(store.keys()), write_support_files=support,
                                  inputs=self._inputs if inputs is None else inputs,
                                  overwrite=self.overwrite if overwrite is None else overwrite,
                                  progress=False)
            self._info(f"LSSF: wrote the realigned model ({self.method}, {live.options}) to {directory}")
            return Path(directory)
        alpha = self.fusion.missing if alpha is None else check_finite("alpha", alpha)
        path = training.export_realigned(
            store,
            directory,
            self.subspace,
            alpha,
            names=training.export_names(store.keys()),
            write_support_files=support,
            inputs=self._inputs if inputs is None else inputs,
            overwrite=self.overwrite if overwrite is None else overwrite,
            progress=False,
        )
        self._info(f"LSSF: wrote the realigned model (alpha={alpha:g}) to {path}")
        return path

    def export_adapter(self, model: nn.Module, directory: str | os.PathLike, alpha: float | None = None):
        """Write the correction (the chosen form's) as a peft LoRA adapter for ``model``'s live weights; for a
        peft LoRA ``model``, ONE adapter with the task LoRA and the correction, to load on the aligned
        model."""
        if self.live_forms is not None:  # what the live weights miss to carry the form
            live = self.live_forms if alpha is None else self._form(model, self.method, alpha)
            report = write_model_adapter(model, live.missing_planner(model=model), directory,
                                         max_rank=self.adapter_max_rank, overwrite=self.overwrite,
                                         inputs=self._inputs)
            self._info(f"LSSF: wrote the {report}")
            return report
        alpha = self.fusion.missing if alpha is None else check_finite("alpha", alpha)
        return training.export_adapter(
            model, self.subspace, directory, alpha, self.adapter_max_rank, info=self._info,
            overwrite=self.overwrite, inputs=self._inputs,
        )

    def measure(self, model: nn.Module, tokenizer) -> dict[str, float]:
        """Refusal rates on harmful prompts and (over-refusal) harmless ones, and the perplexity on the
        utility texts, raw and realigned (:meth:`lssf_lightning.monitoring.SafetyProbe.measure`); each process
        answers its share of the prompts and the counts are summed (a collective under DDP)."""
        shares = {kind: _shard(prompts) for kind, prompts in self.probe.prompts().items()}

        def answers() -> dict[str, list[str]]:
            return {kind: self.probe.generate(model, tokenizer, prompts) for kind, prompts in shares.items()}

        if self.live_forms is not None:  # the form of (live − what they carry)
            def swap(measure, raw):
                with self.live_forms.temporarily_applied(training.named_tensors(model)):
                    return measure()
        else:
            swap = fused_call(
                self.fusion, lambda: training.temporarily_fused(model, self.subspace, self.fusion.missing)
            )
        perplexity = lambda: self.probe.perplexity(model, tokenizer)  # noqa: E731
        values = self.probe.measure(answers, self._rate, perplexity, swap)
        return {name: float(value) for name, value in values.items()}

    def choose_alpha(self, model: nn.Module, tokenizer) -> float:
        """``alpha="auto"``'s choice of form and strength (:class:`lssf_lightning.monitoring.AlphaTuner`,
        within the utility budget ``auto_alpha.max_perplexity_increase``) on the live model, each candidate
        applied in turn; becomes the run's form. "target not reached" is warned."""
        candidates = self._candidates(model)
        choice = self.tuner.choose(model, tokenizer, candidates, prompts=self.tuner.prompts(_shard),
                                   rate=self._rate, raw=candidates.raw,
                                   methods=candidates.methods(self.tuner.methods))
        if not choice.recommended:
            warnings.warn(f"LSSFTrainerCallback: {self.tuner.describe(choice)}", stacklevel=2)
        self.live_forms = candidates.form(choice.method, choice.alpha)
        self.method = choice.method
        return choice.alpha

    def realign_live(self, model: nn.Module) -> None:
        """Bring the live weights to the current form: the additive fusion adds only what they miss; another
        form is applied to (live − the correction already in them)."""
        if self.live_forms is not None:
            self.live_forms.apply_(training.named_tensors(model))
        else:
            training.realign_in_place(training.named_tensors(model), self.subspace, self.fusion.missing)
        self.fusion.applied = self.fusion.target

    @property
    def auto_target(self) -> float | None:
        """``alpha="auto"``'s refusal target (``None`` until measured, or without auto)."""
        return self.tuner.target if self.tuner is not None else None

    @property
    def alpha_curve(self) -> list[dict[str, float]]:
        """``alpha="auto"``'s last measured curve."""
        return self.tuner.curve if self.tuner is not None else []

    def resolve_tokenizer(self, processing_class=None, required: bool = True):
        """``tokenizer``, else the Trainer's ``processing_class`` (a processor's tokenizer), else
        ``unaligned``'s."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if self.tokenizer is not None:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    resolve_model(self.tokenizer, what="tokenizer", weights=False)
                )
            elif processing_class is not None:
                self._tokenizer = getattr(processing_class, "tokenizer", processing_class)
            else:
                directory = resolve_model(self.unaligned, what="tokenizer", weights=False)
                if directory.is_dir() and any(directory.glob("tokenizer*")):
                    self._tokenizer = AutoTokenizer.from_pretrained(directory)
        if self._tokenizer is None and required:
            raise ValueError(
                "LSSFTrainerCallback needs a tokenizer: pass `tokenizer=` or the Trainer's "
                "`processing_class=`"
            )
        return self._tokenizer

    # -- helpers ----------------------------------------------------------------------------------------
    def _build(self, args, state, model, processing_class) -> None:
        device = next(model.parameters()).device
        source = self.aligned if self.aligned is not None else model
        tokenizer = (
            self.resolve_tokenizer(processing_class) if self.subspace_config.source == "activations" else None
        )
        self.subspace = training.load_or_build_subspace(
            source,
            self.unaligned,
            self.subspace_config,
            cache=self.subspace_cache,
            write_cache=state.is_world_process_zero,
            info=self._info,
            tokenizer=tokenizer,
            device=device if device.type != "cpu" else None,
            progress=self.verbose and state.is_world_process_zero,
        )
        self._device = device
        self._start_form(model)
        if self.tuner is not None and self.tuner.target is None and state.global_step == 0:  # aligned model
            prompts, tokenizer = self.tuner.prompts(_shard), self.resolve_tokenizer(processing_class)
            self.tuner.set_target(self._rate(self.probe.generate(model, tokenizer, prompts)))

    def _start_form(self, model: nn.Module) -> None:
        """The run's form (``method``; with ``alpha="auto"`` the first candidate at ``α = 1`` until chosen, or
        what a resumed ``lssf_state.json`` names)."""
        methods = self.tuner.methods if self.tuner is not None else (self.method,)
        if self._resumed is None:
            self.method = methods[0]
        alpha = self.fusion.target
        self.live_forms = self._form(model, self.method, alpha) if self.method != "lssf" else None

    def _form(self, model: nn.Module, method: str, alpha: float) -> forms.LiveForms:
        return forms.run_form(method, {**self.form_options, "alpha": alpha}, self.subspace,
                              training.named_tensors(model), carried=self.live_forms, module=model,
                              aligned=self.aligned,
                              unaligned=self.unaligned)

    def _candidates(self, model: nn.Module) -> forms.Candidates:
        return forms.Candidates(model, training.named_tensors(model), self.subspace, live=self.live_forms,
                                applied_alpha=0.0 if self.live_forms is not None else self.fusion.applied,
                                options=self.form_options, aligned=self.aligned, unaligned=self.unaligned,
                                owner=model)

    def _save_state(self, path: Path) -> None:
        record = {
            "alpha": self.fusion.target,
            "applied_alpha": self.fusion.applied,
            "method": self.method,
            **({"options": dict(self.live_forms.options)} if self.live_forms is not None else {}),
            **(self.tuner.state_dict() if self.tuner is not None else {}),
            "fingerprint": self.subspace.metadata.get("fingerprint"),
        }
        write_json(path, record, indent=1)

    def _load_state(self, path: Path) -> None:
        if not path.is_file():
            return
        record = load_json(path)
        alpha = field(path, record, "alpha", float)
        applied = field(path, record, "applied_alpha", float, default=0.0)
        auto_target = field(path, record, "auto_target", (float, type(None)), default=None)
        curve = field(path, record, "alpha_curve", (list, type(None)), default=None) or []
        for i, point in enumerate(curve):
            for name in ("alpha", "refusal"):
                field(path, point, name, float, where=f"alpha_curve[{i}]")
        field(path, record, "fingerprint", (str, type(None)), default=None)
        if auto_target is not None and not 0.0 <= auto_target <= 1.0:
            raise FormatError(path, f"field 'auto_target' must be a rate in [0, 1], got {auto_target!r}")
        method = field(path, record, "method", str, default="lssf")
        if applied and method != "lssf":
            raise training.ResumeError(f"{path}: the live weights carry a {method} correction, whose factors "
                                       "a checkpoint of the transformers Trainer does not keep; resume is "
                                       "refused")
        self.fusion.target = float(alpha)
        self.fusion.applied = float(applied)
        if self.tuner is not None:
            self.method, self._resumed = method, method
            self.tuner.load_state_dict({"auto_target": auto_target, "alpha_curve": curve})

    def _rate(self, answers: list[str]) -> float:
        self._metric = self._metric.to(self._device)  # counts are summed over processes on this device
        self._metric.reset()
        self._metric.update(answers)
        value = float(self._metric.compute())
        self._metric.reset()
        return value

    def _info(self, message: str) -> None:
        if self.verbose and _rank() == 0:
            print(message, file=sys.stderr)


def _rank() -> int:
    return (
        torch.distributed.get_rank()
        if torch.distributed.is_available() and torch.distributed.is_initialized()
        else 0
    )


def _shard(prompts: list[str]) -> list[str]:
    """This process's share of ``prompts`` (all of them outside distributed runs)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return prompts
    return prompts[torch.distributed.get_rank() :: torch.distributed.get_world_size()]


def _check_supported(args) -> None:
    if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
        raise ValueError(
            "LSSFTrainerCallback supports single-device and DDP runs; under FSDP/DeepSpeed the weights "
            "are sharded: save the model and run `lssf-lightning realign` on it instead"
        )


def _calling_trainer() -> weakref.ref | None:
    """The ``transformers.Trainer`` whose ``__init__`` is calling ``on_init_end``, found on the call stack.

    Callbacks get no reference to their Trainer, yet ``Trainer.log`` is the only way into ``report_to``'s
    loggers (they run before user callbacks, so adding to the metrics in ``on_evaluate`` would not reach them;
    TRL's own logging callbacks take ``trainer=`` for this). Without it, the rates go into
    ``state.log_history`` only.
    """
    from transformers import Trainer

    frame = inspect.currentframe()
    frame = frame.f_back if frame is not None else None
    for _ in range(8):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return weakref.ref(candidate)
        frame = frame.f_back
    return None
